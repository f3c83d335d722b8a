//! Throwaway certificate authorities for TLS tests, made with the `openssl`
//! command: a CA and server certificates for `127.0.0.1` and `localhost`,
//! all in a temporary folder that goes away with the [`TestCa`].

use std::path::{Path, PathBuf};
use std::process::Command;

/// A throwaway CA (EC P-256, valid two days).
#[derive(Debug)]
pub struct TestCa {
    dir: tempfile::TempDir,
    name: String,
}

/// A server certificate issued by a [`TestCa`]: PEM files.
#[derive(Clone, Debug)]
pub struct TestCert {
    /// The leaf certificate (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8 PEM).
    pub key_file: PathBuf,
    /// The key followed by the certificate in one PEM file (Orthanc's
    /// `SslCertificate`).
    pub combined_file: PathBuf,
    /// The issuing CA's certificate (PEM), for clients to trust.
    pub ca_file: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new(crate::tool("openssl"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCa {
    /// A new CA whose subject is `CN=<name>`.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let subj = format!("/CN={name}");
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                &subj,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Self {
            dir,
            name: name.to_owned(),
        }
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issue a server certificate for `127.0.0.1` and `localhost`; `label`
    /// names its files (distinct labels, distinct certificates).
    pub fn issue(&self, label: &str) -> TestCert {
        let d = self.dir.path();
        let ext = format!("{label}.ext");
        std::fs::write(
            d.join(&ext),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write extensions");
        let (key, csr, pem) = (
            format!("{label}.key"),
            format!("{label}.csr"),
            format!("{label}.pem"),
        );
        let subj = format!("/CN=localhost/O={}", self.name);
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &subj,
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
        let combined = d.join(format!("{label}-combined.pem"));
        let mut both = std::fs::read(d.join(&key)).expect("read key");
        both.extend(std::fs::read(d.join(&pem)).expect("read cert"));
        std::fs::write(&combined, both).expect("write combined PEM");
        TestCert {
            cert_file: d.join(pem),
            key_file: d.join(key),
            combined_file: combined,
            ca_file: self.ca_file(),
        }
    }
}
