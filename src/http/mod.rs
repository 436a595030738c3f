//! The HTTP side (`--http`): health and readiness probes for orchestrators.
//! The WebSocket adapter, the web client and `/metrics` join this router.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::hub::Hub;

/// What the probes look at.
pub struct Probe {
    /// The hub (its store's health).
    pub hub: Arc<Hub>,
    /// Set once every listener is bound; cleared when shutdown starts.
    pub serving: AtomicBool,
}

/// The router.
pub fn router(probe: Arc<Probe>) -> Router {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).with_state(probe)
}

/// The process is alive and answering.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Storage is usable and the listeners are up (503 otherwise).
async fn readyz(State(p): State<Arc<Probe>>) -> (StatusCode, String) {
    if !p.serving.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "not serving (starting or shutting down)\n".into())
    } else if p.hub.commits.has_failed() {
        (StatusCode::SERVICE_UNAVAILABLE, "storage failed; see the logs\n".into())
    } else {
        (StatusCode::OK, format!("ready: {} rooms\n", p.hub.room_count()))
    }
}
