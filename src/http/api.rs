//! The server API for application backends, under `/api/v1/` (api/README.md;
//! api/openapi.json describes it): rooms, members, bans, messages, signing a
//! user out, minting tokens — without holding a user's socket.
//!
//! Every call goes through [`guard`]: the key (`Authorization: Bearer`,
//! compared in constant time; no key configured: every `/api/` path is 404),
//! the key's rate limit (429 with `Retry-After`), one log line and one count
//! per call. Bodies are capped at `max_frame_bytes` (413) and parsed
//! strictly: an unknown field or a wrong type is a 400. Answers are the
//! canonical proto3 JSON of the wire protocol's messages; errors are the
//! JSON of its `Error` with the matching HTTP status. The handlers call the
//! same room administration and the same publish as a session does
//! (`hub::rooms`, `hub::publish`), as the system or, with `actAs`, as a user
//! with that user's rights.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use base64::Engine as _;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::App;
use crate::hub::Refusal;
use crate::hub::publish::Author;
use crate::hub::rooms::Actor;
use crate::pipeline::Publisher;
use crate::proto::{self, ErrorCode};

/// Every endpoint: method and path (as routed under `/api/v1`). The tests
/// check it against api/openapi.json and against the router.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/rooms"),
    ("GET", "/rooms/{room}"),
    ("PATCH", "/rooms/{room}"),
    ("GET", "/rooms/{room}/members"),
    ("PUT", "/rooms/{room}/members/{user}"),
    ("DELETE", "/rooms/{room}/members/{user}"),
    ("PUT", "/rooms/{room}/bans/{user}"),
    ("DELETE", "/rooms/{room}/bans/{user}"),
    ("POST", "/rooms/{room}/messages"),
    ("GET", "/rooms/{room}/messages"),
    ("POST", "/users/{user}/disconnect"),
    ("POST", "/tokens"),
];

/// The configured key and its rate limit.
pub struct Api {
    key: String,
    name: String,
    rate_per_sec: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl Api {
    /// A key named `name` allowed `rate_per_sec` calls per second.
    pub fn new(key: String, name: String, rate_per_sec: u32) -> Self {
        let rate = f64::from(rate_per_sec.max(1));
        Api { key, name, rate_per_sec: rate, bucket: Mutex::new((rate, Instant::now())) }
    }

    /// Takes a call from the bucket; `Err(seconds)` to wait when empty.
    fn take(&self) -> Result<(), u64> {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * self.rate_per_sec).min(self.rate_per_sec);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.0) / self.rate_per_sec).ceil().max(1.0) as u64)
        }
    }
}

/// Equal bytes, in time that depends only on the lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The API's routes, nested under `/api/v1` by the router.
pub fn routes(app: Arc<App>) -> Router<Arc<App>> {
    let max = app.hub.limits.max_frame_bytes;
    Router::new()
        .route("/rooms", post(create_room))
        .route("/rooms/{room}", get(get_room).patch(update_room))
        .route("/rooms/{room}/members", get(list_members))
        .route("/rooms/{room}/members/{user}", put(add_member).delete(remove_member))
        .route("/rooms/{room}/bans/{user}", put(ban).delete(unban))
        .route("/rooms/{room}/messages", post(post_message).get(read_messages))
        .route("/users/{user}/disconnect", post(disconnect))
        .route("/tokens", post(mint_token))
        .fallback(no_endpoint)
        .layer(axum::extract::DefaultBodyLimit::max(max))
        .layer(axum::middleware::from_fn_with_state(app, guard))
}

/// An API error: the wire protocol's `Error` as JSON, with a status.
struct ApiError(ErrorCode, String);

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        ApiError(r.code, r.message)
    }
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest | ErrorCode::UnsupportedVersion | ErrorCode::Unspecified => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::AlreadyExists | ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::ServerBusy => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json(status_of(self.0), &proto::Error::new(self.0, self.1))
    }
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let text = serde_json::to_string(body).unwrap_or_else(|e| format!("{{\"message\":\"{e}\"}}"));
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

fn ok(body: &impl serde::Serialize) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, body))
}

type Answer = Result<Response, ApiError>;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError(ErrorCode::BadRequest, message.into())
}

/// The key, the rate limit, the log line and the count of every call.
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(api) = &app.api else {
        return no_endpoint().await.into_response();
    };
    let endpoint = req.extensions().get::<MatchedPath>().map_or("other", |p| p.as_str()).to_string();
    let method = req.method().clone();
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let started = Instant::now();
    let mut act_as = String::new();
    let response = if !same(presented.as_bytes(), api.key.as_bytes()) {
        static REFUSED: crate::logs::Throttle = crate::logs::Throttle::new(1000);
        if let Some(suppressed) = REFUSED.allow() {
            tracing::warn!(%method, endpoint, suppressed, "server API call with a missing or wrong key refused");
        }
        ApiError(ErrorCode::Unauthenticated, "missing or wrong API key (Authorization: Bearer <api_key>)".into())
            .into_response()
    } else if let Err(wait) = api.take() {
        app.hub.metrics.rate_limited("api");
        let mut r = ApiError(ErrorCode::RateLimited, format!("the key's rate limit is exceeded; retry in {wait} s"))
            .into_response();
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait));
        r
    } else {
        // The body is read here (within the size cap) so the log line can
        // name the acting user however the call gave it; the handler gets
        // it back.
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        match axum::body::to_bytes(body, app.hub.limits.max_frame_bytes).await {
            Ok(bytes) => match misplaced(&parts.method, parts.uri.query(), &bytes) {
                // Parameters where the endpoint does not read them would be
                // ignored: the call would run as the system.
                Some(why) => bad(why).into_response(),
                None => {
                    act_as = act_as_of(parts.uri.query(), &bytes);
                    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
                }
            },
            Err(_) if declared.is_some_and(|n| n > app.hub.limits.max_frame_bytes) || declared.is_none() => {
                ApiError(ErrorCode::TooLarge, "the body exceeds max_frame_bytes".into()).into_response()
            }
            Err(e) => bad(format!("unreadable body: {e}")).into_response(),
        }
    };
    let status = response.status();
    tracing::info!(
        key = %api.name,
        %method,
        endpoint,
        act_as,
        status = status.as_u16(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "server API call"
    );
    app.hub.metrics.api_call(&endpoint, method.as_str(), status.as_u16());
    response
}

/// Why a call's parameters are where its endpoint does not read them:
/// `GET` and `DELETE` take a query and no body, the others a body and no
/// query.
fn misplaced(method: &axum::http::Method, query: Option<&str>, body: &[u8]) -> Option<&'static str> {
    let has_body = !body.iter().all(u8::is_ascii_whitespace);
    let has_query = query.is_some_and(|q| !q.is_empty());
    match *method {
        axum::http::Method::GET | axum::http::Method::DELETE if has_body => {
            Some("this endpoint takes its parameters in the query string, not a body")
        }
        axum::http::Method::POST | axum::http::Method::PUT | axum::http::Method::PATCH if has_query => {
            Some("this endpoint takes its parameters in the JSON body, not the query string")
        }
        _ => None,
    }
}

/// The `actAs` of a call, for its log line: from the query string or the
/// JSON body ("" for the system, or when neither says).
fn act_as_of(query: Option<&str>, body: &[u8]) -> String {
    if let Some(a) = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("actAs="))) {
        return a.to_string();
    }
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("actAs").and_then(|a| a.as_str()).map(str::to_string))
        .unwrap_or_default()
}

async fn no_endpoint() -> ApiError {
    ApiError(ErrorCode::NotFound, "no such endpoint (see api/README.md)".into())
}

/// Parses a JSON body strictly (unknown fields and wrong types are 400);
/// an empty body is `{}`.
fn body<T: DeserializeOwned>(bytes: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = bytes.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError(ErrorCode::TooLarge, "the body exceeds max_frame_bytes".into()),
        _ => bad(format!("unreadable body: {e}")),
    })?;
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) { Bytes::from_static(b"{}") } else { bytes };
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

/// A query string as extracted, its rejection kept to answer it as JSON.
type QueryOf<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

/// Parses a query string strictly.
fn query<T: DeserializeOwned>(q: QueryOf<T>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| bad(format!("invalid query: {}", e.body_text())))
}

/// The acting user: `actAs`, or the system.
fn actor(act_as: Option<String>) -> Result<Actor, ApiError> {
    match act_as {
        None => Ok(Actor::System),
        Some(u) if crate::auth::valid_user_id(&u) => Ok(Actor::User(u.into())),
        Some(u) => Err(bad(format!("actAs {u:?} is not a valid user id"))),
    }
}

/// The room called `room`, if its creation is stored (one still being
/// created, or whose creation failed, takes no messages).
fn stored_room(hub: &crate::hub::Hub, room: &str) -> Result<Arc<crate::room::Room>, ApiError> {
    hub.room(room).filter(|r| r.is_stored()).ok_or_else(|| ApiError(ErrorCode::NotFound, format!("no room {room}")))
}

fn room_name(room: &str) -> Result<(), ApiError> {
    if crate::room::valid_room_name(room) { Ok(()) } else { Err(bad(format!("invalid room name {room:?}"))) }
}

/// Checks a room name from the path and, on a cluster node, brings the
/// room here up to what Redis holds first (it may never have served it).
async fn use_room(hub: &crate::hub::Hub, room: &str) -> Result<Option<crate::hub::cluster::Pinned>, ApiError> {
    room_name(room)?;
    Ok(hub.cluster_use(room, None).await?)
}

/// An enum field as canonical JSON has it: its name, or its number.
fn enum_field(v: Option<serde_json::Value>, parse: impl Fn(&str) -> Option<i32>, what: &str) -> Result<i32, ApiError> {
    match v {
        None => Ok(0),
        Some(serde_json::Value::String(s)) => parse(&s).ok_or_else(|| bad(format!("unknown {what} {s:?}"))),
        Some(serde_json::Value::Number(n)) => {
            n.as_i64().and_then(|n| i32::try_from(n).ok()).ok_or_else(|| bad(format!("{what} out of range")))
        }
        Some(other) => Err(bad(format!("{what} must be a name or a number, not {other}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateRoomBody {
    room: String,
    kind: Option<serde_json::Value>,
    title: Option<String>,
    topic: Option<String>,
    #[serde(default)]
    invite: Vec<String>,
    owner: Option<String>,
    act_as: Option<String>,
}

async fn create_room(State(app): State<Arc<App>>, b: Result<Bytes, BytesRejection>) -> Answer {
    let b: CreateRoomBody = body(b)?;
    if b.owner.is_some() && b.act_as.is_some() {
        return Err(bad("owner and actAs exclude each other (a user creating a room owns it)"));
    }
    let actor = actor(b.act_as)?;
    let kind = enum_field(b.kind, |s| proto::RoomKind::from_str_name(s).map(|k| k as i32), "kind")?;
    let c = proto::CreateRoom {
        room: b.room,
        kind,
        title: b.title.unwrap_or_default(),
        topic: b.topic.unwrap_or_default(),
        invite: b.invite,
    };
    ok(&app.hub.create_room(&actor, c, b.owner.as_deref()).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ActAsQuery {
    act_as: Option<String>,
}

async fn get_room(State(app): State<Arc<App>>, Path(room): Path<String>, q: QueryOf<ActAsQuery>) -> Answer {
    let _pinned = use_room(&app.hub, &room).await?;
    let q = query(q)?;
    ok(&app.hub.get_room(&actor(q.act_as)?, &room)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UpdateRoomBody {
    title: Option<String>,
    topic: Option<String>,
    /// Canonical proto3 JSON: 64-bit integers as text, or a number.
    #[serde(default, deserialize_with = "some_seq_of")]
    retention_max_age_ms: Option<u64>,
    #[serde(default, deserialize_with = "some_seq_of")]
    retention_max_messages: Option<u64>,
    act_as: Option<String>,
}

async fn update_room(
    State(app): State<Arc<App>>,
    Path(room): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Answer {
    let _pinned = use_room(&app.hub, &room).await?;
    let b: UpdateRoomBody = body(b)?;
    let u = proto::UpdateRoom {
        room,
        title: b.title,
        topic: b.topic,
        retention_max_age_ms: b.retention_max_age_ms,
        retention_max_messages: b.retention_max_messages,
    };
    ok(&app.hub.update_room(&actor(b.act_as)?, u).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MembersQuery {
    after_user: Option<String>,
    limit: Option<u32>,
    act_as: Option<String>,
}

async fn list_members(State(app): State<Arc<App>>, Path(room): Path<String>, q: QueryOf<MembersQuery>) -> Answer {
    let _pinned = use_room(&app.hub, &room).await?;
    let q = query(q)?;
    let l = proto::ListMembers { room, after_user: q.after_user.unwrap_or_default(), limit: q.limit.unwrap_or(0) };
    ok(&app.hub.list_members(&actor(q.act_as)?, &l)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AddMemberBody {
    role: Option<serde_json::Value>,
    act_as: Option<String>,
}

async fn add_member(
    State(app): State<Arc<App>>,
    Path((room, user)): Path<(String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> Answer {
    let _pinned = use_room(&app.hub, &room).await?;
    let b: AddMemberBody = body(b)?;
    let role = enum_field(b.role, |s| proto::Role::from_str_name(s).map(|r| r as i32), "role")?;
    ok(&app.hub.add_member(&actor(b.act_as)?, &room, &user, role).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ReasonQuery {
    reason: Option<String>,
    act_as: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ReasonBody {
    reason: Option<String>,
    act_as: Option<String>,
}

async fn remove_member(
    State(app): State<Arc<App>>,
    Path((room, user)): Path<(String, String)>,
    q: QueryOf<ReasonQuery>,
) -> Answer {
    let _pinned = use_room(&app.hub, &room).await?;
    let q = query(q)?;
    let reason = q.reason.unwrap_or_default();
    ok(&app.hub.remove(&actor(q.act_as)?, &room, &user, &reason, false).await?)
}

async fn ban(
    State(app): State<Arc<App>>,
    Path((room, user)): Path<(String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> Answer {
    let _pinned = use_room(&app.hub, &room).await?;
    let b: ReasonBody = body(b)?;
    let reason = b.reason.unwrap_or_default();
    ok(&app.hub.remove(&actor(b.act_as)?, &room, &user, &reason, true).await?)
}

async fn unban(
    State(app): State<Arc<App>>,
    Path((room, user)): Path<(String, String)>,
    q: QueryOf<ReasonQuery>,
) -> Answer {
    let _pinned = use_room(&app.hub, &room).await?;
    let q = query(q)?;
    let reason = q.reason.unwrap_or_default();
    ok(&app.hub.unban(&actor(q.act_as)?, &room, &user, &reason).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PostBody {
    #[serde(default)]
    client_msg_id: String,
    #[serde(default)]
    text: String,
    /// base64, as canonical JSON writes `bytes`.
    #[serde(default)]
    data: String,
    /// The seq this message answers (a string, as canonical JSON writes
    /// 64-bit integers, or a number).
    #[serde(default, deserialize_with = "seq_of")]
    reply_to: u64,
    /// User ids it mentions.
    #[serde(default)]
    mentions: Vec<String>,
    act_as: Option<String>,
}

/// A 64-bit integer as canonical JSON writes it (a string) or as a number.
fn seq_of<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seq {
        Number(u64),
        Text(String),
    }
    match Seq::deserialize(d)? {
        Seq::Number(n) => Ok(n),
        Seq::Text(t) => t.parse().map_err(|_| serde::de::Error::custom(format!("{t:?} is not a seq"))),
    }
}

fn some_seq_of<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    seq_of(d).map(Some)
}

/// Most bytes in a `clientMsgId` (as on the wire).
const MAX_CLIENT_MSG_ID: usize = 128;

async fn post_message(
    State(app): State<Arc<App>>,
    Path(room): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Answer {
    let received = Instant::now();
    let _pinned = use_room(&app.hub, &room).await?;
    let b: PostBody = body(b)?;
    if b.client_msg_id.len() > MAX_CLIENT_MSG_ID {
        return Err(bad(format!("clientMsgId is longer than {MAX_CLIENT_MSG_ID} bytes")));
    }
    // Canonical JSON accepts standard and URL-safe base64, padded or not.
    let data = {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
        let raw = b.data.as_bytes();
        [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|e| e.decode(raw).ok())
            .ok_or_else(|| bad("data is not base64"))?
    };
    let actor = actor(b.act_as)?;
    let hub = &app.hub;
    let r = stored_room(hub, &room)?;
    let entry = match &actor {
        Actor::User(u) => {
            let entry = hub.user(u);
            if !entry.lock().rooms.contains_key(&r.id) {
                return Err(ApiError(ErrorCode::Forbidden, format!("{u} is not a member of room {room}")));
            }
            // A user's messages count against the user's rate, however sent.
            if !hub.take_publish_token(&entry) {
                hub.metrics.rate_limited("publish");
                return Err(ApiError(ErrorCode::RateLimited, format!("{u}'s publish rate limit is exceeded")));
            }
            Some(entry)
        }
        Actor::System => None,
    };
    if hub.pipeline.commits.has_failed() {
        return Err(ApiError(ErrorCode::ServerBusy, "storage is unavailable; the message was not stored".into()));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let author = Author { sender: actor.id().into(), publisher: Publisher::Api(tx), permit: None, received };
    let p = proto::Publish {
        room: room.clone(),
        client_msg_id: b.client_msg_id,
        text: b.text,
        data: data.into(),
        reply_to: b.reply_to,
        mentions: b.mentions,
    };
    let still_allowed = || entry.as_ref().is_none_or(|e| e.lock().rooms.contains_key(&r.id));
    hub.publish(&r, p, author, still_allowed).await?;
    match rx.await {
        Ok(Ok(ack)) => ok(&ack),
        Ok(Err((code, why))) => Err(ApiError(code, why)),
        Err(_) => Err(ApiError(ErrorCode::ServerBusy, "server is shutting down".into())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HistoryQuery {
    before_seq: Option<u64>,
    after_seq: Option<u64>,
    limit: Option<u32>,
    forward: Option<bool>,
    act_as: Option<String>,
}

async fn read_messages(State(app): State<Arc<App>>, Path(room): Path<String>, q: QueryOf<HistoryQuery>) -> Answer {
    let _pinned = use_room(&app.hub, &room).await?;
    let q = query(q)?;
    let actor = actor(q.act_as)?;
    let hub = &app.hub;
    let r = stored_room(hub, &room)?;
    if let Actor::User(u) = &actor
        && !hub.user(u).lock().rooms.contains_key(&r.id)
    {
        return Err(ApiError(ErrorCode::Forbidden, format!("{u} is not a member of room {room}")));
    }
    let h = proto::History {
        room,
        before_seq: q.before_seq.unwrap_or(0),
        after_seq: q.after_seq.unwrap_or(0),
        limit: q.limit.unwrap_or(0),
        forward: q.forward.unwrap_or(false),
    };
    let store = hub.clone();
    let viewer = actor.id().to_string();
    let page = tokio::task::spawn_blocking(move || store.history_page(&r, &h, &viewer))
        .await
        .map_err(|e| ApiError(ErrorCode::Internal, format!("history read failed: {e}")))??;
    ok(&page)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DisconnectBody {
    #[serde(default)]
    revoke: bool,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Disconnected {
    user: String,
    sessions: usize,
    revoked: bool,
}

async fn disconnect(State(app): State<Arc<App>>, Path(user): Path<String>, b: Result<Bytes, BytesRejection>) -> Answer {
    if !crate::auth::valid_user_id(&user) {
        return Err(bad(format!("invalid user id {user:?}")));
    }
    let b: DisconnectBody = body(b)?;
    let sessions = app.hub.disconnect(&user, b.revoke).await?;
    ok(&Disconnected { user, sessions, revoked: b.revoke })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TokenBody {
    user: String,
    /// "30m", "24h", "7d", or seconds.
    ttl: Option<serde_json::Value>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Minted {
    token: String,
    user: String,
    /// Unix seconds, as a string (as canonical JSON writes 64-bit integers).
    expires_at: String,
}

/// Longest token a backend may mint here.
const MAX_TTL_SECS: u64 = 366 * 86_400;

async fn mint_token(State(app): State<Arc<App>>, b: Result<Bytes, BytesRejection>) -> Answer {
    let b: TokenBody = body(b)?;
    if !crate::auth::valid_user_id(&b.user) {
        return Err(bad("user must be 1-62 characters of A-Z a-z 0-9 _ . -"));
    }
    let ttl = match b.ttl {
        None => 86_400,
        // A number in a string is seconds, as 64-bit integers are written.
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().map_err(|_| bad("ttl is too long"))?
        }
        Some(serde_json::Value::String(s)) => crate::auth::parse_duration(&s).map_err(bad)?.as_secs(),
        Some(serde_json::Value::Number(n)) => n.as_u64().ok_or_else(|| bad("ttl must be a positive number"))?,
        Some(other) => return Err(bad(format!("ttl must be like \"24h\" or seconds, not {other}"))),
    };
    if ttl == 0 || ttl > MAX_TTL_SECS {
        return Err(bad(format!("ttl must be between 1 s and {} days", MAX_TTL_SECS / 86_400)));
    }
    let now = crate::auth::unix_now();
    let token = app.hub.auth.mint(&b.user, std::time::Duration::from_secs(ttl), now);
    ok(&Minted { token, user: b.user, expires_at: (now + ttl).to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"a"));
    }

    #[test]
    fn the_rate_limit_refills_and_says_when() {
        let api = Api::new("k".into(), "n".into(), 2);
        assert!(api.take().is_ok() && api.take().is_ok());
        assert_eq!(api.take(), Err(1));
    }

    #[test]
    fn error_codes_map_to_statuses() {
        assert_eq!(status_of(ErrorCode::Conflict), StatusCode::CONFLICT);
        assert_eq!(status_of(ErrorCode::AlreadyExists), StatusCode::CONFLICT);
        assert_eq!(status_of(ErrorCode::TooLarge), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(status_of(ErrorCode::ServerBusy), StatusCode::SERVICE_UNAVAILABLE);
    }
}
