//! `chat-bench`: the load tester for chatd.
//!
//! Scenarios (subcommands): `fanout`, `rooms`, `durable` (optionally with
//! a share of edits and reactions), `history`, `connections`, `resume`. Each runs a warm-up, then measures for `--duration`; verifies
//! what it receives (per room: seq order, no gap, no duplicate); reports
//! delivered msgs/s, acks/s and latency percentiles from a send timestamp
//! carried in each payload (HDR histogram), errors, and the server's CPU
//! time and memory when `--server-pid` is given. `--json FILE` writes the
//! result, `--plot FILE.svg` draws latency and throughput.
//!
//! It speaks chatd's protocol through the same codec as `chat-client`
//! (`chatd::codec`, `chatd::proto`) — there is no second implementation.

mod conn;
mod report;
mod scenarios;
mod stats;
mod sys;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "chat-bench", version, about = "Load tester for chatd")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

/// Options every scenario takes.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Server address (native protocol; the TLS port with --tls); a
    /// comma-separated list spreads the connections over a cluster's nodes
    /// (connection n to the n-th address, in turn).
    #[arg(long, global = true, default_value = "127.0.0.1:7400")]
    pub server: String,
    /// Mint tokens with DIR/secret (the server's data directory).
    #[arg(long, global = true)]
    pub data: Option<PathBuf>,
    /// Mint tokens with the secret in this file.
    #[arg(long, global = true)]
    pub secret_file: Option<PathBuf>,
    /// Use this one token for every connection (one user: the server's
    /// sessions-per-user limit applies).
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// Measured time, seconds.
    #[arg(long, global = true, default_value_t = 10.0)]
    pub duration: f64,
    /// Warm-up before measuring, seconds.
    #[arg(long, global = true, default_value_t = 2.0)]
    pub warmup: f64,
    /// Payload size in bytes (at least 24: timestamp, publisher, counter).
    #[arg(long, global = true, default_value_t = 100)]
    pub size: usize,
    /// The server's PID: report its CPU time and memory.
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// Write the full result as JSON.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
    /// Draw latency distribution and throughput over time, as SVG (the file
    /// must be named `.svg`).
    #[arg(long, global = true)]
    pub plot: Option<PathBuf>,
    /// Connect over TLS.
    #[arg(long, global = true)]
    pub tls: bool,
    /// With --tls: trust this PEM file instead of the system roots.
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// Spread connections over 127.0.0.1..127.0.0.N as source addresses
    /// (beyond ~28k connections one source runs out of ports).
    #[arg(long, global = true, default_value_t = 1)]
    pub src_ips: u8,
    /// New connections per second while connecting (0 = as fast as possible).
    #[arg(long, global = true, default_value_t = 2000)]
    pub connect_rate: u32,
    /// Prefix of the user ids (a run id is appended, so reruns never clash).
    #[arg(long, global = true, default_value = "bench")]
    pub user_prefix: String,
}

#[derive(Subcommand, Clone, Debug)]
enum Scenario {
    /// One room, many subscribers, some publishers.
    Fanout {
        /// Subscriber connections.
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        /// Publisher connections.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Publishes per second per publisher; 0 = as fast as the in-flight window allows.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Unacknowledged publishes per publisher (the in-flight window).
        #[arg(long, default_value_t = 64)]
        inflight: usize,
    },
    /// Many rooms with a few members each; publishers spread over the rooms.
    Rooms {
        /// Rooms.
        #[arg(long, default_value_t = 1000)]
        rooms: usize,
        /// Member connections per room.
        #[arg(long, default_value_t = 10)]
        members: usize,
        /// Publisher connections (each is a member of every room it publishes to).
        #[arg(long, default_value_t = 10)]
        publishers: usize,
        /// Publishes per second per publisher; 0 = as fast as the window allows.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// In-flight window per publisher.
        #[arg(long, default_value_t = 16)]
        inflight: usize,
    },
    /// Publish throughput with durable acks.
    Durable {
        /// Publisher connections.
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        /// Unacknowledged publishes per publisher.
        #[arg(long, default_value_t = 256)]
        inflight: usize,
        /// Rooms the publishers spread over.
        #[arg(long, default_value_t = 4)]
        rooms: usize,
        /// Percent of requests that are changes to a publisher's own latest
        /// message (reactions and edits in turn) instead of new messages.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100))]
        changes: u64,
    },
    /// History pages read from a room whose messages carry reactions: the
    /// cost of folding a message's latest state into what is read.
    History {
        /// Messages in the room (published first, unless it has them).
        #[arg(long, default_value_t = 2000)]
        messages: usize,
        /// Reactions on each message (by up to 50 users, as many keys as needed).
        #[arg(long, default_value_t = 0)]
        reactions: usize,
        /// Reader connections.
        #[arg(long, default_value_t = 4)]
        readers: usize,
        /// Pages outstanding per reader.
        #[arg(long, default_value_t = 4)]
        inflight: usize,
        /// Messages per page.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Many idle authenticated connections; server memory per connection.
    Connections {
        /// Connections to open and hold.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
    },
    /// Clients that disconnect and come back with cursors while publishing
    /// continues; catch-up time, and no gap or duplicate.
    Resume {
        /// Resuming clients.
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// Publishes per second into the room.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Seconds each client stays away.
        #[arg(long, default_value_t = 2.0)]
        away: f64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.common.size >= 24, "--size must be at least 24 bytes (timestamp, publisher, counter)");
    // Checked before the run, not after it: the plot is SVG, and SVG written
    // to a `.png` would be a file that lies about what it holds.
    if let Some(path) = &cli.common.plot {
        anyhow::ensure!(
            path.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg")),
            "--plot {}: the plot is drawn as SVG; name the file .svg (convert it to PNG with e.g. rsvg-convert)",
            path.display()
        );
    }
    sys::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(async {
        let ctx = scenarios::Context::new(cli.common.clone())?;
        match cli.scenario.clone() {
            Scenario::Fanout { subscribers, publishers, rate, inflight } => {
                scenarios::fanout(&ctx, 1, subscribers, publishers, rate, inflight, "fanout").await
            }
            Scenario::Rooms { rooms, members, publishers, rate, inflight } => {
                scenarios::fanout(&ctx, rooms, members, publishers, rate, inflight, "rooms").await
            }
            Scenario::Durable { publishers, inflight, rooms, changes } => {
                scenarios::durable(&ctx, publishers, inflight, rooms, scenarios::ChangeMix { percent: changes }).await
            }
            Scenario::History { messages, reactions, readers, inflight, limit } => {
                scenarios::history(&ctx, messages, reactions, readers, inflight, limit).await
            }
            Scenario::Connections { connections } => scenarios::connections(&ctx, connections).await,
            Scenario::Resume { clients, rate, away } => {
                scenarios::resume(&ctx, clients, rate, Duration::from_secs_f64(away)).await
            }
        }
    })?;
    report::print(&result);
    if let Some(path) = &cli.common.json {
        std::fs::write(path, serde_json::to_string_pretty(&result.to_json())?)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &cli.common.plot {
        std::fs::write(path, report::svg(&result))?;
        eprintln!("wrote {}", path.display());
    }
    if result.violations() > 0 {
        eprintln!(
            "VERIFICATION FAILED: {} gaps, {} duplicates, {} out of order",
            result.gaps, result.duplicates, result.out_of_order
        );
        std::process::exit(2);
    }
    Ok(())
}
