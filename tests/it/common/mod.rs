//! Test harness, one file per topic, everything re-exported here so a test
//! file needs only `use crate::common::*`:
//!
//! * [`server`]: a real server in this process ([`TestServer`]) on
//!   ephemeral ports with a temporary data directory, its configuration,
//!   and tokens signed with its secret;
//! * [`process`]: the `chatd` binary as a child process ([`Process`]) for
//!   signals, kills and logs, and the workspace's other binaries;
//! * [`raw`]: a frame-level connection ([`Raw`]) with one helper per common
//!   step: say Hello, join, publish (one, or a pipelined batch), read a
//!   room's whole history, expect an error or a `GoAway`;
//! * [`client`]: waiting on `chat-client` events;
//! * [`ws`]: a WebSocket connection ([`Ws`]) speaking JSON or protobuf;
//! * [`http`]: bare HTTP requests, the admin API, `/metrics` as a map;
//! * [`wait`]: bounded waits that poll until something holds.

pub mod client;
pub mod http;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod redis;
pub mod server;
pub mod wait;
pub mod ws;

use std::time::Duration;

pub use client::*;
pub use http::*;
pub use process::*;
pub use raw::*;
pub use server::*;
pub use wait::*;
pub use ws::*;

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(10);
