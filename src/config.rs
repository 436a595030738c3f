//! Configuration: one serde [`Config`] with documented defaults (design.md
//! §6). Precedence, highest first: command-line flag, environment variable
//! (`CHATD_...`), TOML file (`--config`), built-in default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::delivery::OutboundLimits;
use crate::hub::Limits;
use crate::store::commit::Durability;

/// Everything `chatd serve` can be told.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Data directory (sled store and the token secret).
    pub data: PathBuf,
    /// Native protocol listener (length-framed protobuf over TCP).
    pub tcp: SocketAddr,
    /// HTTP listener (WebSocket, web client, health); HTTPS when TLS is on.
    pub http: SocketAddr,
    /// Native protocol over TLS; on by default (0.0.0.0:7401) when a
    /// certificate is configured.
    pub tls: Option<SocketAddr>,
    /// PEM certificate chain for TLS.
    pub cert: Option<PathBuf>,
    /// PEM private key for TLS (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// Generate (once) a self-signed certificate for localhost in the data
    /// directory and serve TLS with it.
    pub dev_tls: bool,
    /// Offer TLS 1.3 only (default: 1.3 and 1.2).
    pub tls13_only: bool,
    /// HMAC secret for tokens; default: the `secret` file in the data dir.
    pub token_secret: Option<String>,
    /// `fsync` (ack after group commit + fdatasync), `batch`, or `none`.
    pub durability: String,
    /// With `durability = "batch"`: milliseconds between syncs.
    pub batch_sync_ms: u64,
    /// sled page cache in MiB.
    pub cache_mb: u64,
    /// Writes the group commit may have queued before publishers wait.
    pub commit_queue: usize,
    /// Threads serving connections; 0: one per core but one (at least 1).
    pub workers: usize,
    /// Largest frame, in bytes.
    pub max_frame_bytes: usize,
    /// Time allowed for `Hello`, in ms.
    pub handshake_timeout_ms: u64,
    /// Silence before `GoAway{IDLE_TIMEOUT}`, in ms.
    pub idle_timeout_ms: u64,
    /// Advertised heartbeat interval, in ms.
    pub heartbeat_ms: u64,
    /// Most messages replayed per resume cursor.
    pub replay_limit: u64,
    /// Publishes per user per minute; 0 turns the limit off.
    pub publish_rate: u32,
    /// Burst of the publish rate limit.
    pub publish_burst: u32,
    /// Publishes one session may have awaiting their ack.
    pub max_inflight_publishes: usize,
    /// Outbound queue bound, in frames.
    pub outbound_max_frames: usize,
    /// Outbound queue bound, in bytes.
    pub outbound_max_bytes: usize,
    /// How long a session may stay behind before `GoAway{SLOW_CONSUMER}`, in ms.
    pub slow_consumer_timeout_ms: u64,
    /// Sessions per user.
    pub max_sessions_per_user: usize,
    /// Rooms per user.
    pub max_rooms_per_user: usize,
    /// Open connections before new ones get `GoAway{CAPACITY}`.
    pub max_connections: usize,
    /// Idempotency keys are kept at least this long, in hours.
    pub idempotency_hours: u64,
    /// Time allowed for a graceful shutdown, in ms.
    pub shutdown_timeout_ms: u64,
    /// Development login at `POST /dev/token?user=NAME` (loopback HTTP only).
    pub dev_auth: bool,
    /// Serve the web client from this directory instead of the built-in copy.
    pub web_dir: Option<PathBuf>,
    /// Bearer token for `/admin/...`; unset: the admin endpoints are off.
    pub admin_token: Option<String>,
    /// `text` (human-readable) or `json` logs.
    pub log_format: String,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or
    /// `chatd=debug`); `RUST_LOG` takes precedence.
    pub log_level: String,
}

impl Default for Config {
    fn default() -> Self {
        let l = Limits::default();
        Config {
            data: PathBuf::from("./chatd-data"),
            tcp: "0.0.0.0:7400".parse().expect("valid"),
            http: "0.0.0.0:7480".parse().expect("valid"),
            tls: None,
            cert: None,
            key: None,
            dev_tls: false,
            tls13_only: false,
            token_secret: None,
            durability: "fsync".into(),
            batch_sync_ms: 10,
            cache_mb: 128,
            commit_queue: 16384,
            workers: 0,
            max_frame_bytes: l.max_frame_bytes,
            handshake_timeout_ms: l.handshake_timeout.as_millis() as u64,
            idle_timeout_ms: l.idle_timeout.as_millis() as u64,
            heartbeat_ms: l.heartbeat.as_millis() as u64,
            replay_limit: l.replay_limit,
            publish_rate: l.publish_rate_per_min,
            publish_burst: l.publish_burst,
            max_inflight_publishes: l.max_inflight_publishes,
            outbound_max_frames: l.outbound.max_frames,
            outbound_max_bytes: l.outbound.max_bytes,
            slow_consumer_timeout_ms: l.slow_consumer_timeout.as_millis() as u64,
            max_sessions_per_user: l.max_sessions_per_user,
            max_rooms_per_user: l.max_rooms_per_user,
            max_connections: l.max_connections,
            idempotency_hours: 24,
            shutdown_timeout_ms: 10_000,
            dev_auth: false,
            web_dir: None,
            admin_token: None,
            log_format: "text".into(),
            log_level: "info".into(),
        }
    }
}

/// Most connection threads `workers` may ask for.
const MAX_WORKERS: usize = 1024;

/// A configuration that cannot be used; the message names the field.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads a TOML file; missing fields take their defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// Threads for the connection runtime: `workers`, or with 0 one per
    /// core but one. The group commit's writes and syncs (on tokio's
    /// blocking pool; with `none` or `batch`, small batches are written on a
    /// worker) and sled's I/O threads are busy whenever messages flow and
    /// run beside the workers; leaving them a core measured +13% in fan-out
    /// with `fsync` and +30% with `none` on a 2-core machine
    /// (benches/README.md, fifth session), where 2 workers preempted the
    /// writer and woke each other for every delivery.
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
            n => n,
        }
    }

    /// The durability mode.
    pub fn durability(&self) -> Result<Durability, ConfigError> {
        match self.durability.as_str() {
            "fsync" => Ok(Durability::Fsync),
            "batch" => Ok(Durability::Batch { interval: Duration::from_millis(self.batch_sync_ms.max(1)) }),
            "none" => Ok(Durability::None),
            other => Err(ConfigError(format!("durability: {other:?} is not one of fsync, batch, none"))),
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.durability()?;
        let positive = [
            ("max_frame_bytes", self.max_frame_bytes as u64),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("max_inflight_publishes", self.max_inflight_publishes as u64),
            ("outbound_max_frames", self.outbound_max_frames as u64),
            ("outbound_max_bytes", self.outbound_max_bytes as u64),
            ("commit_queue", self.commit_queue as u64),
            ("cache_mb", self.cache_mb),
            ("max_sessions_per_user", self.max_sessions_per_user as u64),
            ("max_rooms_per_user", self.max_rooms_per_user as u64),
            ("max_connections", self.max_connections as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ConfigError(format!("{name} must be greater than 0")));
            }
        }
        if self.workers > MAX_WORKERS {
            return Err(ConfigError(format!("workers must be at most {MAX_WORKERS} (0: one per core less one)")));
        }
        // A queue must be able to fall below half full for a lagging session
        // to catch up (`Outbound::has_room_for_live`).
        if self.outbound_max_frames < 2 || self.outbound_max_bytes < 2 {
            return Err(ConfigError("outbound_max_frames and outbound_max_bytes must be at least 2".into()));
        }
        if !(256..=16 << 20).contains(&self.max_frame_bytes) {
            return Err(ConfigError("max_frame_bytes must be between 256 and 16777216".into()));
        }
        if self.heartbeat_ms == 0 {
            return Err(ConfigError("heartbeat_ms must be greater than 0".into()));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(ConfigError("cert and key: give both, or neither".into()));
        }
        if self.dev_tls && self.cert.is_some() {
            return Err(ConfigError("dev_tls: not with cert/key (it generates its own certificate)".into()));
        }
        if self.tls.is_some() && self.cert.is_none() && !self.dev_tls {
            return Err(ConfigError("tls: a TLS listener needs cert and key, or dev_tls".into()));
        }
        if let Some(t) = &self.admin_token
            && t.len() < 16
        {
            return Err(ConfigError("admin_token must be at least 16 characters".into()));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError(format!("log_format: {:?} is not one of text, json", self.log_format)));
        }
        if let Some(s) = &self.token_secret
            && s.len() < 32
        {
            return Err(ConfigError("token_secret must be at least 32 bytes".into()));
        }
        Ok(())
    }

    /// Whether TLS is configured.
    pub fn tls_enabled(&self) -> bool {
        self.cert.is_some() || self.dev_tls
    }

    /// The TLS listener's address, when TLS is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_enabled().then(|| self.tls.unwrap_or_else(|| "0.0.0.0:7401".parse().expect("valid")))
    }

    /// The session limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_bytes: self.max_frame_bytes,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            replay_limit: self.replay_limit,
            publish_rate_per_min: self.publish_rate,
            publish_burst: self.publish_burst.max(1),
            max_inflight_publishes: self.max_inflight_publishes,
            outbound: OutboundLimits { max_frames: self.outbound_max_frames, max_bytes: self.outbound_max_bytes },
            slow_consumer_timeout: Duration::from_millis(self.slow_consumer_timeout_ms),
            max_sessions_per_user: self.max_sessions_per_user,
            max_rooms_per_user: self.max_rooms_per_user,
            max_connections: self.max_connections,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_design() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.tcp.port(), 7400);
        assert_eq!(c.http.port(), 7480);
        assert_eq!(c.durability().unwrap(), Durability::Fsync);
        assert_eq!(c.max_frame_bytes, 65536);
        assert_eq!(c.publish_rate, 240);
    }

    #[test]
    fn a_file_overrides_defaults_and_bad_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "durability = \"none\"\npublish_rate = 0\n").unwrap();
        let c = Config::from_file(&p).unwrap();
        assert_eq!(c.durability().unwrap(), Durability::None);
        assert_eq!(c.publish_rate, 0);
        std::fs::write(&p, "no_such_field = 1\n").unwrap();
        assert!(Config::from_file(&p).unwrap_err().to_string().contains("no_such_field"));
        std::fs::write(&p, "durability = \"sometimes\"\n").unwrap();
        assert!(Config::from_file(&p).unwrap().validate().unwrap_err().to_string().contains("durability"));
    }
}

/// How a field's value is written in TOML (and parsed from a flag or an
/// environment variable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A string (also paths and socket addresses).
    Text,
    /// A whole number.
    Int,
    /// true or false.
    Bool,
}

/// One configuration field: its name (TOML key; flag `--name-with-dashes`;
/// variable `CHATD_NAME`), kind, and what it does.
pub struct Field {
    /// TOML key.
    pub name: &'static str,
    /// Value kind.
    pub kind: Kind,
    /// One line of documentation.
    pub doc: &'static str,
    /// For a field unset by default: a value to show, commented out, in
    /// `config print-default` (a TOML value).
    pub example: Option<&'static str>,
}

const fn field(name: &'static str, kind: Kind, doc: &'static str) -> Field {
    Field { name, kind, doc, example: None }
}

impl Field {
    /// The same field with an example value for `print-default`.
    const fn example(self, value: &'static str) -> Field {
        Field { example: Some(value), ..self }
    }
}

/// Every field of [`Config`], in the order `print-default` writes them. A
/// test checks that this table and the struct agree.
pub const FIELDS: &[Field] = &[
    field("data", Kind::Text, "Data directory: the sled store and the token secret."),
    field("tcp", Kind::Text, "Native protocol listener (length-framed protobuf over TCP)."),
    field(
        "http",
        Kind::Text,
        "HTTP listener: WebSocket /ws, web client, /metrics, /healthz, /readyz, /admin; HTTPS when TLS is on.",
    ),
    field("tls", Kind::Text, "Native protocol over TLS; default 0.0.0.0:7401 when a certificate is configured.")
        .example("\"0.0.0.0:7401\""),
    field("cert", Kind::Text, "PEM certificate chain; enables TLS (SIGHUP or POST /admin/tls/reload re-reads it).")
        .example("\"/etc/chatd/fullchain.pem\""),
    field("key", Kind::Text, "PEM private key: PKCS#8, PKCS#1 or SEC1.").example("\"/etc/chatd/privkey.pem\""),
    field("dev_tls", Kind::Bool, "Serve TLS with a self-signed localhost certificate generated once in DATA/tls."),
    field("tls13_only", Kind::Bool, "Offer TLS 1.3 only (default: 1.3 and 1.2)."),
    field("token_secret", Kind::Text, "HMAC secret for tokens (at least 32 bytes); default: the text in DATA/secret.")
        .example("\"64 hex characters, or any text of 32 bytes or more\""),
    field(
        "durability",
        Kind::Text,
        "fsync (ack after group commit + fdatasync), batch (ack after write, sync every batch_sync_ms), none (benchmarks only).",
    ),
    field("batch_sync_ms", Kind::Int, "With durability = \"batch\": milliseconds between syncs."),
    field("cache_mb", Kind::Int, "sled page cache, MiB."),
    field("commit_queue", Kind::Int, "Writes queued for the group commit before publishers wait."),
    field(
        "workers",
        Kind::Int,
        "Threads serving connections; 0: one per core, less one for the group commit and storage I/O (at least 1).",
    ),
    field("max_frame_bytes", Kind::Int, "Largest frame or WebSocket message, bytes."),
    field("handshake_timeout_ms", Kind::Int, "Time allowed for the TLS handshake and for Hello."),
    field("idle_timeout_ms", Kind::Int, "Silence before GoAway{IDLE_TIMEOUT}; a Ping is sent after half of it."),
    field("heartbeat_ms", Kind::Int, "Heartbeat interval advertised in Welcome."),
    field("replay_limit", Kind::Int, "Most messages replayed per resume cursor (then Synced{complete: false})."),
    field("publish_rate", Kind::Int, "Publishes per user per minute; 0 turns the limit off."),
    field("publish_burst", Kind::Int, "Burst of the publish rate limit."),
    field("max_inflight_publishes", Kind::Int, "Publishes one session may have awaiting their ack."),
    field("outbound_max_frames", Kind::Int, "Per-connection outbound queue bound, frames."),
    field("outbound_max_bytes", Kind::Int, "Per-connection outbound queue bound, bytes."),
    field("slow_consumer_timeout_ms", Kind::Int, "How long a session may stay behind before GoAway{SLOW_CONSUMER}."),
    field("max_sessions_per_user", Kind::Int, "Sessions one user may have open."),
    field("max_rooms_per_user", Kind::Int, "Rooms one user may be a member of."),
    field("max_connections", Kind::Int, "Open connections (all transports) before new ones get GoAway{CAPACITY}."),
    field("idempotency_hours", Kind::Int, "How long a client_msg_id is remembered (at least 24 h is promised)."),
    field("shutdown_timeout_ms", Kind::Int, "Deadline of a graceful shutdown."),
    field(
        "dev_auth",
        Kind::Bool,
        "Development login POST /dev/token?user=NAME; refused unless http is a loopback address.",
    ),
    field("web_dir", Kind::Text, "Serve the web client from this directory instead of the built-in copy.")
        .example("\"clients/web\""),
    field(
        "admin_token",
        Kind::Text,
        "Bearer token for /admin/... (at least 16 characters); unset: admin endpoints are off.",
    )
    .example("\"a long random string\""),
    field("log_format", Kind::Text, "Logs as text (human-readable) or json."),
    field(
        "log_level",
        Kind::Text,
        "Log filter in tracing syntax, e.g. info or chatd=debug; RUST_LOG takes precedence.",
    ),
];

impl Field {
    /// The command-line flag.
    pub fn flag(&self) -> String {
        self.name.replace('_', "-")
    }

    /// The environment variable.
    pub fn env(&self) -> String {
        format!("CHATD_{}", self.name.to_uppercase())
    }

    /// Parses a flag's or variable's text into this field's TOML value.
    pub fn parse(&self, text: &str) -> Result<toml::Value, ConfigError> {
        match self.kind {
            Kind::Text => Ok(toml::Value::String(text.to_string())),
            Kind::Int => text
                .trim()
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|_| ConfigError(format!("{}: {text:?} is not a whole number", self.name))),
            Kind::Bool => match text.trim() {
                "true" | "1" | "yes" | "on" => Ok(toml::Value::Boolean(true)),
                "false" | "0" | "no" | "off" => Ok(toml::Value::Boolean(false)),
                _ => Err(ConfigError(format!("{}: {text:?} is not true or false", self.name))),
            },
        }
    }
}

impl Config {
    /// Builds the configuration from a TOML file (if any) and `overrides`
    /// (field name → value, from flags and environment), then validates it.
    pub fn build(file: Option<&Path>, overrides: &[(&'static str, toml::Value)]) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| ConfigError(format!("cannot read {}: {e}", p.display())))?;
                toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError(format!("{}: {e}", p.display())))?
            }
            None => toml::Table::new(),
        };
        for (name, value) in overrides {
            table.insert(name.to_string(), value.clone());
        }
        // Parsed from text, the error quotes the offending line, key included.
        let text = toml::to_string(&table).map_err(|e| ConfigError(e.to_string()))?;
        let config: Config = toml::from_str(&text).map_err(|e| {
            let origin = file.map(|p| format!("{} (with flags and environment)", p.display()));
            ConfigError(format!("{}: {e}", origin.unwrap_or_else(|| "flags and environment".into())))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// A commented TOML file with every field at its default (optional
    /// fields commented out).
    pub fn default_file() -> String {
        let defaults = toml::Table::try_from(Config::default()).expect("the defaults serialize");
        let mut out = String::from(
            "# chatd configuration. Every field can also be set with a flag (--name-with-dashes)\n\
             # or an environment variable (CHATD_NAME); flags beat the environment, which beats\n\
             # this file. Values shown are the defaults.\n",
        );
        for f in FIELDS {
            out.push_str(&format!("\n# {}\n", f.doc));
            match defaults.get(f.name) {
                Some(v) => out.push_str(&format!("{} = {v}\n", f.name)),
                None => {
                    let example = f.example.expect("a field unset by default has an example");
                    out.push_str(&format!("# (unset by default)\n# {} = {example}\n", f.name));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod fields {
    use super::*;

    #[test]
    fn the_field_table_matches_the_struct() {
        let full = Config {
            tls: Some("127.0.0.1:1".parse().unwrap()),
            cert: Some("c".into()),
            key: Some("k".into()),
            token_secret: Some("s".into()),
            web_dir: Some("w".into()),
            admin_token: Some("a".into()),
            ..Config::default()
        };
        let table = toml::Table::try_from(full).unwrap();
        let mut keys: Vec<&str> = table.keys().map(|k| k.as_str()).collect();
        let mut names: Vec<&str> = FIELDS.iter().map(|f| f.name).collect();
        keys.sort_unstable();
        names.sort_unstable();
        assert_eq!(keys, names);
        for f in FIELDS {
            let kind = match &table[f.name] {
                toml::Value::Integer(_) => Kind::Int,
                toml::Value::Boolean(_) => Kind::Bool,
                _ => Kind::Text,
            };
            assert_eq!(kind, f.kind, "{}", f.name);
        }
    }

    #[test]
    fn the_printed_default_file_is_the_defaults() {
        let text = Config::default_file();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chatd.toml");
        std::fs::write(&p, &text).unwrap();
        let c = Config::build(Some(&p), &[]).unwrap();
        assert_eq!(format!("{c:?}"), format!("{:?}", Config::default()));
        for f in FIELDS {
            assert!(text.contains(f.doc), "{} is documented", f.name);
        }
        // Every field unset by default shows an example value, commented
        // out, of the field's kind.
        for f in FIELDS.iter().filter(|f| f.example.is_some()) {
            let line = text.lines().find(|l| l.starts_with(&format!("# {} = ", f.name))).expect("an example line");
            let value = line.split_once(" = ").unwrap().1;
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}")).unwrap().remove("v").unwrap();
            assert!(matches!((f.kind, parsed), (Kind::Text, toml::Value::String(s)) if !s.is_empty()), "{line:?}");
        }
    }

    #[test]
    fn overrides_beat_the_file_and_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chatd.toml");
        std::fs::write(&p, "publish_rate = 10\nidle_timeout_ms = 1000\n").unwrap();
        let rate = FIELDS.iter().find(|f| f.name == "publish_rate").unwrap();
        let c = Config::build(Some(&p), &[("publish_rate", rate.parse("0").unwrap())]).unwrap();
        assert_eq!((c.publish_rate, c.idle_timeout_ms), (0, 1000));
        assert!(rate.parse("lots").unwrap_err().to_string().contains("publish_rate"));
        std::fs::write(&p, "idle_timeout_ms = \"soon\"\n").unwrap();
        let err = Config::build(Some(&p), &[]).unwrap_err().to_string();
        assert!(err.contains("idle_timeout_ms"), "{err}");
        let err = Config::build(None, &[("log_format", toml::Value::String("xml".into()))]).unwrap_err().to_string();
        assert!(err.contains("log_format"), "{err}");
    }

    #[test]
    fn workers_default_to_one_core_less_and_an_explicit_count_is_kept() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let auto = Config::default().worker_threads();
        assert_eq!(auto, cores.saturating_sub(1).max(1));
        let c = Config::build(None, &[("workers", toml::Value::Integer(3))]).unwrap();
        assert_eq!(c.worker_threads(), 3);
        let err = Config::build(None, &[("workers", toml::Value::Integer(100_000))]).unwrap_err();
        assert!(err.to_string().contains("workers must be at most"), "{err}");
    }

    #[test]
    fn an_outbound_queue_too_small_to_drain_below_half_is_refused() {
        for field in ["outbound_max_frames", "outbound_max_bytes"] {
            let err = Config::build(None, &[(field, toml::Value::Integer(1))]).unwrap_err();
            assert!(err.to_string().contains("must be at least 2"), "{field}: {err}");
        }
    }
}
