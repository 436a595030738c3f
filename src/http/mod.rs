//! The HTTP side (`--http`): the WebSocket endpoint (`/ws`, see [`ws`]),
//! health and readiness probes, the browser client at `/`, and — only with
//! `--dev-auth` on a loopback listener — a development login that mints
//! tokens.

mod admin;
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

async fn asset(State(app): State<Arc<App>>, name: &'static str) -> Response {
    let (_, content_type, embedded) = ASSETS.iter().find(|(n, _, _)| *n == name).expect("known asset");
    let body = match &app.web_dir {
        Some(dir) => match tokio::fs::read_to_string(dir.join(name)).await {
            Ok(text) => text,
            Err(e) => return (StatusCode::NOT_FOUND, format!("{name}: {e}\n")).into_response(),
        },
        None => (*embedded).to_string(),
    };
    ([(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

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
    metrics::gauge!(m::COMMIT_QUEUE_DEPTH).set(hub.commits.depth() as f64);
    metrics::gauge!(m::STORAGE_HEALTHY).set(if hub.commits.has_failed() { 0.0 } else { 1.0 });
    metrics::gauge!(m::DURABILITY, "mode" => app.durability.clone()).set(1.0);
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
    } else if app.hub.commits.has_failed() {
        (StatusCode::SERVICE_UNAVAILABLE, "storage failed; see the logs\n".into())
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
async fn dev_token(State(app): State<Arc<App>>, Query(q): Query<DevLogin>) -> Response {
    if !app.dev_auth {
        return (StatusCode::NOT_FOUND, "dev login is off (start chatd with --dev-auth on a loopback address)\n")
            .into_response();
    }
    if !crate::auth::valid_user_id(&q.user) {
        return (StatusCode::BAD_REQUEST, "user must be 1-62 characters of A-Z a-z 0-9 _ . -\n").into_response();
    }
    tracing::warn!(user = %q.user, "dev login minted a token");
    let token = app.hub.auth.mint(&q.user, std::time::Duration::from_secs(86400), crate::auth::unix_now());
    ([(header::CONTENT_TYPE, "text/plain")], token).into_response()
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
