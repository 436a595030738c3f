//! chatd: a binary-protocol, high-throughput chat server.
//!
//! # Layout: the data path, as modules
//!
//! ```text
//!  client ──TCP──► net::tcp (accept) ─► net::stream (reader) ─► codec (u32 BE length frames)
//!                                                                     │ Envelope (proto)
//!                                                                     ▼
//!                         session (auth, limits, request dispatch — one core for every transport)
//!                                                                     │ Publish
//!                                                                     ▼
//!                         room (assigns seq) ─► store::commit (group commit: one batch,
//!                                                 one sync, store::sled) ─► room::fanout
//!                                                                     │ a room's run of frames, encoded once
//!                                                                     ▼
//!                         session::outbound (bounded queue per connection; a full
//!                           queue catches up from the log later) ─► net::stream (writer:
//!                           drain the queue, one write per batch)
//! ```
//!
//! * [`proto`] — the generated `chat.v1` types; [`codec`] — framing. These
//!   two are all the client needs (built without the `server` feature).
//! * [`session`] — one session per connection; [`session::outbound`] — its
//!   bounded queue; [`session::join`] — its reader and writer in one task,
//!   each polled when woken.
//! * [`room`] — seq assignment, subscribers, catch-up; [`room::fanout`] —
//!   delivery and acks after commit.
//! * [`store`] — the [`store::Store`] trait, [`store::sled`],
//!   [`store::memory`], [`store::commit`] (group commit and durability).
//! * [`hub`] — the state sessions share: rooms, users, memberships.
//! * [`idmap`] — the small id-keyed map behind a room's subscribers and a
//!   user's rooms and read markers.
//! * [`auth`] — HS256 tokens and the secret file.
//! * [`net`] — listeners and the stream driver; [`http`] — the HTTP side.
//! * [`config`], [`server`] — configuration and wiring.

#![warn(missing_docs)]

pub mod codec;
pub mod proto;

#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod config;
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
pub mod room;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod session;
#[cfg(feature = "server")]
pub mod store;
