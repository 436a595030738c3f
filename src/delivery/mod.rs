//! Delivery: what the fan-out hands to a connection, below rooms and above
//! the store (ARCHITECTURE.md, "Layers").
//!
//! * [`frame`] — frames encoded once and shared: a [`Frame`] is a reply or a
//!   range of a [`Run`], a room's messages from one committed batch back to
//!   back in one buffer.
//! * [`queue`] — the bounded [`Outbound`] queue of one connection, and the
//!   write-through into an idle TCP socket.
//! * [`subscriber`] — the shared half of a connection that rooms deliver
//!   to: its queue, the rooms where it is catching up from the log, who it
//!   is and what it sent ([`stats`]).
//!
//! Nothing here knows rooms, sessions or transports: a room is a
//! [`subscriber::Behind`] to catch up from, and a socket is a
//! [`queue::SendNow`] to write to.

pub mod frame;
pub mod queue;
pub mod stats;
pub mod subscriber;

pub use frame::{Frame, Run, message_frame, put_message_frame};
pub use queue::{Drained, Offered, Outbound, OutboundLimits, Rejected, SendNow};
pub use subscriber::{Behind, CatchUp, Subscriber};
