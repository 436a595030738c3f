//! Configuration: one serde [`Config`] with documented defaults
//! (ARCHITECTURE.md, "Operations"). Precedence, highest first: command-line
//! flag, environment variable (`CHATD_...`), TOML file (`--config`),
//! built-in default.
//!
//! Every field is declared once, in the [`config!`] invocation below: its
//! doc line, type, default, and what makes its value valid. The struct, its
//! `Default`, the table behind `config print-default`, the flags and
//! environment variables (`main.rs`) and the per-field checks of
//! [`Config::validate`] all come from that declaration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::delivery::OutboundLimits;
use crate::hub::Limits;
use crate::store::commit::Durability;

/// When a publish is acknowledged (`durability`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    /// After the group commit is written and fdatasync'ed.
    Fsync,
    /// After the write; synced every `batch_sync_ms`.
    Batch,
    /// Never synced explicitly (benchmarks only).
    None,
}

/// How much chatd asks of the cluster's Redis (`cluster_durability`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterDurability {
    /// `appendonly yes` and `appendfsync always`, or chatd refuses to start.
    Strict,
    /// Whatever Redis does; a warning at start and in `/metrics`.
    Relaxed,
}

impl std::fmt::Display for ClusterDurability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClusterDurability::Strict => "strict",
            ClusterDurability::Relaxed => "relaxed",
        })
    }
}

/// How logs are written (`log_format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// How a field's value is written in TOML (and parsed from a flag or an
/// environment variable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A string (also paths, socket addresses and named choices).
    Text,
    /// A whole number.
    Int,
    /// true or false.
    Bool,
}

/// The [`Kind`] of a field's type.
trait FieldType {
    const KIND: Kind;
}

macro_rules! field_types {
    ($kind:ident: $($t:ty),*) => { $(impl FieldType for $t { const KIND: Kind = Kind::$kind; })* };
}
field_types!(Text: PathBuf, SocketAddr, String, DurabilityMode, ClusterDurability, LogFormat);
field_types!(Int: u32, u64, usize);
field_types!(Bool: bool);

impl<T: FieldType> FieldType for Option<T> {
    const KIND: Kind = T::KIND;
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

/// Declares every field once: doc line, name, type, default, then
/// optionally `example "TOML value"` (for a field unset by default) and
/// `check EXPR` (a function of `&value` from [`check`]).
macro_rules! config {
    ($(
        #[doc = $doc:literal]
        $name:ident : $ty:ty = $default:expr
        $(, example $example:literal)?
        $(, check $check:expr)?
        ;
    )*) => {
        /// Everything `chatd serve` can be told.
        #[derive(Clone, Debug, Deserialize, Serialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $(#[doc = $doc] pub $name: $ty,)*
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $($name: $default,)* }
            }
        }

        /// Every field of [`Config`], in the order `print-default` writes them.
        pub const FIELDS: &[Field] = &[$(
            Field {
                name: stringify!($name),
                kind: <$ty as FieldType>::KIND,
                doc: $doc.trim_ascii(),
                example: config!(@example $($example)?),
            },
        )*];

        impl Config {
            /// The checks declared with the fields, in declaration order.
            fn check_fields(&self) -> Result<(), ConfigError> {
                $($(
                    let check: &dyn Fn(&$ty) -> Result<(), String> = &$check;
                    check(&self.$name).map_err(|e| ConfigError(format!("{} {e}", stringify!($name))))?;
                )?)*
                Ok(())
            }
        }
    };
    (@example $example:literal) => { Some($example) };
    (@example) => { None };
}

config! {
    /// Data directory: the sled store and the token secret.
    data: PathBuf = PathBuf::from("./chatd-data");
    /// Native protocol listener (length-framed protobuf over TCP).
    tcp: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 7400));
    /// HTTP listener: WebSocket /ws, web client, /metrics, /healthz, /readyz, /admin; HTTPS when TLS is on.
    http: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 7480));
    /// Native protocol over TLS; default 0.0.0.0:7401 when a certificate is configured.
    tls: Option<SocketAddr> = None, example "\"0.0.0.0:7401\"";
    /// PEM certificate chain; enables TLS (SIGHUP or POST /admin/tls/reload re-reads it).
    cert: Option<PathBuf> = None, example "\"/etc/chatd/fullchain.pem\"";
    /// PEM private key: PKCS#8, PKCS#1 or SEC1.
    key: Option<PathBuf> = None, example "\"/etc/chatd/privkey.pem\"";
    /// Serve TLS with a self-signed localhost certificate generated once in DATA/tls.
    dev_tls: bool = false;
    /// Offer TLS 1.3 only (default: 1.3 and 1.2).
    tls13_only: bool = false;
    /// HMAC secret for tokens (at least 32 bytes); default: the text in DATA/secret.
    token_secret: Option<String> = None,
        example "\"64 hex characters, or any text of 32 bytes or more\"", check check::min_len(32);
    /// fsync (ack after group commit + fdatasync), batch (ack after write, sync every batch_sync_ms), none (benchmarks only).
    durability: DurabilityMode = DurabilityMode::Fsync;
    /// With durability = "batch": milliseconds between syncs (0 is taken for 1).
    batch_sync_ms: u64 = 10;
    /// sled page cache, MiB.
    cache_mb: u64 = 128, check check::at_least(1);
    /// Writes queued for the group commit before publishers wait.
    commit_queue: usize = 16384, check check::at_least(1);
    /// Threads serving connections; 0: one per core, less one for the group commit and storage I/O (at least 1).
    workers: usize = 0, check check::at_most(MAX_WORKERS);
    /// Largest frame or WebSocket message, bytes.
    max_frame_bytes: usize = Limits::default().max_frame_bytes, check check::between(256, 16 << 20);
    /// Time allowed for the TLS handshake and for Hello.
    handshake_timeout_ms: u64 = millis(Limits::default().handshake_timeout), check check::at_least(1);
    /// Silence before GoAway{IDLE_TIMEOUT}; a Ping is sent after half of it.
    idle_timeout_ms: u64 = millis(Limits::default().idle_timeout), check check::at_least(1);
    /// Heartbeat interval advertised in Welcome.
    heartbeat_ms: u64 = millis(Limits::default().heartbeat), check check::at_least(1);
    /// Most messages replayed per resume cursor (then Synced{complete: false}).
    replay_limit: u64 = Limits::default().replay_limit;
    /// Publishes per user per minute; 0 turns the limit off.
    publish_rate: u32 = Limits::default().publish_rate_per_min;
    /// Burst of the publish rate limit.
    publish_burst: u32 = Limits::default().publish_burst;
    /// Publishes one session may have awaiting their ack.
    max_inflight_publishes: usize = Limits::default().max_inflight_publishes, check check::at_least(1);
    /// Per-connection outbound queue bound, frames (at least 2: a lagging session catches up below half).
    outbound_max_frames: usize = Limits::default().outbound.max_frames, check check::at_least(2);
    /// Per-connection outbound queue bound, bytes (at least 2: a lagging session catches up below half).
    outbound_max_bytes: usize = Limits::default().outbound.max_bytes, check check::at_least(2);
    /// How long a session may stay behind before GoAway{SLOW_CONSUMER}.
    slow_consumer_timeout_ms: u64 = millis(Limits::default().slow_consumer_timeout);
    /// Sessions one user may have open.
    max_sessions_per_user: usize = Limits::default().max_sessions_per_user, check check::at_least(1);
    /// Rooms one user may be a member of.
    max_rooms_per_user: usize = Limits::default().max_rooms_per_user, check check::at_least(1);
    /// Open connections (all transports) before new ones get GoAway{CAPACITY}.
    max_connections: usize = Limits::default().max_connections, check check::at_least(1);
    /// Join of an unknown room creates it (public, the joiner its owner); false: NOT_FOUND, rooms come from CreateRoom.
    auto_create_rooms: bool = Limits::default().auto_create_rooms;
    /// Pending invitations one user may have; one more is refused with CONFLICT.
    max_pending_invites_per_user: usize = Limits::default().max_pending_invites_per_user, check check::at_least(1);
    /// Different reaction keys one message may carry; a reaction with one more is refused with CONFLICT.
    max_reaction_keys: usize = Limits::default().max_reaction_keys, check check::at_least(1);
    /// How long a client_msg_id is remembered (at least 24 h is promised).
    idempotency_hours: u64 = 24;
    /// Remove messages older than this from every room that sets no limit of its own, e.g. "30d", "12h", "90m", "45s"; "" keeps them.
    retention_max_age: String = String::new(), check check::age();
    /// Keep at most this many newest messages in every room that sets no limit of its own; 0 keeps them all.
    retention_max_messages: u64 = 0;
    /// How often retention trims the rooms, ms.
    retention_interval_ms: u64 = 60_000, check check::at_least(10);
    /// Deadline of a graceful shutdown.
    shutdown_timeout_ms: u64 = 10_000;
    /// Development login POST /dev/token?user=NAME; refused unless http is a loopback address.
    dev_auth: bool = false;
    /// Serve the web client from this directory instead of the built-in copy.
    web_dir: Option<PathBuf> = None, example "\"clients/web\"";
    /// Bearer token for /admin/... (at least 16 characters); unset: admin endpoints are off.
    admin_token: Option<String> = None, example "\"a long random string\"", check check::min_len(16);
    /// Bearer key of the server API /api/v1/ (at least 16 characters); unset (and no api_key_file): every /api/ path is 404.
    api_key: Option<String> = None, example "\"a long random key for the app's backend\"", check check::min_len(16);
    /// A file holding the server API key (its first line), instead of api_key.
    api_key_file: Option<PathBuf> = None, example "\"/etc/chatd/api_key\"";
    /// The API key's name in logs.
    api_key_name: String = "backend".into();
    /// Server API calls per second for the key (bucket of as many), then 429 with Retry-After.
    api_rate_per_sec: u32 = 10_000, check check::at_least(1);
    /// Cluster mode: share rooms with other nodes through this Redis: redis://HOST:PORT, or a comma-separated list or redis+cluster://H:P,H:P for a Redis Cluster; unset: one node on its own store.
    cluster_redis: Option<String> = None, example "\"redis://10.0.0.5:6379\"", check check::cluster_target();
    /// Cluster mode: strict (refuse to start unless Redis has appendonly yes and appendfsync always) or relaxed (warn).
    cluster_durability: ClusterDurability = ClusterDurability::Strict;
    /// Cluster mode: Redis replicas that must have each append (WAIT) before it is acknowledged.
    cluster_replicas: u32 = 0;
    /// Cluster mode: a node's presence entries hold this long unless renewed (every third of it); a crashed node's users go offline within about this.
    cluster_presence_ttl_ms: u64 = 15_000, check check::at_least(300);
    /// Cluster mode: a room with no session on the node for this long stops being served there, and its replica is dropped from memory (read again from Redis when next used).
    cluster_replica_idle_ms: u64 = 300_000, check check::at_least(100);
    /// Logs as text (human-readable) or json.
    log_format: LogFormat = LogFormat::Text;
    /// Log filter in tracing syntax, e.g. info or chatd=debug; RUST_LOG takes precedence.
    log_level: String = "info".into();
}

/// A duration in whole milliseconds, as the `_ms` fields hold them.
fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Checks a field's declaration may name: each returns a function of the
/// value whose error completes the sentence "FIELD ...".
mod check {
    /// A whole number of any width.
    pub trait Number: Copy {
        fn get(self) -> u64;
    }

    impl Number for u32 {
        fn get(self) -> u64 {
            u64::from(self)
        }
    }

    impl Number for u64 {
        fn get(self) -> u64 {
            self
        }
    }

    impl Number for usize {
        fn get(self) -> u64 {
            self as u64
        }
    }

    pub fn at_least<T: Number>(min: u64) -> impl Fn(&T) -> Result<(), String> {
        move |v| if v.get() >= min { Ok(()) } else { Err(format!("must be at least {min}")) }
    }

    pub fn at_most<T: Number>(max: usize) -> impl Fn(&T) -> Result<(), String> {
        move |v| if v.get() <= max as u64 { Ok(()) } else { Err(format!("must be at most {max}")) }
    }

    pub fn between<T: Number>(lo: u64, hi: u64) -> impl Fn(&T) -> Result<(), String> {
        move |v| if (lo..=hi).contains(&v.get()) { Ok(()) } else { Err(format!("must be between {lo} and {hi}")) }
    }

    pub fn age() -> impl Fn(&String) -> Result<(), String> {
        |v| super::parse_age(v).map(|_| ())
    }

    pub fn cluster_target() -> impl Fn(&Option<String>) -> Result<(), String> {
        |v| match v {
            Some(s) => crate::store::redis::Target::parse(s).map(|_| ()),
            None => Ok(()),
        }
    }

    pub fn min_len(n: usize) -> impl Fn(&Option<String>) -> Result<(), String> {
        move |v| match v {
            Some(s) if s.len() < n => Err(format!("must be at least {n} bytes long")),
            _ => Ok(()),
        }
    }
}

/// A retention age: a whole number with a unit (`d`, `h`, `m`, `s`), as ms;
/// "" is 0 (no limit).
pub fn parse_age(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let unit_ms: u64 = match unit.trim() {
        "d" => 86_400_000,
        "h" => 3_600_000,
        "m" => 60_000,
        "s" => 1_000,
        _ => return Err(format!("{text:?} is not an age like \"30d\", \"12h\", \"90m\" or \"45s\"")),
    };
    let n: u64 = n.parse().map_err(|_| format!("{text:?} does not start with a whole number"))?;
    n.checked_mul(unit_ms).filter(|ms| *ms > 0).ok_or_else(|| format!("{text:?} is out of range"))
}

/// Most connection threads `workers` may ask for.
const MAX_WORKERS: usize = 1024;

/// A configuration that cannot be used; the message names the field.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl std::fmt::Display for DurabilityMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DurabilityMode::Fsync => "fsync",
            DurabilityMode::Batch => "batch",
            DurabilityMode::None => "none",
        })
    }
}

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
    /// run beside the workers; leaving them a core measured +14% in fan-out
    /// with `fsync` and +28% with `none` on a 2-core machine, where 2
    /// workers preempted the writer and woke each other for every delivery
    /// (benches/README.md, "Workers: one per core, less one").
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
            n => n,
        }
    }

    /// The default retention of rooms (checked when the config was read).
    pub fn retention(&self) -> crate::hub::retention::Retention {
        crate::hub::retention::Retention {
            max_age_ms: parse_age(&self.retention_max_age).unwrap_or(0),
            max_messages: self.retention_max_messages,
        }
    }

    /// The cluster's Redis and how to use it, in cluster mode.
    pub fn cluster(&self) -> Option<(crate::store::redis::Target, crate::store::redis::Options)> {
        use crate::store::redis::{Durability, Options, Target};
        let target = Target::parse(self.cluster_redis.as_deref()?).ok()?;
        let durability = match self.cluster_durability {
            ClusterDurability::Strict => Durability::Strict,
            ClusterDurability::Relaxed => Durability::Relaxed,
        };
        let options = Options {
            durability,
            replicas: self.cluster_replicas,
            idempotency_window: Duration::from_secs(self.idempotency_hours * 3600),
            ..Options::default()
        };
        Some((target, options))
    }

    /// The group commit's durability.
    pub fn durability(&self) -> Durability {
        match self.durability {
            DurabilityMode::Fsync => Durability::Fsync,
            DurabilityMode::Batch => Durability::Batch { interval: Duration::from_millis(self.batch_sync_ms.max(1)) },
            DurabilityMode::None => Durability::None,
        }
    }

    /// Checks every field, then the rules between fields; the error names
    /// the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_fields()?;
        if self.cert.is_some() != self.key.is_some() {
            return Err(ConfigError("cert and key: give both, or neither".into()));
        }
        if self.dev_tls && self.cert.is_some() {
            return Err(ConfigError("dev_tls: not with cert/key (it generates its own certificate)".into()));
        }
        if self.tls.is_some() && self.cert.is_none() && !self.dev_tls {
            return Err(ConfigError("tls: a TLS listener needs cert and key, or dev_tls".into()));
        }
        Ok(())
    }

    /// Whether TLS is configured.
    pub fn tls_enabled(&self) -> bool {
        self.cert.is_some() || self.dev_tls
    }

    /// The TLS listener's address, when TLS is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_enabled().then(|| self.tls.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7401))))
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
            auto_create_rooms: self.auto_create_rooms,
            max_pending_invites_per_user: self.max_pending_invites_per_user,
            max_reaction_keys: self.max_reaction_keys,
        }
    }
}

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
mod tests {
    use super::*;

    #[test]
    fn retention_ages_take_a_unit_and_a_bad_one_names_the_field() {
        assert_eq!(parse_age("30d"), Ok(30 * 86_400_000));
        assert_eq!(parse_age(" 12h "), Ok(12 * 3_600_000));
        assert_eq!((parse_age("90m"), parse_age("45s"), parse_age("")), (Ok(5_400_000), Ok(45_000), Ok(0)));
        for bad in ["30", "d", "5x", "0s", "-1d", "99999999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
        let err = Config::build(None, &[("retention_max_age", toml::Value::String("soon".into()))]).unwrap_err();
        assert!(err.to_string().contains("retention_max_age"), "{err}");
        let c = Config::build(None, &[("retention_max_messages", toml::Value::Integer(10))]).unwrap();
        assert_eq!(c.retention().max_messages, 10);
    }

    #[test]
    fn defaults_are_valid_and_match_the_design() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.tcp.port(), 7400);
        assert_eq!(c.http.port(), 7480);
        assert_eq!(c.durability(), Durability::Fsync);
        assert_eq!(c.max_frame_bytes, 65536);
        assert_eq!(c.publish_rate, 240);
    }

    #[test]
    fn a_file_overrides_defaults_and_bad_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "durability = \"none\"\npublish_rate = 0\n").unwrap();
        let c = Config::from_file(&p).unwrap();
        assert_eq!(c.durability(), Durability::None);
        assert_eq!(c.publish_rate, 0);
        std::fs::write(&p, "no_such_field = 1\n").unwrap();
        assert!(Config::from_file(&p).unwrap_err().to_string().contains("no_such_field"));
        std::fs::write(&p, "durability = \"sometimes\"\n").unwrap();
        let err = Config::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("durability") && err.contains("fsync"), "{err}");
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
            api_key: Some("k".into()),
            api_key_file: Some("f".into()),
            cluster_redis: Some("redis://h:1".into()),
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
    fn a_batch_sync_of_0_ms_is_taken_for_1() {
        let c = Config::build(None, &[("batch_sync_ms", toml::Value::Integer(0))]).unwrap();
        assert_eq!(c.durability(), Durability::Fsync, "the default mode is unchanged");
        let c = Config { durability: DurabilityMode::Batch, ..c };
        assert_eq!(c.durability(), Durability::Batch { interval: Duration::from_millis(1) });
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
