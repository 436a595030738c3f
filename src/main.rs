//! The `chatd` binary.
//!
//! * `chatd serve` runs the server; every configuration field is a flag
//!   (`--name-with-dashes`) and an environment variable (`CHATD_NAME`), both
//!   generated from `config::FIELDS`, over an optional `--config FILE`.
//! * `chatd token --data DIR --user NAME [--ttl 24h]` mints a token with the
//!   data directory's secret.
//! * `chatd compact --data DIR` rewrites a stopped server's store into
//!   fresh files.
//! * `chatd backup --data DIR --out FILE` writes a consistent backup of the
//!   store, made by the server running on DIR if there is one;
//!   `chatd restore --in FILE --data NEWDIR` makes a store from one.
//! * `chatd config print-default` prints a commented configuration file.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

use chatd::config::{Config, FIELDS, Kind};

/// sled's copy-on-write nodes allocate and free on every insert; mimalloc
/// keeps that off glibc's arena locks (see the `mimalloc` note in Cargo.toml).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `--data DIR` of the subcommands that work on a server's data directory.
fn data_arg() -> Arg {
    Arg::new("data").long("data").env("CHATD_DATA").default_value("./chatd-data").help("The server's data directory")
}

fn cli() -> Command {
    let mut serve = Command::new("serve")
        .about("Run the server")
        .arg(Arg::new("config").long("config").env("CHATD_CONFIG").value_name("FILE").help("TOML configuration file"));
    for f in FIELDS {
        let mut arg = Arg::new(f.name).long(f.flag()).env(f.env()).help(f.doc);
        arg = match f.kind {
            Kind::Bool => arg.action(ArgAction::SetTrue),
            Kind::Int | Kind::Text => arg.value_name("VALUE"),
        };
        if f.name == "cluster_redis" {
            // As the cluster's documentation writes it.
            arg = arg.visible_alias("cluster");
        }
        if matches!(f.name, "token_secret" | "admin_token") {
            arg = arg.hide_env_values(true);
        }
        serve = serve.arg(arg);
    }
    Command::new("chatd")
        .version(env!("CARGO_PKG_VERSION"))
        .about("A binary-protocol, high-throughput chat server")
        .subcommand_required(true)
        .subcommand(serve)
        .subcommand(
            Command::new("token")
                .about("Print a token for a user, signed with the data directory's secret")
                .arg(
                    data_arg()
                        .help("The server's data directory, holding `secret` (created in a new or empty directory)"),
                )
                .arg(Arg::new("user").long("user").required(true).help("User id (the token's sub)"))
                .arg(Arg::new("ttl").long("ttl").default_value("24h").help("Lifetime, e.g. 30m, 24h, 7d")),
        )
        .subcommand(
            Command::new("compact")
                .about(
                    "Rewrite the store into fresh files, leaving behind the bytes of deleted messages \
                     (offline: stop the server first)",
                )
                .arg(data_arg()),
        )
        .subcommand(
            Command::new("backup")
                .about(
                    "Write a consistent backup of the store: made by the server running on the data directory \
                     (it goes on serving), or from the store itself when none runs",
                )
                .arg(data_arg())
                .arg(Arg::new("out").long("out").required(true).value_name("FILE").help("The backup file to write")),
        )
        .subcommand(
            Command::new("restore")
                .about("Make the store of a new data directory from a backup (then `chatd serve --data NEWDIR`)")
                .arg(Arg::new("in").long("in").required(true).value_name("FILE").help("The backup file"))
                .arg(
                    Arg::new("data")
                        .long("data")
                        .required(true)
                        .value_name("NEWDIR")
                        .help("The data directory to restore into; it must hold no store"),
                ),
        )
        .subcommand(
            Command::new("config").about("Configuration helpers").subcommand_required(true).subcommand(
                Command::new("print-default").about("Print a commented configuration file with every default"),
            ),
        )
}

/// The fields given on the command line or in the environment.
fn overrides(m: &ArgMatches) -> anyhow::Result<Vec<(&'static str, toml::Value)>> {
    let mut out = Vec::new();
    for f in FIELDS {
        if !matches!(m.value_source(f.name), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        let value = match f.kind {
            Kind::Bool => toml::Value::Boolean(m.get_flag(f.name)),
            _ => f.parse(m.get_one::<String>(f.name).map(String::as_str).unwrap_or_default())?,
        };
        out.push((f.name, value));
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let matches = cli().get_matches();
    match matches.subcommand() {
        Some(("serve", m)) => {
            let file = m.get_one::<String>("config").map(PathBuf::from);
            let config = Config::build(file.as_deref(), &overrides(m)?)?;
            init_logging(&config);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.worker_threads())
                .enable_all()
                .build()?
                .block_on(serve(config))
        }
        Some(("token", m)) => {
            let data = PathBuf::from(m.get_one::<String>("data").expect("has a default"));
            let user = m.get_one::<String>("user").expect("required");
            let ttl: Duration = chatd::auth::parse_duration(m.get_one::<String>("ttl").expect("has a default"))
                .map_err(anyhow::Error::msg)?;
            anyhow::ensure!(chatd::auth::valid_user_id(user), "user id must be 1-62 characters of A-Z a-z 0-9 _ . -");
            let secret = match std::env::var("CHATD_TOKEN_SECRET") {
                Ok(s) if !s.is_empty() => {
                    eprintln!("chatd token: signed with the secret in CHATD_TOKEN_SECRET");
                    s
                }
                _ => token_secret(&data)?,
            };
            let auth = chatd::auth::Auth::new(secret.as_bytes());
            println!("{}", auth.mint(user, ttl, chatd::auth::unix_now()));
            Ok(())
        }
        Some(("compact", m)) => {
            let data = PathBuf::from(m.get_one::<String>("data").expect("has a default"));
            let store = data.join("store");
            anyhow::ensure!(store.join("db").exists(), "{} holds no chatd store", data.display());
            let (before, after) = chatd::store::sled::compact::compact(&store, 64 << 20)?;
            println!("compacted {}: {before} bytes before, {after} after", store.display());
            Ok(())
        }
        Some(("backup", m)) => {
            let data = PathBuf::from(m.get_one::<String>("data").expect("has a default"));
            let out = PathBuf::from(m.get_one::<String>("out").expect("required"));
            let started = std::time::Instant::now();
            let taken = chatd::net::backup::backup_to_file(&data, &out, 64 << 20)
                .with_context(|| format!("backing up {}", data.display()))?;
            let s = &taken.summary;
            println!(
                "backed up {} ({}) to {}: {} bytes, {} records, {} of them the logs of {} rooms; store format {}, \
                 point at {} ms since the epoch; {:.1} s",
                data.display(),
                if taken.online { "made by the running server" } else { "no server running" },
                out.display(),
                s.bytes,
                s.records,
                s.log_records,
                s.rooms,
                s.format,
                s.at_ms,
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Some(("restore", m)) => {
            let file = PathBuf::from(m.get_one::<String>("in").expect("required"));
            let data = PathBuf::from(m.get_one::<String>("data").expect("required"));
            let mut input =
                std::fs::File::open(&file).with_context(|| format!("opening the backup {}", file.display()))?;
            let s = chatd::store::sled::backup::restore(&mut input, &data.join("store"), 64 << 20)
                .with_context(|| format!("restoring {} into {}", file.display(), data.display()))?;
            println!(
                "restored {} into {}: {} records, {} of them the logs of {} rooms; store format {}, point at {} ms \
                 since the epoch. The token secret is not in a backup: copy the old data directory's `secret` \
                 there to keep issued tokens valid. Serve it with: chatd serve --data {}",
                file.display(),
                data.display(),
                s.records,
                s.log_records,
                s.rooms,
                s.format,
                s.at_ms,
                data.display()
            );
            Ok(())
        }
        Some(("config", _)) => {
            print!("{}", Config::default_file());
            Ok(())
        }
        _ => unreachable!("a subcommand is required"),
    }
}

/// The secret `chatd token` signs with, saying on stderr which file it is:
/// a token signed with another secret than the server's is refused, and
/// nothing else would tell the user why.
///
/// A secret is created only for a data directory that is new or empty (the
/// server will create its store there and use this secret). A directory
/// that holds anything but no secret — a server's store whose secret comes
/// from elsewhere (`token_secret`), or files of something else — gets none.
fn token_secret(data: &std::path::Path) -> anyhow::Result<String> {
    let path = chatd::auth::secret_path(data);
    if path.exists() {
        let secret = chatd::auth::load_or_create_secret(data).with_context(|| format!("reading {}", path.display()))?;
        eprintln!("chatd token: signed with the secret in {}", path.display());
        return Ok(secret);
    }
    let empty = std::fs::read_dir(data).map_or(true, |mut entries| entries.next().is_none());
    anyhow::ensure!(
        empty,
        "{} holds files but no secret, so no chatd server there would accept a token made here. \
         Point --data (or CHATD_DATA) at the server's data directory, or give the server's \
         token_secret in CHATD_TOKEN_SECRET",
        data.display()
    );
    let secret =
        chatd::auth::load_or_create_secret(data).with_context(|| format!("creating a secret in {}", data.display()))?;
    eprintln!(
        "chatd token: created a new secret in {}; only `chatd serve --data {}` accepts this token",
        path.display(),
        data.display()
    );
    Ok(secret)
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    // Colours only for a person at a terminal: a log file or a journal gets
    // plain text (and NO_COLOR is honoured, https://no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if config.log_format == chatd::config::LogFormat::Json {
        builder.json().with_current_span(true).with_span_list(false).init();
    } else {
        builder.init();
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM that arrives while the server starts must
    // still mean a graceful stop, not the default (immediate) termination.
    let signals = Signals::install()?;
    let server = chatd::server::Server::start(&config).await.context("starting chatd")?;
    let tls = server.tls_addr.map(|a| format!(" tls {a}")).unwrap_or_default();
    eprintln!(
        "chatd listening: tcp {} http {}{tls} data {} (durability {})",
        server.tcp_addr,
        server.http_addr,
        config.data.display(),
        config.durability
    );
    signals.wait_for_shutdown(&server).await;
    server.shutdown().await;
    Ok(())
}

/// The signals chatd handles.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for SIGTERM or SIGINT; SIGHUP meanwhile reloads the TLS
    /// certificate.
    async fn wait_for_shutdown(mut self, server: &chatd::server::Server) {
        let Signals { term, int, hup } = &mut self;
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM received");
                    return;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT received");
                    return;
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP received: reloading the TLS certificate");
                    if let Err(e) = server.reload_tls() {
                        tracing::warn!(error = %e, "TLS reload did not happen");
                    }
                }
            }
        }
    }
}
