//! Configuration: one serde [`Config`] with documented defaults (design.md
//! §6). Precedence, highest first: command-line flag, environment variable
//! (`CHATD_...`), TOML file (`--config`), built-in default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::hub::Limits;
use crate::session::OutboundLimits;
use crate::store::commit::Durability;

/// Everything `chatd serve` can be told.
#[derive(Clone, Debug, Deserialize)]
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
    /// Idempotency keys are kept at least this long, in hours.
    pub idempotency_hours: u64,
    /// Time allowed for a graceful shutdown, in ms.
    pub shutdown_timeout_ms: u64,
    /// Development login at `POST /dev/token?user=NAME` (loopback HTTP only).
    pub dev_auth: bool,
    /// Serve the web client from this directory instead of the built-in copy.
    pub web_dir: Option<PathBuf>,
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
            idempotency_hours: 24,
            shutdown_timeout_ms: 10_000,
            dev_auth: false,
            web_dir: None,
        }
    }
}

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
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ConfigError(format!("{name} must be greater than 0")));
            }
        }
        if !(256..=16 << 20).contains(&self.max_frame_bytes) {
            return Err(ConfigError("max_frame_bytes must be between 256 and 16777216".into()));
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
