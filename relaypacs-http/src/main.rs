//! `relaypacs`: the reference server binary.
//!
//! - `relaypacs` (or `relaypacs serve`): run the gateway. With no
//!   configuration it listens on 127.0.0.1:8080 and keeps everything under
//!   `./relaypacs-data`, with a random secret created on first start.
//! - `relaypacs user add NAME --role admin`: create an account (the
//!   password is read from standard input). There is no built-in account.
//! - `relaypacs audit verify` / `relaypacs audit export`: check the audit
//!   chain in the state database (`[state]`; or a JSON-lines trail with
//!   `--trail`) against its anchor; write it as DICOM PS3.15 audit
//!   messages or JSON lines. Both read only and may run beside the server.
//! - `relaypacs migrate`: bring the state database's schema to this
//!   build's version (as the owner role, when the gateways run with
//!   `[state] migrate = false`).
//! - `relaypacs upload PATH… --server URL` (feature `client`): send DICOM
//!   files to a gateway (see [`relaypacs_http::client`]).

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use relaypacs_http::auth::{Hasher, Role, SqlUserStore, UserStore, check_policy};
use relaypacs_http::routes::auth::{check_username, new_record};
use relaypacs_http::{Config, Server};

#[derive(Parser, Debug)]
#[command(
    name = "relaypacs",
    version,
    about = "RelayPACS DICOM ingestion gateway"
)]
struct Cli {
    /// TOML configuration file (RELAYPACS_* variables override it).
    #[arg(long, env = "RELAYPACS_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Manage accounts (run while the server is stopped, or use the API).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Verify or export the audit trail (read-only; the server may run).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run the state database's migrations (as a role allowed to change
    /// the schema) and print the schema version.
    Migrate,
    /// Send DICOM files and folders to a gateway: checked locally, grouped
    /// by study, resumable tus uploads; resumes after being killed.
    #[cfg(feature = "client")]
    #[command(after_help = relaypacs_http::client::EXIT_CODES)]
    Upload(Box<relaypacs_http::client::cli::UploadArgs>),
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Create an account; the password is read from standard input.
    Add {
        /// Login name.
        username: String,
        /// uploader, radiologist or admin.
        #[arg(long, default_value = "uploader")]
        role: Role,
    },
    /// List accounts.
    List,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Verify the hash chain and its anchor; exit 0 when intact, 1 naming
    /// the first broken record otherwise. Default: the chain in the state
    /// database of `[state]`.
    Verify {
        /// A JSON-lines trail to verify instead of the database's chain
        /// (e.g. `<data_dir>/audit/audit.jsonl`).
        #[arg(long)]
        trail: Option<PathBuf>,
        /// An anchor holding a chain head; for the database's chain,
        /// repeat it to check every gateway's (default `[audit]
        /// anchor_path`, `<data_dir>/audit/sql-chain.anchor`); for a
        /// `--trail`, one (default `<trail>.anchor`).
        #[arg(long, conflicts_with = "no_anchor")]
        anchor: Vec<PathBuf>,
        /// Check the chain alone (a cut tail then goes unnoticed).
        #[arg(long)]
        no_anchor: bool,
    },
    /// Write the events of a verified trail as DICOM PS3.15 A.5 audit
    /// messages or JSON lines.
    Export {
        /// dicom-xml or jsonl.
        #[arg(long)]
        format: relaypacs_storage::audit_export::ExportFormat,
        /// Earliest event time (RFC 3339, inclusive).
        #[arg(long, value_parser = parse_rfc3339)]
        from: Option<time::OffsetDateTime>,
        /// Events from this time on are left out (RFC 3339, exclusive).
        #[arg(long, value_parser = parse_rfc3339)]
        to: Option<time::OffsetDateTime>,
        /// Output file, replaced atomically (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A JSON-lines trail to export instead of the database's chain.
        #[arg(long)]
        trail: Option<PathBuf>,
        /// AuditSourceID of the DICOM messages.
        #[arg(long, default_value = "relaypacs")]
        source_id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A client: no server configuration, no server logs.
    #[cfg(feature = "client")]
    if let Some(Command::Upload(args)) = cli.command {
        return relaypacs_http::client::cli::run(*args);
    }
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RELAYPACS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relaypacs: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config),
        Command::User { command } => match user(config, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("relaypacs: {e}");
                ExitCode::from(1)
            }
        },
        Command::Audit { command } => match audit(&config, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("relaypacs: {e}");
                ExitCode::from(1)
            }
        },
        #[cfg(feature = "client")]
        Command::Upload(_) => ExitCode::from(2), // run above, before the configuration
        Command::Migrate => match migrate(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("relaypacs: {e}");
                ExitCode::from(1)
            }
        },
    }
}

/// `relaypacs migrate`: the embedded migrations, whatever `[state] migrate` says.
fn migrate(config: &Config) -> Result<(), String> {
    let rt = current_thread()?;
    let password = config.state_password().map_err(|e| e.to_string())?;
    let mut options = config.state_options();
    options.migrate = true;
    rt.block_on(async {
        let db = relaypacs_storage::SqlState::connect(
            &config.state_url(),
            password.as_ref().map(secrecy::ExposeSecret::expose_secret),
            &options,
        )
        .await
        .map_err(|e| error_chain(&e))?;
        let version = db.check_schema().await.map_err(|e| error_chain(&e))?;
        println!("{db}: schema at version {version}");
        db.close().await;
        Ok(())
    })
}

fn current_thread() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// The state database for reading the audit chain: never migrated here
/// (the schema must be the server's), never created.
async fn open_state_for_audit(config: &Config) -> Result<relaypacs_storage::SqlState, String> {
    if config.state_is_private() {
        let file = config.data_dir.join("state.db");
        if !file.is_file() {
            return Err(format!(
                "no state database at {} (has the server run with this data folder? \
                 --trail FILE reads a JSON-lines trail)",
                file.display()
            ));
        }
    }
    let password = config.state_password().map_err(|e| e.to_string())?;
    let mut options = config.state_options();
    options.migrate = false;
    options.max_connections = 2;
    relaypacs_storage::SqlState::connect(
        &config.state_url(),
        password.as_ref().map(secrecy::ExposeSecret::expose_secret),
        &options,
    )
    .await
    .map_err(|e| format!("state database: {}", error_chain(&e)))
}

fn serve(config: Config) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relaypacs: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let mut server = match Server::start(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("relaypacs: {}", error_chain(&e));
                return ExitCode::from(2);
            }
        };
        let scheme = if server.is_tls() { "https" } else { "http" };
        eprintln!("relaypacs: listening on {scheme}://{}", server.addr());
        let stop = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return tokio::signal::ctrl_c().await.unwrap_or(()),
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        tokio::select! {
            () = stop => {
                server.shutdown().await;
                ExitCode::SUCCESS
            }
            r = server.wait() => {
                eprintln!("relaypacs: server stopped: {r:?}");
                ExitCode::from(1)
            }
        }
    })
}

fn user(config: Config, command: UserCommand) -> Result<(), String> {
    relaypacs_storage::fs::create_dir_durable(&config.data_dir).map_err(|e| e.to_string())?;
    // The server keeps accounts in memory: refuse to edit them under it.
    let _lock = relaypacs_storage::fs::lock_root(&config.data_dir.join("server"))
        .map_err(|e| format!("{e} (stop the server, or create users with POST /api/v1/users)"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let password = config.state_password().map_err(|e| e.to_string())?;
    let db = rt
        .block_on(relaypacs_storage::SqlState::connect(
            &config.state_url(),
            password.as_ref().map(secrecy::ExposeSecret::expose_secret),
            &config.state_options(),
        ))
        .map_err(|e| e.to_string())?;
    let store = SqlUserStore::new(db);
    match command {
        UserCommand::List => {
            for u in rt.block_on(store.list()).map_err(|e| e.to_string())? {
                println!(
                    "{}\t{}\t{:?}\t{}",
                    u.id,
                    u.username,
                    u.role,
                    if u.disabled { "disabled" } else { "active" }
                );
            }
            Ok(())
        }
        UserCommand::Add { username, role } => {
            check_username(&username).map_err(|e| e.message)?;
            eprintln!("password for {username} (one line on standard input):");
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            let password = line.trim_end_matches(['\r', '\n']).to_string();
            check_policy(&password, &username).map_err(|e| e.to_string())?;
            let a = &config.auth;
            let hasher = Hasher::new(a.argon2_memory_kib, a.argon2_iterations, 1)?;
            let hash = hasher.hash_blocking(&password)?;
            let rec = new_record(&username, role, hash);
            let id = rec.id.clone();
            rt.block_on(store.create(rec)).map_err(|e| e.to_string())?;
            println!("created {username} ({role:?}) with id {id}");
            Ok(())
        }
    }
}

/// An error and its causes, `: `-separated (a storage error keeps its
/// cause, e.g. which anchor a chain lost, in `source()`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

fn parse_rfc3339(s: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time ({e})"))
}

fn audit(config: &Config, command: AuditCommand) -> Result<(), String> {
    use relaypacs_storage::audit_anchor::default_anchor_path;
    use relaypacs_storage::audit_export::{TimeRange, export_events};
    match command {
        AuditCommand::Verify {
            trail: Some(trail),
            anchor,
            no_anchor,
        } => {
            if anchor.len() > 1 {
                return Err("a JSON-lines trail takes one --anchor".into());
            }
            // The anchor is read before the trail: it never runs ahead of the
            // trail, so a server appending meanwhile cannot cause a false alarm.
            let anchor = if no_anchor {
                None
            } else {
                let path = anchor
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| default_anchor_path(&trail));
                Some(read_required_anchor(&path)?)
            };
            let head = relaypacs_storage::verify_trail(&trail, anchor.map(|a| a.head))
                .map_err(|e| format!("{}: {e}", trail.display()))?;
            println!(
                "{}: {} records verified; head sha256 {}",
                trail.display(),
                head.count,
                hex::encode(head.hash)
            );
            if let Some(a) = anchor {
                println!(
                    "anchor: {} records, anchored {}, matches",
                    a.head.count,
                    rfc3339(a.time)
                );
            }
            Ok(())
        }
        AuditCommand::Verify {
            trail: None,
            anchor,
            no_anchor,
        } => {
            // Anchors first (see above), then the chain: one pass over the
            // table, which the server may append to meanwhile (SQLite WAL
            // and PostgreSQL let readers run beside the writer).
            let anchors = if no_anchor {
                Vec::new()
            } else {
                let paths = if anchor.is_empty() {
                    vec![config.audit_anchor_path()]
                } else {
                    anchor
                };
                paths
                    .into_iter()
                    .map(|p| read_required_anchor(&p).map(|a| (p, a)))
                    .collect::<Result<Vec<_>, _>>()?
            };
            let heads: Vec<_> = anchors.iter().map(|(_, a)| a.head).collect();
            current_thread()?.block_on(async {
                let db = open_state_for_audit(config).await?;
                let res = relaypacs_storage::verify_sql_chain_against_all(&db, &heads).await;
                db.close().await;
                let head = res.map_err(|e| format!("audit chain in {db}: {e}"))?;
                println!(
                    "audit chain in {db}: {} records verified; head sha256 {}",
                    head.count,
                    hex::encode(head.hash)
                );
                for (path, a) in &anchors {
                    println!(
                        "anchor {}: {} records, anchored {}, matches",
                        path.display(),
                        a.head.count,
                        rfc3339(a.time)
                    );
                }
                Ok(())
            })
        }
        AuditCommand::Export {
            format,
            from,
            to,
            out,
            trail,
            source_id,
        } => {
            if let (Some(f), Some(t)) = (from, to)
                && f >= t
            {
                return Err("--from must be before --to".into());
            }
            // Only a chain that verifies is exported.
            let events = match trail {
                Some(trail) => {
                    relaypacs_storage::read_verified_events(&trail, None)
                        .map_err(|e| format!("{}: {e}", trail.display()))?
                        .1
                }
                None => current_thread()?.block_on(async {
                    let db = open_state_for_audit(config).await?;
                    let res = relaypacs_storage::read_verified_sql_events(&db).await;
                    db.close().await;
                    res.map(|(_, events)| events)
                        .map_err(|e| format!("audit chain in {db}: {e}"))
                })?,
            };
            let bytes = export_events(&events, TimeRange { from, to }, format, &source_id)
                .map_err(|e| e.to_string())?;
            match out {
                // Crash-safe: temp file + fsync + rename + fsync dir.
                Some(path) => relaypacs_storage::fs::write_atomic(&path, &bytes)
                    .map_err(|e| format!("{}: {e}", path.display())),
                None => {
                    use std::io::Write;
                    std::io::stdout()
                        .lock()
                        .write_all(&bytes)
                        .map_err(|e| format!("standard output: {e}"))
                }
            }
        }
    }
}

/// The anchor at `path`; its absence is an error naming `--no-anchor`.
fn read_required_anchor(
    path: &std::path::Path,
) -> Result<relaypacs_storage::audit_anchor::Anchor, String> {
    let a = relaypacs_storage::audit_anchor::read_anchor(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    a.ok_or_else(|| {
        format!(
            "no anchor at {}: cannot tell whether the chain's tail was cut \
             (--no-anchor checks the chain alone)",
            path.display()
        )
    })
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}
