//! The HTTP side (`--http`): the WebSocket endpoint (`/ws`, see [`ws`]),
//! health and readiness probes, the browser client at `/`, and — only with
//! `--dev-auth` on a loopback listener — a development login that mints
//! tokens.

mod admin;
pub mod api;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use crate::session::driver::Shutdown;

/// What the HTTP handlers share.
pub struct App {
    /// The hub.
    pub hub: Arc<Hub>,
    /// Set once every listener is bound; cleared when shutdown starts.
    pub serving: AtomicBool,
    /// Shutdown signals for WebSocket sessions.
    pub shutdown: Shutdown,
    /// Tracks WebSocket connections, so shutdown waits for them.
    pub connections: TaskTracker,
    /// Whether `/dev/token` mints tokens (development only).
    pub dev_auth: bool,
    /// Serve the web client from this directory instead of the copy built
    /// into the binary (for working on the client without rebuilding).
    pub web_dir: Option<std::path::PathBuf>,
    /// Renders `/metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The durability mode, for `chatd_durability_info`.
    pub durability: String,
    /// Bearer token of the admin endpoints; `None`: they are off.
    pub admin_token: Option<String>,
    /// The TLS certificates, for the admin reload.
    pub certs: Option<Arc<crate::net::tls::Certificates>>,
    /// The server API's key; `None`: `/api/` is 404.
    pub api: Option<api::Api>,
}

/// The web client's files: name, content type, embedded text.
const ASSETS: [(&str, &str, &str); 4] = [
    ("index.html", "text/html; charset=utf-8", include_str!("../../clients/web/index.html")),
    ("app.js", "text/javascript", include_str!("../../clients/web/app.js")),
    ("chatd-client.js", "text/javascript", include_str!("../../clients/web/chatd-client.js")),
    ("style.css", "text/css", include_str!("../../clients/web/style.css")),
];

/// The router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .nest("/api/v1", api::routes(app.clone()))
        .route("/api", axum::routing::any(api_unknown))
        .route("/api/{*rest}", axum::routing::any(api_unknown))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/admin/rooms", get(admin::rooms))
        .route("/admin/rooms/{room}", get(admin::room))
        .route("/admin/connections", get(admin::connections))
        .route("/admin/tls/reload", post(admin::reload_tls))
        .route("/ws", get(upgrade))
        .route("/dev/token", post(dev_token))
        .route("/", get(|app| asset(app, "index.html")))
        .route("/app.js", get(|app| asset(app, "app.js")))
        .route("/chatd-client.js", get(|app| asset(app, "chatd-client.js")))
        .route("/style.css", get(|app| asset(app, "style.css")))
        .with_state(app)
}

/// `/api/...` outside `/api/v1/`: 404, whether or not the API is on.
async fn api_unknown() -> Response {
    let e = crate::proto::Error::new(crate::proto::ErrorCode::NotFound, "no such endpoint (see api/README.md)");
    let body = serde_json::to_string(&e).unwrap_or_default();
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn asset(State(app): State<Arc<App>>, name: &'static str) -> Response {
    let (_, content_type, embedded) = ASSETS.iter().find(|(n, _, _)| *n == name).expect("known asset");
    let body = match &app.web_dir {
        Some(dir) => match tokio::fs::read_to_string(dir.join(name)).await {
            Ok(text) => text,
            Err(e) => return (StatusCode::NOT_FOUND, format!("{name}: {e}\n")).into_response(),
        },
        None => (*embedded).to_string(),
    };
    let mut response =
        ([(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response();
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, header::HeaderValue::from_static(value));
    }
    response
}

/// Sent with every file of the web client. The client is same-origin
/// modules and a stylesheet with no inline code, so the policy allows
/// nothing else: injected markup cannot run script, and no other site may
/// frame the page (clickjacking).
const SECURITY_HEADERS: [(header::HeaderName, &str); 4] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
         frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'",
    ),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::REFERRER_POLICY, "no-referrer"),
];

/// Prometheus text format. Gauges that are cheaper to compute than to keep
/// up to date are set here, at scrape time.
async fn render_metrics(State(app): State<Arc<App>>) -> Response {
    use crate::metrics as m;
    let hub = &app.hub;
    let (users, _) = hub.online_counts();
    let rooms = hub.rooms();
    let active = rooms.iter().filter(|r| r.subscriber_count() > 0).count();
    let slow: u64 = rooms.iter().map(|r| r.slow_consumer_events()).sum();
    metrics::gauge!(m::USERS_ONLINE).set(users as f64);
    metrics::gauge!(m::ROOMS).set(rooms.len() as f64);
    metrics::gauge!(m::ROOMS_ACTIVE).set(active as f64);
    metrics::counter!(m::SLOW_CONSUMER_EVENTS).absolute(slow);
    metrics::gauge!(m::COMMIT_QUEUE_DEPTH).set(hub.pipeline.commits.depth() as f64);
    metrics::gauge!(m::STORAGE_HEALTHY).set(if hub.pipeline.commits.has_failed() { 0.0 } else { 1.0 });
    metrics::gauge!(m::DURABILITY, "mode" => app.durability.clone()).set(1.0);
    if let Some(c) = hub.cluster() {
        use std::sync::atomic::Ordering::Relaxed;
        let feed = &c.feed.state;
        metrics::gauge!(m::CLUSTER_UP).set(if feed.is_up() { 1.0 } else { 0.0 });
        let mode = c.log.options().durability.to_string();
        metrics::gauge!(m::CLUSTER_DURABILITY, "mode" => mode).set(1.0);
        metrics::counter!(m::CLUSTER_FEED_CONNECTIONS).absolute(feed.connections.load(Relaxed));
        metrics::counter!(m::CLUSTER_FILLED).absolute(feed.filled.load(Relaxed));
        let (served, evicted) = c.replica_counts();
        metrics::gauge!(m::CLUSTER_ROOMS_SERVED).set(served as f64);
        metrics::counter!(m::CLUSTER_ROOMS_EVICTED).absolute(evicted);
    }
    let store = hub.store.clone();
    let size = tokio::task::spawn_blocking(move || store.size_on_disk()).await.unwrap_or(0);
    metrics::gauge!(m::STORAGE_BYTES).set(size as f64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

/// The process is alive and answering.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Storage is usable and the listeners are up (503 otherwise).
async fn readyz(State(app): State<Arc<App>>) -> (StatusCode, String) {
    if !app.serving.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "not serving (starting or shutting down)\n".into())
    } else if app.hub.pipeline.commits.has_failed() {
        (StatusCode::SERVICE_UNAVAILABLE, "storage failed; see the logs\n".into())
    } else if app.hub.cluster().is_some_and(|c| !c.feed.state.is_up()) {
        (StatusCode::SERVICE_UNAVAILABLE, "the cluster's Redis is unreachable; see the logs\n".into())
    } else {
        (StatusCode::OK, format!("ready: {} rooms\n", app.hub.room_count()))
    }
}

async fn upgrade(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    if !app.serving.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let max = app.hub.limits.max_frame_bytes;
    let (hub, shutdown, tracker) = (app.hub.clone(), app.shutdown.clone(), app.connections.clone());
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| tracker.track_future(ws::serve(hub, socket, peer.to_string(), shutdown)))
}

#[derive(serde::Deserialize)]
struct DevLogin {
    user: String,
}

/// `POST /dev/token?user=NAME`: a 24 h token, only with `--dev-auth`.
///
/// The listener being on loopback is not enough: a page on another site can
/// make the browser post here (DNS rebinding points a foreign name at
/// 127.0.0.1), so the request's `Host` and, when a browser sends one, its
/// `Origin` must name a loopback host too.
async fn dev_token(State(app): State<Arc<App>>, headers: header::HeaderMap, Query(q): Query<DevLogin>) -> Response {
    if !app.dev_auth {
        return (StatusCode::NOT_FOUND, "dev login is off (start chatd with --dev-auth on a loopback address)\n")
            .into_response();
    }
    if let Err(why) = loopback_request(&headers) {
        tracing::warn!(%why, "dev login refused a request not addressed to a loopback name");
        return (StatusCode::FORBIDDEN, format!("dev login answers only loopback names: {why}\n")).into_response();
    }
    if !crate::auth::valid_user_id(&q.user) {
        return (StatusCode::BAD_REQUEST, "user must be 1-62 characters of A-Z a-z 0-9 _ . -\n").into_response();
    }
    tracing::warn!(user = %q.user, "dev login minted a token");
    let token = app.hub.auth.mint(&q.user, std::time::Duration::from_secs(86400), crate::auth::unix_now());
    ([(header::CONTENT_TYPE, "text/plain")], token).into_response()
}

/// Checks that `Host` (required) and `Origin` (when present) name a
/// loopback host: `localhost`, `*.localhost`, `127.0.0.0/8` or `[::1]`.
fn loopback_request(headers: &header::HeaderMap) -> Result<(), String> {
    let text = |name: header::HeaderName| -> Result<Option<&str>, String> {
        headers.get(&name).map(|v| v.to_str().map_err(|_| format!("{name} is not text"))).transpose()
    };
    let host = text(header::HOST)?.ok_or("no Host header")?;
    if !is_loopback_authority(host) {
        return Err(format!("Host {host:?}"));
    }
    if let Some(origin) = text(header::ORIGIN)? {
        let authority = origin.split_once("://").map_or("", |(_, rest)| rest);
        if !is_loopback_authority(authority) {
            return Err(format!("Origin {origin:?}"));
        }
    }
    Ok(())
}

/// Whether `host[:port]` names a loopback host.
fn is_loopback_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.starts_with(':') => ip,
            _ => return false,
        },
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let host = host.to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Serves the router over HTTPS (and wss): `axum::serve` is plain TCP only,
/// so each connection's TLS handshake runs in its own task (under the
/// handshake timeout) and hyper serves it, with upgrades for WebSocket.
pub async fn serve_https(
    listener: tokio::net::TcpListener,
    router: Router,
    certs: Arc<crate::net::tls::Certificates>,
    stop: tokio_util::sync::CancellationToken,
    handshake: std::time::Duration,
) {
    use hyper_util::rt::TokioIo;
    use tower::ServiceExt as _;

    let tracker = TaskTracker::new();
    let accept_stop = stop.clone();
    crate::net::tcp::accept_each(listener, accept_stop, |stream, peer| {
        let (router, acceptor, stop) = (router.clone(), certs.https(), stop.clone());
        tracker.spawn(async move {
            let Some(tls) = crate::net::tls::handshake_within(acceptor, stream, handshake, &peer).await else { return };
            let service = hyper::service::service_fn(move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                router.clone().oneshot(req)
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "https connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    })
    .await;
    tracker.close();
    tracker.wait().await;
}

#[cfg(test)]
mod tests {
    use super::is_loopback_authority;

    #[test]
    fn only_loopback_names_count_as_loopback() {
        for ok in [
            "localhost",
            "localhost:7480",
            "LOCALHOST:1",
            "app.localhost:80",
            "127.0.0.1:7480",
            "127.3.4.5",
            "[::1]:7480",
            "[::1]",
        ] {
            assert!(is_loopback_authority(ok), "{ok}");
        }
        for bad in [
            "evil.example:7480",
            "localhost.evil.example",
            "127.0.0.1.nip.io:7480",
            "10.0.0.1:7480",
            "[::2]:7480",
            "[::1]x",
            "",
            "0.0.0.0:7480",
        ] {
            assert!(!is_loopback_authority(bad), "{bad}");
        }
    }
}
