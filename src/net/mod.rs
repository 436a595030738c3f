//! Transports for length-framed streams: the TCP listener ([`tcp`]) and
//! the connection driver ([`stream`]) that any byte stream (plain TCP now,
//! TLS later) runs through. They only move frames between sockets and the
//! session core.

pub mod stream;
pub mod tcp;
