//! Transports for length-framed streams: the TCP listener ([`tcp`]), TLS
//! ([`tls`]), and the connection driver ([`stream`]) that both run through. They only move frames between sockets and the
//! session core. Beside them, the data directory's Unix socket over which
//! a running server streams backups ([`backup`]).

pub mod backup;
pub mod stream;
pub mod tcp;
pub mod tls;
