//! Admin endpoints: per-room and per-connection statistics as JSON, with
//! top-N views, and a TLS certificate reload. They answer only a request
//! carrying `Authorization: Bearer <admin_token>` (compared in constant
//! time, as HMAC tags); without a configured admin token they do not exist (404). A user's
//! JWT is never an admin token.
//!
//! * `GET /admin/rooms?top=N` — rooms by messages/s over the last minute.
//! * `GET /admin/rooms/{room}` — one room, with who is online.
//! * `GET /admin/connections?top=N&sort=rate|queue|age` — connections.
//! * `POST /admin/tls/reload` — re-read the TLS certificate and key.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::App;
use crate::room::Room;

/// Default and largest page of a top-N view.
const DEFAULT_TOP: usize = 50;
const MAX_TOP: usize = 1000;

fn reply(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], format!("{body:#}\n")).into_response()
}

/// Checks the bearer token; `Err` is the response to send.
fn authorize(app: &App, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(expected) = &app.admin_token else {
        return Err(Box::new(reply(
            StatusCode::NOT_FOUND,
            json!({"error": "admin endpoints are off (set admin_token)"}),
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant time whatever the lengths: compare HMAC tags with ring's
    // verify, which promises a constant-time comparison.
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"chatd admin token check");
    let tag = ring::hmac::sign(&key, expected.as_bytes());
    let ok = ring::hmac::verify(&key, given.as_bytes(), tag.as_ref()).is_ok();
    if ok {
        Ok(())
    } else {
        static REFUSED: crate::logs::Throttle = crate::logs::Throttle::new(1000);
        if let Some(suppressed) = REFUSED.allow() {
            tracing::warn!(suppressed, "admin request with a missing or wrong token refused");
        }
        Err(Box::new(reply(StatusCode::UNAUTHORIZED, json!({"error": "missing or wrong admin token"}))))
    }
}

#[derive(serde::Deserialize, Default)]
pub(super) struct TopQuery {
    top: Option<usize>,
    sort: Option<String>,
}

fn room_json(room: &Room, now_s: u64) -> Value {
    let rates = room.stats.rates(now_s);
    let (kind, owner, members, bans, invites) = {
        let g = room.gov();
        let kind = g.kind.as_str_name().strip_prefix("ROOM_KIND_").unwrap_or_default().to_lowercase();
        (kind, g.owner().map(|o| o.to_string()), g.members.len(), g.bans.len(), g.invites.len())
    };
    json!({
        "room": &*room.name,
        "kind": kind,
        "owner": owner,
        "members": members,
        "banned": bans,
        "pending_invites": invites,
        "online_sessions": room.subscriber_count(),
        "head_seq": room.head(),
        "messages_per_sec": rates.messages_per_sec,
        "p99_publish_ms": rates.p99_publish_ms,
        "published": room.stats.published.load(Ordering::Relaxed),
        "errors": room.stats.errors.load(Ordering::Relaxed),
        "slow_consumer_events": room.slow_consumer_events(),
    })
}

pub(super) async fn rooms(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<TopQuery>) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return *r;
    }
    let now_s = crate::auth::unix_now();
    let mut rooms: Vec<(f64, u64, Value)> = app
        .hub
        .rooms()
        .iter()
        .map(|r| (r.stats.rates(now_s).messages_per_sec, r.head(), room_json(r, now_s)))
        .collect();
    let total = rooms.len();
    rooms.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
    rooms.truncate(q.top.unwrap_or(DEFAULT_TOP).min(MAX_TOP));
    reply(StatusCode::OK, json!({"total": total, "rooms": rooms.into_iter().map(|r| r.2).collect::<Vec<_>>()}))
}

pub(super) async fn room(State(app): State<Arc<App>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return *r;
    }
    match app.hub.room(&name) {
        Some(room) => {
            let mut v = room_json(&room, crate::auth::unix_now());
            v["online_users"] = json!(room.online_users());
            reply(StatusCode::OK, v)
        }
        None => reply(StatusCode::NOT_FOUND, json!({"error": format!("no room {name:?}")})),
    }
}

pub(super) async fn connections(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<TopQuery>,
) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return *r;
    }
    let now = crate::time::now_ms();
    let mut rows: Vec<(f64, Value)> = app
        .hub
        .connections()
        .iter()
        .map(|h| {
            let s = &h.stats;
            let (frames_in, frames_out) = (s.frames_in.load(Ordering::Relaxed), s.frames_out.load(Ordering::Relaxed));
            let age_s = (now.saturating_sub(s.connected_at_ms) as f64 / 1000.0).max(0.001);
            let rate = (frames_in + frames_out) as f64 / age_s;
            let (queued_frames, queued_bytes) = h.outbound.depth();
            let key = match q.sort.as_deref() {
                Some("queue") => queued_bytes as f64,
                Some("age") => age_s,
                _ => rate,
            };
            let row = json!({
                "session": h.id,
                "user": h.user(),
                "device": h.device(),
                "transport": h.transport(),
                "remote": &s.peer,
                "connected_since_ms": s.connected_at_ms,
                "last_activity_ms": s.last_activity_ms.load(Ordering::Relaxed),
                "frames_in": frames_in,
                "frames_out": frames_out,
                "bytes_in": s.bytes_in.load(Ordering::Relaxed),
                "bytes_out": s.bytes_out.load(Ordering::Relaxed),
                "frames_per_sec": rate,
                "queue_frames": queued_frames,
                "queue_bytes": queued_bytes,
                "catching_up": h.is_lagging(),
            });
            (key, row)
        })
        .collect();
    let total = rows.len();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    rows.truncate(q.top.unwrap_or(DEFAULT_TOP).min(MAX_TOP));
    reply(StatusCode::OK, json!({"total": total, "connections": rows.into_iter().map(|r| r.1).collect::<Vec<_>>()}))
}

pub(super) async fn reload_tls(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return *r;
    }
    match &app.certs {
        None => reply(StatusCode::CONFLICT, json!({"error": "TLS is not configured"})),
        Some(c) => match c.reload() {
            Ok(()) => reply(StatusCode::OK, json!({"reloaded": c.cert_path().display().to_string()})),
            Err(e) => reply(StatusCode::UNPROCESSABLE_ENTITY, json!({"error": e.to_string()})),
        },
    }
}
