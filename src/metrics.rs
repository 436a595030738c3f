//! Metrics: every name chatd exports, in one place, and the handles the hot
//! paths use. Exported through the `metrics` facade and rendered by
//! metrics-exporter-prometheus at `/metrics` on the HTTP listener.
//!
//! Hot paths hold pre-registered handles ([`Metrics`]) instead of looking a
//! name up per event; fan-out counts once per message (with the number of
//! recipients), writers once per batch. Labels are few and bounded
//! (transport, error code, close reason, limit kind) — per-room and
//! per-connection figures are served as JSON by the admin endpoints instead,
//! so no label grows with the number of rooms or users.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Open connections, by `transport` (tcp, tls, ws).
pub const CONNECTIONS: &str = "chatd_connections";
/// Authenticated sessions.
pub const SESSIONS: &str = "chatd_sessions";
/// Users with at least one session.
pub const USERS_ONLINE: &str = "chatd_users_online";
/// Rooms with at least one session subscribed.
pub const ROOMS_ACTIVE: &str = "chatd_rooms_active";
/// Rooms known (ever joined).
pub const ROOMS: &str = "chatd_rooms";
/// Frames (TCP/TLS) or messages (WebSocket) received, by `transport`.
pub const FRAMES_RECEIVED: &str = "chatd_frames_received_total";
/// Frames or messages sent, by `transport`.
pub const FRAMES_SENT: &str = "chatd_frames_sent_total";
/// Bytes received, by `transport`.
pub const BYTES_RECEIVED: &str = "chatd_bytes_received_total";
/// Bytes sent, by `transport`.
pub const BYTES_SENT: &str = "chatd_bytes_sent_total";
/// Requests received (envelopes that expect a reply, `Hello` included;
/// not `Pong`, `Typing`): the denominator of the error ratio.
pub const REQUESTS: &str = "chatd_requests_total";
/// Messages stored and acknowledged.
pub const MESSAGES_PUBLISHED: &str = "chatd_messages_published_total";
/// Messages handed to a session's queue (live or from the log).
pub const MESSAGES_DELIVERED: &str = "chatd_messages_delivered_total";
/// Publishes answered as duplicates of a stored `client_msg_id`.
pub const PUBLISH_DUPLICATES: &str = "chatd_publish_duplicates_total";
/// Error replies, by `code` (the `ErrorCode` name, e.g. FORBIDDEN).
pub const ERRORS: &str = "chatd_errors_total";
/// `GoAway`s sent, by `reason` (the `CloseReason` name, e.g. SHUTDOWN).
pub const CLOSES: &str = "chatd_closes_total";
/// Times a session's queue was full and it switched to reading the log.
pub const SLOW_CONSUMER_EVENTS: &str = "chatd_slow_consumer_events_total";
/// Sessions closed for staying behind too long (`GoAway{SLOW_CONSUMER}`).
pub const SLOW_CONSUMER_DISCONNECTS: &str = "chatd_slow_consumer_disconnects_total";
/// Requests refused by a rate limit, by `kind` (publish, typing).
pub const RATE_LIMITED: &str = "chatd_rate_limited_total";
/// Publish received → ack queued (includes the durable commit), seconds.
pub const PUBLISH_ACK_SECONDS: &str = "chatd_publish_ack_seconds";
/// Publish received → queued to every subscribed session, seconds.
pub const PUBLISH_DELIVERY_SECONDS: &str = "chatd_publish_delivery_seconds";
/// Writes per group commit.
pub const COMMIT_BATCH_SIZE: &str = "chatd_commit_batch_size";
/// Time of a group commit's flush + fdatasync, seconds.
pub const COMMIT_SYNC_SECONDS: &str = "chatd_commit_sync_seconds";
/// Time of a group commit's writes into the store (before the sync), seconds.
pub const COMMIT_WRITE_SECONDS: &str = "chatd_commit_write_seconds";
/// Group commits that failed (storage errors).
pub const COMMIT_FAILURES: &str = "chatd_commit_failures_total";
/// Time to read one history page, seconds.
pub const HISTORY_READ_SECONDS: &str = "chatd_history_read_seconds";
/// Bytes the store occupies on disk.
pub const STORAGE_BYTES: &str = "chatd_storage_bytes";
/// 1 while storage works, 0 once it has failed (writes refused).
pub const STORAGE_HEALTHY: &str = "chatd_storage_healthy";
/// Always 1, with the durability mode as the `mode` label.
pub const DURABILITY: &str = "chatd_durability_info";
/// Always 1, with the version as the `version` label.
pub const BUILD_INFO: &str = "chatd_build_info";
/// When this process started (Unix seconds): tells a restart from a drop.
pub const START_TIME: &str = "chatd_start_time_seconds";
/// Writes waiting in the group-commit queue.
pub const COMMIT_QUEUE_DEPTH: &str = "chatd_commit_queue_depth";
/// Server API calls, by `endpoint` (the route, e.g.
/// `/api/v1/rooms/{room}`), `method` and `status`.
pub const API_CALLS: &str = "chatd_api_calls_total";
/// Log entries removed by retention.
pub const RETENTION_REMOVED: &str = "chatd_retention_removed_total";
/// Room administration done, by `action` (create, update, invite, add,
/// decline, remove, ban, unban, set_role).
pub const MODERATION: &str = "chatd_moderation_total";
/// Backups streamed over the backup socket, by `outcome` (ok, failed).
pub const BACKUPS: &str = "chatd_backups_total";
/// Cluster mode: 1 while the node's feed is connected to Redis, 0 while not
/// (publishes then get `SERVER_BUSY` and `/readyz` is 503).
pub const CLUSTER_UP: &str = "chatd_cluster_up";
/// Cluster mode: always 1, with `mode` strict (Redis must fsync every
/// write) or relaxed (`--cluster-durability relaxed`).
pub const CLUSTER_DURABILITY: &str = "chatd_cluster_durability_info";
/// Cluster mode: times the feed's connection to Redis was (re)made.
pub const CLUSTER_FEED_CONNECTIONS: &str = "chatd_cluster_feed_connections_total";
/// Cluster mode: entries read from a room's stream because its channel did
/// not bring them (a lost connection, a seq jump).
pub const CLUSTER_FILLED: &str = "chatd_cluster_filled_entries_total";
/// Cluster mode: rooms the node serves now (subscribed in Redis, their
/// replica in memory).
pub const CLUSTER_ROOMS_SERVED: &str = "chatd_cluster_rooms_served";
/// Cluster mode: rooms the node stopped serving after no session of its
/// used them for `cluster_replica_idle_ms` (their replica dropped).
pub const CLUSTER_ROOMS_EVICTED: &str = "chatd_cluster_rooms_evicted_total";
/// Appends to the cluster's Redis that failed (answered `SERVER_BUSY`).
pub const CLUSTER_APPEND_FAILURES: &str = "chatd_cluster_append_failures_total";
/// Rooms whose epoch changed: Redis came back without some of their
/// entries (resumes from before them end with `Synced{complete: false}`).
pub const CLUSTER_EPOCH_CHANGES: &str = "chatd_cluster_epoch_changes_total";

/// The names exported only in cluster mode.
pub const CLUSTER_ONLY: &[&str] = &[
    CLUSTER_UP,
    CLUSTER_DURABILITY,
    CLUSTER_FEED_CONNECTIONS,
    CLUSTER_FILLED,
    CLUSTER_ROOMS_SERVED,
    CLUSTER_ROOMS_EVICTED,
];

/// Every name above, for the README and tests.
pub const ALL: &[&str] = &[
    CONNECTIONS,
    SESSIONS,
    USERS_ONLINE,
    ROOMS_ACTIVE,
    ROOMS,
    FRAMES_RECEIVED,
    FRAMES_SENT,
    BYTES_RECEIVED,
    BYTES_SENT,
    REQUESTS,
    MESSAGES_PUBLISHED,
    MESSAGES_DELIVERED,
    PUBLISH_DUPLICATES,
    ERRORS,
    CLOSES,
    SLOW_CONSUMER_EVENTS,
    SLOW_CONSUMER_DISCONNECTS,
    RATE_LIMITED,
    PUBLISH_ACK_SECONDS,
    PUBLISH_DELIVERY_SECONDS,
    COMMIT_BATCH_SIZE,
    COMMIT_SYNC_SECONDS,
    COMMIT_WRITE_SECONDS,
    COMMIT_FAILURES,
    HISTORY_READ_SECONDS,
    STORAGE_BYTES,
    STORAGE_HEALTHY,
    DURABILITY,
    BUILD_INFO,
    START_TIME,
    COMMIT_QUEUE_DEPTH,
    MODERATION,
    API_CALLS,
    RETENTION_REMOVED,
    BACKUPS,
    CLUSTER_UP,
    CLUSTER_DURABILITY,
    CLUSTER_FEED_CONNECTIONS,
    CLUSTER_FILLED,
    CLUSTER_ROOMS_SERVED,
    CLUSTER_ROOMS_EVICTED,
    CLUSTER_APPEND_FAILURES,
    CLUSTER_EPOCH_CHANGES,
];

/// Latency buckets (seconds): 50 µs to 5 s.
const SECONDS_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Batch-size buckets (writes).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];

/// Installs the Prometheus recorder for this process (once) and returns the
/// handle that renders `/metrics`. Handles registered before this call would
/// go nowhere, so the server calls it before building [`Metrics`].
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(COMMIT_BATCH_SIZE.into()), BATCH_BUCKETS))
                .expect("bucket lists are not empty");
            match builder.install_recorder() {
                Ok(h) => h,
                // Another recorder is installed (an embedding application's):
                // render our own, unregistered one rather than fail.
                Err(e) => {
                    tracing::warn!(error = %e, "a metrics recorder is already installed; /metrics shows nothing");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

/// Per-transport counters.
#[derive(Clone)]
pub struct TransportMetrics {
    /// Open connections.
    pub connections: Gauge,
    /// Frames received.
    pub frames_in: Counter,
    /// Frames sent.
    pub frames_out: Counter,
    /// Bytes received.
    pub bytes_in: Counter,
    /// Bytes sent.
    pub bytes_out: Counter,
}

impl TransportMetrics {
    fn new(transport: &'static str) -> Self {
        TransportMetrics {
            connections: gauge!(CONNECTIONS, "transport" => transport),
            frames_in: counter!(FRAMES_RECEIVED, "transport" => transport),
            frames_out: counter!(FRAMES_SENT, "transport" => transport),
            bytes_in: counter!(BYTES_RECEIVED, "transport" => transport),
            bytes_out: counter!(BYTES_SENT, "transport" => transport),
        }
    }
}

/// Handles for the hot paths. Cloned handles count into the same metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Messages stored and acked.
    pub published: Counter,
    /// Messages queued to sessions.
    pub delivered: Counter,
    /// Duplicate publishes answered.
    pub duplicates: Counter,
    /// Slow-consumer disconnects.
    pub slow_disconnects: Counter,
    /// Failed group commits.
    pub commit_failures: Counter,
    /// Publish → ack.
    pub publish_ack: Histogram,
    /// Publish → queued to all.
    pub publish_delivery: Histogram,
    /// Writes per commit.
    pub batch_size: Histogram,
    /// Flush + fdatasync time.
    pub sync_seconds: Histogram,
    /// History page read time.
    pub history_read: Histogram,
    /// Entries retention removed.
    pub retention_removed: Counter,
    /// Authenticated sessions.
    pub sessions: Gauge,
    /// Requests received.
    pub requests: Counter,
    /// Appends to the cluster's Redis that failed.
    pub cluster_append_failures: Counter,
    /// Epoch changes of rooms seen by the cluster feed.
    pub cluster_epoch_changes: Counter,
    tcp: TransportMetrics,
    tls: TransportMetrics,
    ws: TransportMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every handle with the installed recorder. Labelled
    /// counters are registered at zero for every label value, so the first
    /// event after a start already shows in `rate()` and `increase()`.
    pub fn new() -> Self {
        use crate::proto::{CloseReason, ErrorCode};
        for code in (0..=ErrorCode::Internal as i32).filter_map(|c| ErrorCode::try_from(c).ok()) {
            counter!(ERRORS, "code" => short_name(code.as_str_name(), "ERROR_CODE_")).increment(0);
        }
        for reason in (0..=CloseReason::AuthExpired as i32).filter_map(|c| CloseReason::try_from(c).ok()) {
            counter!(CLOSES, "reason" => short_name(reason.as_str_name(), "CLOSE_REASON_")).increment(0);
        }
        for kind in ["publish", "typing"] {
            counter!(RATE_LIMITED, "kind" => kind).increment(0);
        }
        for outcome in ["ok", "failed"] {
            counter!(BACKUPS, "outcome" => outcome).increment(0);
        }
        gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        let started =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        gauge!(START_TIME).set(started);
        Metrics {
            requests: counter!(REQUESTS),
            published: counter!(MESSAGES_PUBLISHED),
            delivered: counter!(MESSAGES_DELIVERED),
            duplicates: counter!(PUBLISH_DUPLICATES),
            slow_disconnects: counter!(SLOW_CONSUMER_DISCONNECTS),
            commit_failures: counter!(COMMIT_FAILURES),
            publish_ack: histogram!(PUBLISH_ACK_SECONDS),
            publish_delivery: histogram!(PUBLISH_DELIVERY_SECONDS),
            batch_size: histogram!(COMMIT_BATCH_SIZE),
            sync_seconds: histogram!(COMMIT_SYNC_SECONDS),
            history_read: histogram!(HISTORY_READ_SECONDS),
            retention_removed: counter!(RETENTION_REMOVED),
            sessions: gauge!(SESSIONS),
            cluster_append_failures: counter!(CLUSTER_APPEND_FAILURES),
            cluster_epoch_changes: counter!(CLUSTER_EPOCH_CHANGES),
            tcp: TransportMetrics::new("tcp"),
            tls: TransportMetrics::new("tls"),
            ws: TransportMetrics::new("ws"),
        }
    }

    /// The counters of `transport` ("tcp", "tls" or "ws").
    pub fn transport(&self, transport: &str) -> &TransportMetrics {
        match transport {
            "tls" => &self.tls,
            "ws" => &self.ws,
            _ => &self.tcp,
        }
    }

    /// Counts an error reply.
    pub fn error(&self, code: crate::proto::ErrorCode) {
        counter!(ERRORS, "code" => short_name(code.as_str_name(), "ERROR_CODE_")).increment(1);
    }

    /// Counts a `GoAway`.
    pub fn close(&self, reason: crate::proto::CloseReason) {
        counter!(CLOSES, "reason" => short_name(reason.as_str_name(), "CLOSE_REASON_")).increment(1);
    }

    /// Counts a request refused by a rate limit.
    pub fn rate_limited(&self, kind: &'static str) {
        counter!(RATE_LIMITED, "kind" => kind).increment(1);
    }

    /// Counts a server API call.
    pub fn api_call(&self, endpoint: &str, method: &str, status: u16) {
        // Bounded labels: the route templates, five methods, the statuses.
        let method = match method {
            "GET" | "POST" | "PUT" | "PATCH" | "DELETE" => method.to_string(),
            _ => "other".to_string(),
        };
        counter!(API_CALLS, "endpoint" => endpoint.to_string(), "method" => method, "status" => status.to_string())
            .increment(1);
    }

    /// Counts a room administration action.
    pub fn moderation(&self, action: &'static str) {
        counter!(MODERATION, "action" => action).increment(1);
    }
}

fn short_name(name: &'static str, prefix: &str) -> &'static str {
    name.strip_prefix(prefix).unwrap_or(name)
}
