//! Integration tests: each starts a real server on ephemeral ports with a
//! temporary data directory and talks to it over TCP, either frame by frame
//! (`protocol`) or through `chat-client` (`chat`, `resume`), or runs the
//! `chatd` binary to signal and kill it (`durability`), also on a file
//! system that can lose what was not synced (`powerloss`).

mod api;
mod backup;
mod battery;
mod bench;
mod browser;
mod changes;
mod chat;
mod cli;
mod cli_rooms;
mod cluster;
mod cluster_faults;
mod cluster_nodes;
mod common;
mod deploy;
mod durability;
mod faults;
mod hostile;
mod layers;
mod limits;
mod ops;
mod powerloss;
mod presence;
mod properties;
mod protocol;
mod release;
mod resume;
mod retention;
mod rooms;
mod rooms_model;
mod tls;
mod websocket;
