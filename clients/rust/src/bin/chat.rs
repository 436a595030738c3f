//! `chat`: a command-line chat client built on `chat-client`.
//!
//! * `chat --server ADDR --token TOKEN [--room ROOM]...` — interactive: joins
//!   the rooms, prints incoming messages, and sends each line typed on stdin
//!   to the current room (`/help` lists the commands).
//! * `chat ... send ROOM TEXT` — joins ROOM if needed, publishes, prints the
//!   ack.
//! * `chat ... history ROOM [--limit N] [--before SEQ]` — prints a page.
//! * `chat ... rooms` — lists the user's rooms with unread counts.

use anyhow::Context as _;
use chat_client::{Client, ClientConfig, Event};
use chatd::proto;
use clap::{Parser, Subcommand};
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
#[command(name = "chat", version, about = "Command-line client for chatd")]
struct Cli {
    /// Server address (native protocol).
    #[arg(long, env = "CHAT_SERVER", default_value = "127.0.0.1:7400")]
    server: String,
    /// Token (from `chatd token --user NAME`).
    #[arg(long, env = "CHAT_TOKEN", hide_env_values = true)]
    token: String,
    /// Device label.
    #[arg(long, default_value = "cli")]
    device: String,
    /// Connect over TLS (the server's TLS port, 7401 by default).
    #[arg(long)]
    tls: bool,
    /// With --tls: trust this PEM file (a private CA, or the server's
    /// --dev-tls certificate) instead of the system's roots.
    #[arg(long, requires = "tls")]
    ca: Option<std::path::PathBuf>,
    /// With --tls: the name to verify the certificate against (default: the
    /// host in --server).
    #[arg(long, requires = "tls")]
    server_name: Option<String>,
    /// Rooms to join at start (interactive mode); the first is current.
    #[arg(long = "room")]
    rooms: Vec<String>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Publish one message and print its ack.
    Send {
        /// Room (joined first if needed).
        room: String,
        /// Text of the message.
        text: String,
    },
    /// Print a page of a room's history.
    History {
        /// Room.
        room: String,
        /// Messages to show (max 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only messages older than this seq (0 = newest).
        #[arg(long, default_value_t = 0)]
        before: u64,
    },
    /// List rooms with head, read marker and unread count.
    Rooms,
}

fn line(m: &proto::Message) -> String {
    let body =
        if m.text.is_empty() && !m.data.is_empty() { format!("<{} bytes>", m.data.len()) } else { m.text.clone() };
    format!("[{} #{}] {}: {}", m.room, m.seq, m.sender, body)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = ClientConfig::new(cli.server.clone(), cli.token.clone());
    config.device = cli.device.clone();
    if cli.tls {
        config.tls = Some(chat_client::TlsOptions { ca: cli.ca.clone(), server_name: cli.server_name.clone() });
    }
    let oneshot = cli.command.is_some();
    config.reconnect = !oneshot;
    let (client, mut events) =
        Client::connect(config).await.with_context(|| format!("connecting to {}", cli.server))?;
    match cli.command {
        Some(Cmd::Send { room, text }) => {
            client.join(&room).await?;
            let ack = client.publish(&room, &text).await?;
            println!("sent {} #{}{}", ack.room, ack.seq, if ack.duplicate { " (duplicate)" } else { "" });
        }
        Some(Cmd::History { room, limit, before }) => {
            let page = client
                .history(proto::History { room: room.clone(), before_seq: before, limit, ..Default::default() })
                .await?;
            for m in &page.messages {
                println!("{}", line(m));
            }
            if page.has_more {
                let oldest = page.messages.first().map_or(0, |m| m.seq);
                println!("(more: chat history {room} --before {oldest})");
            }
        }
        Some(Cmd::Rooms) => {
            for r in &client.welcome().rooms {
                println!(
                    "{}\thead {}\tread {}\tunread {}",
                    r.room,
                    r.head_seq,
                    r.read_seq,
                    r.head_seq.saturating_sub(r.read_seq)
                );
            }
        }
        None => interactive(client, &mut events, cli.rooms).await?,
    }
    Ok(())
}

async fn interactive(client: Client, events: &mut chat_client::Events, rooms: Vec<String>) -> anyhow::Result<()> {
    let w = client.welcome();
    eprintln!("connected as {} ({} rooms); /help for commands", w.user, w.rooms.len());
    for r in &rooms {
        client.join(r).await.with_context(|| format!("joining {r}"))?;
    }
    let mut current = rooms.first().cloned().or_else(|| w.rooms.first().map(|r| r.room.clone()));
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut last_seen: std::collections::HashMap<String, u64> = Default::default();
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Message(m)) => {
                    last_seen.insert(m.room.clone(), m.seq);
                    println!("{}", line(&m));
                }
                Some(Event::Disconnected(why)) => eprintln!("* disconnected ({why}); reconnecting"),
                Some(Event::Connected(_)) => {}
                Some(Event::Synced(s)) => eprintln!("* {} caught up to #{}", s.room, s.head_seq),
                Some(Event::Typing(t)) if t.active => eprintln!("* {} is typing in {}", t.user, t.room),
                Some(Event::Presence(p)) => eprintln!("* {} is {} in {}", p.user, if p.online { "online" } else { "offline" }, p.room),
                Some(Event::ServerError(e)) => eprintln!("* server: {:?}: {}", e.code(), e.message),
                Some(Event::GoAway(g)) => eprintln!("* server going away: {}", g.message),
                Some(_) => {}
                None => return Ok(()),
            },
            l = stdin.next_line() => {
                let Some(l) = l? else { return Ok(()) };
                let l = l.trim();
                if l.is_empty() {
                    continue;
                }
                let mut parts = l.splitn(2, ' ');
                let (cmd, arg) = (parts.next().unwrap_or(""), parts.next().unwrap_or("").trim());
                let result = match cmd {
                    "/help" => {
                        eprintln!("/join ROOM  /leave ROOM  /room ROOM (switch)  /history [N]  /read  /quit; anything else is sent");
                        Ok(())
                    }
                    "/quit" => return Ok(()),
                    "/join" => client.join(arg).await.map(|j| {
                        let s = j.state.unwrap_or_default();
                        eprintln!("* joined {} (head #{}, online: {})", s.room, s.head_seq, j.online.join(", "));
                        current = Some(s.room);
                    }),
                    "/leave" => client.leave(arg).await.map(|_| eprintln!("* left {arg}")),
                    "/room" => {
                        current = Some(arg.to_string());
                        Ok(())
                    }
                    "/history" => match &current {
                        Some(room) => client
                            .history(proto::History { room: room.clone(), limit: arg.parse().unwrap_or(20), ..Default::default() })
                            .await
                            .map(|p| p.messages.iter().for_each(|m| println!("{}", line(m)))),
                        None => {
                            eprintln!("* no current room; /join ROOM first");
                            Ok(())
                        }
                    },
                    "/read" => match &current {
                        Some(room) => {
                            let seq = last_seen.get(room).copied().unwrap_or(u64::MAX);
                            client.mark_read(room, seq).await.map(|r| eprintln!("* read up to #{} in {}", r.seq, r.room))
                        }
                        None => Ok(()),
                    },
                    _ => match &current {
                        Some(room) => client.publish(room, l).await.map(|_| ()),
                        None => {
                            eprintln!("* no current room; /join ROOM first");
                            Ok(())
                        }
                    },
                };
                if let Err(e) = result {
                    eprintln!("* {e}");
                }
            }
        }
    }
}
