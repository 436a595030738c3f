//! chatd: a binary-protocol, high-throughput chat server.
//!
//! # Layout: the data path, as modules
//!
//! ```text
//!  client ──TCP/TLS──► net (accept, read frames) ─► codec (u32 BE length frames)
//!  client ──WebSocket─► http::ws (JSON or protobuf messages)      │ Envelope (proto)
//!                                                                  ▼
//!          session (auth, limits, requests — one core for every transport)
//!                                                                  │ Publish
//!                                                                  ▼
//!          hub (rooms, users, memberships) ─► room (assigns seq) ─► pipeline
//!            (store::commit: one batch, one sync) ─► pipeline::fanout
//!                                                                  │ a room's run of frames, encoded once
//!                                                                  ▼
//!          delivery (bounded queue per connection; a full queue catches
//!            up from the log later) ─► the connection's writer: one write per batch
//! ```
//!
//! Layers only look down (`tests/it/layers.rs` checks it):
//! `server`/`config` → `net`/`http` → [`session`] → [`hub`] → [`pipeline`] →
//! [`room`] → [`delivery`] → [`store`] → `auth`, `metrics`, `logs`,
//! `idmap`, [`codec`], [`proto`], `time`. ARCHITECTURE.md at the top of the
//! repository draws the data path and states the invariants.
//!
//! * [`proto`] — the generated `chat.v1` types; [`codec`] — framing. These
//!   two are all the client needs (built without the `server` feature).
//! * [`session`] — one session per connection: handshake, requests, the
//!   writer's slow-consumer policy; `session::join` runs its reader and
//!   writer in one task, each polled when woken.
//! * [`hub`] — the state sessions share: rooms, users, memberships, read
//!   markers, limits.
//! * [`pipeline`] — the group commit's completions: the fan-out stage
//!   delivers committed messages, then acks them; idempotency keys in
//!   flight.
//! * [`room`] — seq assignment, subscribers, catch-up from the log.
//! * [`delivery`] — encoded frames and runs, the bounded outbound queue, and
//!   the subscriber handle rooms deliver to.
//! * [`store`] — the [`store::Store`] trait, `store::sled`,
//!   `store::memory`, `store::commit` (group commit and durability).
//! * `idmap` — the small id-keyed map behind a room's subscribers and a
//!   user's rooms and read markers; `auth` — HS256 tokens and the secret
//!   file; `time` — clock helpers.
//! * `net` — listeners and the stream driver; `http` — the HTTP side.
//! * `config`, `server` — configuration and wiring.

#![warn(missing_docs)]

pub mod codec;
pub mod proto;

#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod delivery;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod hub;
#[cfg(feature = "server")]
pub mod idmap;
#[cfg(feature = "server")]
pub mod logs;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod net;
#[cfg(feature = "server")]
pub mod pipeline;
#[cfg(feature = "server")]
pub mod room;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod session;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod time;
