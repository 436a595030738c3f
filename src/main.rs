//! The `chatd` binary: `chatd serve` runs the server, `chatd token` mints a
//! token with the data directory's secret.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use chatd::config::Config;

#[derive(Parser)]
#[command(name = "chatd", version, about = "A binary-protocol, high-throughput chat server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Print a token for a user, signed with the data directory's secret.
    Token {
        /// Data directory holding `secret` (created if missing).
        #[arg(long, env = "CHATD_DATA", default_value = "./chatd-data")]
        data: PathBuf,
        /// User id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Lifetime, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = chatd::auth::parse_duration)]
        ttl: Duration,
    },
}

/// Flags of `serve`; each overrides the config file and its environment
/// variable overrides the file too.
#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "CHATD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [default: ./chatd-data].
    #[arg(long, env = "CHATD_DATA")]
    data: Option<PathBuf>,
    /// Native protocol listener [default: 0.0.0.0:7400].
    #[arg(long, env = "CHATD_TCP")]
    tcp: Option<std::net::SocketAddr>,
    /// HTTP listener [default: 0.0.0.0:7480]; HTTPS when TLS is on.
    #[arg(long, env = "CHATD_HTTP")]
    http: Option<std::net::SocketAddr>,
    /// Native protocol over TLS [default: 0.0.0.0:7401 when a certificate is given].
    #[arg(long, env = "CHATD_TLS")]
    tls: Option<std::net::SocketAddr>,
    /// PEM certificate chain (enables TLS; SIGHUP reloads it).
    #[arg(long, env = "CHATD_CERT")]
    cert: Option<PathBuf>,
    /// PEM private key: PKCS#8, PKCS#1 or SEC1.
    #[arg(long, env = "CHATD_KEY")]
    key: Option<PathBuf>,
    /// Serve TLS with a self-signed certificate for localhost, generated once
    /// in DATA/tls/.
    #[arg(long, env = "CHATD_DEV_TLS")]
    dev_tls: bool,
    /// Offer TLS 1.3 only (default: TLS 1.3 and 1.2).
    #[arg(long, env = "CHATD_TLS13_ONLY")]
    tls13_only: bool,
    /// fsync | batch | none [default: fsync].
    #[arg(long, env = "CHATD_DURABILITY")]
    durability: Option<String>,
    /// Publishes per user per minute; 0 turns the limit off [default: 240].
    #[arg(long, env = "CHATD_PUBLISH_RATE")]
    publish_rate: Option<u32>,
    /// Largest frame in bytes [default: 65536].
    #[arg(long, env = "CHATD_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    /// Development login: the web client can mint a token for any name.
    /// Refused unless the HTTP listener is on a loopback address.
    #[arg(long, env = "CHATD_DEV_AUTH")]
    dev_auth: bool,
    /// Serve the web client from this directory (e.g. clients/web) instead
    /// of the copy built into the binary: edit and reload, no rebuild.
    #[arg(long, env = "CHATD_WEB_DIR")]
    web_dir: Option<PathBuf>,
    /// Token secret (instead of DATA/secret).
    #[arg(long, env = "CHATD_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
}

impl ServeArgs {
    fn config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        if let Some(v) = self.data {
            c.data = v;
        }
        if let Some(v) = self.tcp {
            c.tcp = v;
        }
        if let Some(v) = self.http {
            c.http = v;
        }
        if let Some(v) = self.tls {
            c.tls = Some(v);
        }
        if let Some(v) = self.cert {
            c.cert = Some(v);
        }
        if let Some(v) = self.key {
            c.key = Some(v);
        }
        if self.dev_tls {
            c.dev_tls = true;
        }
        if self.tls13_only {
            c.tls13_only = true;
        }
        if let Some(v) = self.durability {
            c.durability = v;
        }
        if let Some(v) = self.publish_rate {
            c.publish_rate = v;
        }
        if let Some(v) = self.max_frame_bytes {
            c.max_frame_bytes = v;
        }
        if let Some(v) = self.web_dir {
            c.web_dir = Some(v);
        }
        if self.dev_auth {
            c.dev_auth = true;
        }
        if let Some(v) = self.token_secret {
            c.token_secret = Some(v);
        }
        c.validate()?;
        Ok(c)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Token { data, user, ttl } => {
            anyhow::ensure!(chatd::auth::valid_user_id(&user), "user id must be 1-62 characters of A-Z a-z 0-9 _ . -");
            let secret = match std::env::var("CHATD_TOKEN_SECRET") {
                Ok(s) if !s.is_empty() => s,
                _ => chatd::auth::load_or_create_secret(&data)
                    .with_context(|| format!("reading the secret in {}", data.display()))?,
            };
            let auth = chatd::auth::Auth::new(secret.as_bytes());
            println!("{}", auth.mint(&user, ttl, chatd::auth::unix_now()));
            Ok(())
        }
        Command::Serve(args) => {
            let config = args.config()?;
            init_logging();
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(config))
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let server = chatd::server::Server::start(&config).await.context("starting chatd")?;
    let tls = server.tls_addr.map(|a| format!(" tls {a}")).unwrap_or_default();
    eprintln!(
        "chatd listening: tcp {} http {}{tls} data {} (durability {})",
        server.tcp_addr,
        server.http_addr,
        config.data.display(),
        config.durability
    );
    wait_for_shutdown(&server).await?;
    server.shutdown().await;
    Ok(())
}

/// Waits for SIGTERM or SIGINT; SIGHUP meanwhile reloads the TLS certificate.
async fn wait_for_shutdown(server: &chatd::server::Server) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM received");
                return Ok(());
            }
            _ = int.recv() => {
                tracing::info!("SIGINT received");
                return Ok(());
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
