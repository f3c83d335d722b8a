//! `relaypacs upload PATH… --server URL`: the arguments and the run.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use secrecy::SecretString;

use super::progress::{Bars, JsonLines, PlainLines, ProgressSink};
use super::{ClientError, Credentials, RetryPolicy, Summary, UploadConfig, Uploader};

/// Arguments of `relaypacs upload`.
#[derive(clap::Args, Debug)]
pub struct UploadArgs {
    /// DICOM files or folders (walked recursively). Each file is checked
    /// locally first; non-DICOM and malformed files are reported and not
    /// sent.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// The gateway's base URL, e.g. https://relay.example.org.
    #[arg(long, env = "RELAYPACS_SERVER", value_name = "URL")]
    pub server: String,
    /// Log in as NAME; the password comes from RELAYPACS_PASSWORD or a
    /// prompt on the terminal (never from the command line).
    #[arg(long, env = "RELAYPACS_USER", value_name = "NAME")]
    pub user: Option<String>,
    /// Ask for a TOTP code (or take it from RELAYPACS_TOTP) when logging in.
    #[arg(long, requires = "user")]
    pub totp: bool,
    /// A file holding a refresh token (from POST /api/v1/auth/login); it is
    /// rewritten with each rotated token (mode 0600). A JWT access token in
    /// it is used as is until it expires.
    #[arg(long, value_name = "FILE", conflicts_with = "user")]
    pub token_file: Option<PathBuf>,
    /// Files sent at once.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub parallel: u8,
    /// MiB per PATCH (1 to 32).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=32), value_name = "MIB")]
    pub chunk_mib: u8,
    /// The resume state file [default: $XDG_STATE_HOME/relaypacs/uploads.json
    /// or ~/.local/state/relaypacs/uploads.json].
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Wait until each study is delivered to the PACS (or dead-lettered).
    #[arg(long)]
    pub wait: bool,
    /// Seconds --wait waits in all.
    #[arg(long, default_value_t = 3600, value_name = "SECS")]
    pub wait_timeout: u64,
    /// Extra trusted root certificates (PEM) for an https:// server, e.g.
    /// the hospital's own CA; certificates are always checked.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Tries per request before the server counts as unreachable.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub retries: u32,
    /// One JSON object per line on standard output (file_refused,
    /// file_done, study_completed, study_delivered, summary, …); no bars.
    #[arg(long)]
    pub json: bool,
}

fn credentials(args: &UploadArgs) -> Result<Credentials, ClientError> {
    if let Some(path) = &args.token_file {
        return Ok(Credentials::TokenFile(path.clone()));
    }
    let Some(user) = &args.user else {
        return Err(ClientError::Config(
            "no credentials: pass --user NAME (password from RELAYPACS_PASSWORD or a prompt) \
             or --token-file FILE"
                .into(),
        ));
    };
    let tty = std::io::stdin().is_terminal();
    let password = match std::env::var("RELAYPACS_PASSWORD") {
        Ok(p) if !p.is_empty() => p,
        _ if tty => rpassword::prompt_password(format!("password for {user}: "))
            .map_err(|e| ClientError::Config(format!("cannot read the password: {e}")))?,
        _ => {
            return Err(ClientError::Config(
                "no password: set RELAYPACS_PASSWORD or run on a terminal".into(),
            ));
        }
    };
    let totp = if args.totp {
        match std::env::var("RELAYPACS_TOTP") {
            Ok(c) if !c.is_empty() => Some(c),
            _ if tty => Some(
                rpassword::prompt_password("TOTP code: ")
                    .map_err(|e| ClientError::Config(format!("cannot read the code: {e}")))?,
            ),
            _ => {
                return Err(ClientError::Config(
                    "no TOTP code: set RELAYPACS_TOTP or run on a terminal".into(),
                ));
            }
        }
    } else {
        None
    };
    Ok(Credentials::Password {
        user: user.clone(),
        password: SecretString::from(password),
        totp: totp.map(SecretString::from),
    })
}

/// Run `relaypacs upload`; the exit code is [`Summary::exit_code`] (see
/// [`super::EXIT_CODES`]).
pub fn run(args: UploadArgs) -> ExitCode {
    let sink: Box<dyn ProgressSink> = if args.json {
        Box::new(JsonLines)
    } else if std::io::stderr().is_terminal() {
        Box::new(Bars::new())
    } else {
        Box::new(PlainLines)
    };
    let fail = |e: ClientError, sink: &dyn ProgressSink| {
        let s = Summary {
            exit_code: e.exit_code(),
            error: Some(e.to_string()),
            ..Summary::default()
        };
        if args.json {
            sink.event(&super::Event::Summary(s));
        }
        eprintln!("relaypacs upload: {e}");
        ExitCode::from(e.exit_code())
    };
    let creds = match credentials(&args) {
        Ok(c) => c,
        Err(e) => return fail(e, sink.as_ref()),
    };
    let mut config = UploadConfig::new(args.server.clone(), creds);
    config.parallel = usize::from(args.parallel);
    config.chunk_size = u64::from(args.chunk_mib) << 20;
    config.state_file = args.state.clone();
    config.wait = args.wait;
    config.ca_file = args.ca_file.clone();
    config.wait_timeout = Duration::from_secs(args.wait_timeout);
    config.retry = RetryPolicy {
        attempts: args.retries,
        ..RetryPolicy::default()
    };
    let uploader = match Uploader::new(config) {
        Ok(u) => u,
        Err(e) => return fail(e, sink.as_ref()),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                ClientError::Config(format!("cannot start the runtime: {e}")),
                sink.as_ref(),
            );
        }
    };
    let summary = rt.block_on(uploader.upload(&args.paths, sink.as_ref()));
    if let Some(e) = &summary.error
        && !args.json
    {
        eprintln!("relaypacs upload: {e}");
    }
    ExitCode::from(summary.exit_code)
}
