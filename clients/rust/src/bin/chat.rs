//! `chat`: a command-line chat client built on `chat-client`.
//!
//! * `chat --server ADDR --token TOKEN [--room ROOM]...` — interactive: joins
//!   the rooms, prints incoming messages, and sends each line typed on stdin
//!   to the current room (`/help` lists the commands).
//! * `chat ... send ROOM TEXT` — joins ROOM if needed, publishes, prints the
//!   ack.
//! * `chat ... history ROOM [--limit N] [--before SEQ]` — prints a page.
//! * `chat ... rooms` — lists the user's rooms with unread counts.
//! * Rooms, roles and moderation (proto/README.md §8): `create ROOM
//!   [--private] [--title T] [--topic T] [--invite USER]...`, `invite ROOM
//!   USER`, `invites`, `accept ROOM`, `decline ROOM`, `kick ROOM USER
//!   [--reason R]`, `ban ROOM USER [--reason R]`, `unban ROOM USER`, `role
//!   ROOM USER member|admin|owner`, `members ROOM`, `topic ROOM TEXT`,
//!   `directory [QUERY]`.
//! * Message changes (proto/README.md §9): `edit ROOM SEQ TEXT`, `delete
//!   ROOM SEQ`, `react ROOM SEQ KEY [--remove]`, `reply ROOM SEQ TEXT
//!   [--mention USER]...`.
//!
//! Output is one item per line; a message is `[ROOM #SEQ] SENDER: TEXT`, or
//! `[ROOM #SEQ] * notice: TEXT` when the system posted it (sender ""). A
//! message shows its latest state: `(edited)` after an edited text, `(deleted)`
//! for a deleted one, `↪ #N` before a reply and its reactions after it
//! (`[👍 2]`); a change entry is a sentence (`ann edited #3: TEXT`). A
//! refused request prints the server's error code and message on stderr and
//! exits non-zero.

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
    /// Create a room with you as its owner.
    Create {
        /// Room name.
        room: String,
        /// Only invited users may join (default: anyone).
        #[arg(long)]
        private: bool,
        /// Title (at most 128 characters).
        #[arg(long)]
        title: Option<String>,
        /// Topic (at most 1,024 characters).
        #[arg(long)]
        topic: Option<String>,
        /// Users to invite (repeat the option, or separate with commas).
        #[arg(long, value_delimiter = ',')]
        invite: Vec<String>,
    },
    /// Invite a user to a room.
    Invite {
        /// Room.
        room: String,
        /// User to invite.
        user: String,
    },
    /// List your pending invitations.
    Invites,
    /// Accept an invitation: join the room.
    Accept {
        /// Room you are invited to.
        room: String,
    },
    /// Decline an invitation.
    Decline {
        /// Room you are invited to.
        room: String,
    },
    /// Remove a member from a room (or withdraw their invitation).
    Kick {
        /// Room.
        room: String,
        /// Member to remove.
        user: String,
        /// Why (logged by the server).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Remove a user from a room and keep them out until unbanned.
    Ban {
        /// Room.
        room: String,
        /// User to ban.
        user: String,
        /// Why (logged by the server).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let a banned user join a room again.
    Unban {
        /// Room.
        room: String,
        /// User to unban.
        user: String,
        /// Why (logged by the server).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Set a member's role (owner only; `owner` hands ownership on).
    Role {
        /// Room.
        room: String,
        /// Member.
        user: String,
        /// The new role.
        role: RoleArg,
    },
    /// List a room's members: role, and whether online.
    Members {
        /// Room.
        room: String,
    },
    /// Set a room's topic ("" clears it).
    Topic {
        /// Room.
        room: String,
        /// The new topic.
        text: String,
    },
    /// List public rooms (those whose name or title contains QUERY).
    Directory {
        /// Text to look for, case-insensitive (default: every public room).
        query: Option<String>,
    },
    /// Replace the text of one of your messages.
    Edit {
        /// Room.
        room: String,
        /// The message's seq.
        seq: u64,
        /// The new text.
        text: String,
    },
    /// Delete a message (yours, or any as a room admin): its content is erased.
    Delete {
        /// Room.
        room: String,
        /// The message's seq.
        seq: u64,
    },
    /// React to a message (or take the reaction back).
    React {
        /// Room.
        room: String,
        /// The message's seq.
        seq: u64,
        /// The reaction, e.g. an emoji (at most 64 bytes).
        key: String,
        /// Take the reaction back instead.
        #[arg(long)]
        remove: bool,
    },
    /// Reply to a message.
    Reply {
        /// Room.
        room: String,
        /// The seq of the message answered.
        seq: u64,
        /// Text of the reply.
        text: String,
        /// Users to mention (repeat the option, or separate with commas).
        #[arg(long, value_delimiter = ',')]
        mention: Vec<String>,
    },
}

/// A role `chat role` can give.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    /// Publish and read; invite to a public room.
    Member,
    /// Also invite, remove and ban members, change title and topic.
    Admin,
    /// Hand ownership on (you become admin).
    Owner,
}

impl From<RoleArg> for proto::Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Member => proto::Role::Member,
            RoleArg::Admin => proto::Role::Admin,
            RoleArg::Owner => proto::Role::Owner,
        }
    }
}

fn role_name(r: proto::Role) -> &'static str {
    match r {
        proto::Role::Owner => "owner",
        proto::Role::Admin => "admin",
        proto::Role::Member => "member",
        proto::Role::Unspecified => "not a member",
    }
}

fn kind_name(k: proto::RoomKind) -> &'static str {
    match k {
        proto::RoomKind::Public => "public",
        proto::RoomKind::Private => "private",
        proto::RoomKind::Direct => "direct",
        proto::RoomKind::Unspecified => "kind unknown",
    }
}

/// A room's details in a few words: `private, 2 members, owner ann,
/// title "Core team", topic "Release 2.0"`.
fn describe(info: &proto::RoomInfo) -> String {
    let count = info.member_count;
    let mut parts = vec![kind_name(info.kind()).to_string(), format!("{count} member{}", plural(count))];
    if !info.owner.is_empty() {
        parts.push(format!("owner {}", info.owner));
    }
    if !info.title.is_empty() {
        parts.push(format!("title {:?}", info.title));
    }
    if !info.topic.is_empty() {
        parts.push(format!("topic {:?}", info.topic));
    }
    parts.join(", ")
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// A room change pushed to its members, as a sentence.
fn update_line(u: &proto::RoomUpdate) -> String {
    let room = u.info.as_ref().map_or("?", |i| i.room.as_str());
    let (by, user) = (u.by.as_str(), u.user.as_str());
    let what = match u.change() {
        proto::MemberChange::Unspecified => {
            format!("{by} changed the room ({})", u.info.as_ref().map(describe).unwrap_or_default())
        }
        proto::MemberChange::Joined => format!("{user} joined"),
        proto::MemberChange::Left => format!("{user} left"),
        proto::MemberChange::Invited => format!("{by} invited {user}"),
        proto::MemberChange::Removed => format!("{by} removed {user}"),
        proto::MemberChange::Banned => format!("{by} banned {user}"),
        proto::MemberChange::Unbanned => format!("{by} unbanned {user}"),
        proto::MemberChange::RoleChanged => format!("{by} made {user} {}", role_name(u.role())),
        proto::MemberChange::Declined => format!("{user} declined the invitation"),
    };
    format!("{room}: {what}")
}

/// Why this user is no longer in a room, as a sentence.
fn left_line(l: &proto::Left) -> String {
    match l.reason() {
        proto::MemberChange::Removed => format!("you were removed from {} by {}", l.room, l.by),
        proto::MemberChange::Banned => format!("you were banned from {} by {}", l.room, l.by),
        proto::MemberChange::Left => format!("you left {} on another device", l.room),
        _ => format!("you are not in {}", l.room),
    }
}

/// A message as one line: `[general #4] ann: hello`. A notice (a message the
/// application's backend posted as the system: its sender is "") reads
/// `[general #4] * notice: your order has shipped`; the `*` keeps it apart
/// from a user named `notice` (no user id has a `*` or a space).
fn line(m: &proto::Message) -> String {
    use chat_client::changes::Entry;
    let at = format!("[{} #{}]", m.room, m.seq);
    let who = &m.sender;
    match Entry::of(m) {
        Entry::Edit { target, text: "", .. } => format!("{at} {who} edited #{target} (since deleted)"),
        Entry::Edit { target, text, .. } => format!("{at} {who} edited #{target}: {text}"),
        Entry::Delete { target, .. } => format!("{at} {who} deleted #{target}"),
        Entry::Reaction { target, key, add: true, .. } => format!("{at} {who} reacted {key} to #{target}"),
        Entry::Reaction { target, key, add: false, .. } => format!("{at} {who} took back {key} on #{target}"),
        Entry::Message(m) => {
            let mut body = if m.deleted {
                "(deleted)".to_string()
            } else if m.text.is_empty() && !m.data.is_empty() {
                format!("<{} bytes>", m.data.len())
            } else {
                m.text.clone()
            };
            if m.edited_ms > 0 && !m.deleted {
                body.push_str(" (edited)");
            }
            if m.reply_to > 0 {
                body = format!("↪ #{} {body}", m.reply_to);
            }
            if !m.reactions.is_empty() {
                let r: Vec<String> = m.reactions.iter().map(|r| format!("{} {}", r.key, r.count)).collect();
                body = format!("{body}  [{}]", r.join(", "));
            }
            if m.sender.is_empty() { format!("{at} * notice: {body}") } else { format!("{at} {who}: {body}") }
        }
    }
}

/// The ack of a change, as a line.
fn change_line(what: &str, target: u64, ack: &proto::PublishAck) -> String {
    if ack.duplicate && ack.seq == target {
        format!("{what} {} #{target}: already so", ack.room)
    } else {
        format!("{what} {} #{target} (entry #{}){}", ack.room, ack.seq, if ack.duplicate { " (duplicate)" } else { "" })
    }
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
            let state = client.join(&room).await?.state.unwrap_or_default();
            let ack = client.publish(&room, &text).await?;
            println!("sent {} #{}{}", ack.room, ack.seq, if ack.duplicate { " (duplicate)" } else { "" });
            // One's own message is read, or it would count as unread in
            // `chat rooms` and on every device. The read marker is a
            // high-water mark, so only when nothing before it was unread:
            // others' messages stay unread until the user has seen them.
            if state.read_seq >= state.head_seq
                && ack.seq == state.head_seq + 1
                && let Err(e) = client.mark_read(&room, ack.seq).await
            {
                eprintln!("(sent, but not marked read: {e})");
            }
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
                let mentions = if r.mentions > 0 { format!("\tmentions {}", r.mentions) } else { String::new() };
                println!("{}\thead {}\tread {}\tunread {}{mentions}", r.room, r.head_seq, r.read_seq, r.unread);
            }
        }
        Some(Cmd::Create { room, private, title, topic, invite }) => {
            let kind = if private { proto::RoomKind::Private } else { proto::RoomKind::Public };
            let (title, topic) = (title.unwrap_or_default(), topic.unwrap_or_default());
            let create = proto::CreateRoom { room, kind: kind as i32, title, topic, invite: invite.clone() };
            let info = client.create_room(create).await?;
            println!("created {} ({})", info.room, describe(&info));
            for user in &invite {
                println!("invited {user} to {}", info.room);
            }
        }
        Some(Cmd::Invite { room, user }) => {
            client.invite(&room, &user).await?;
            println!("invited {user} to {room}");
        }
        Some(Cmd::Invites) => {
            let invites = client.invites();
            if invites.is_empty() {
                eprintln!("no pending invitations");
            }
            for i in &invites {
                let about = i.info.as_ref().map(describe).unwrap_or_default();
                println!("{}\tinvited by {}\t{about}", i.room, i.by);
            }
        }
        Some(Cmd::Accept { room }) => {
            let state = client.join(&room).await?.state.unwrap_or_default();
            let about = state.info.as_ref().map(|i| format!(" ({})", describe(i))).unwrap_or_default();
            println!("joined {}{about}", state.room);
        }
        Some(Cmd::Decline { room }) => {
            client.decline_invite(&room).await?;
            println!("declined the invitation to {room}");
        }
        Some(Cmd::Kick { room, user, reason }) => {
            client.remove_member(&room, &user, reason.as_deref().unwrap_or_default()).await?;
            println!("removed {user} from {room}");
        }
        Some(Cmd::Ban { room, user, reason }) => {
            client.ban(&room, &user, reason.as_deref().unwrap_or_default()).await?;
            println!("banned {user} from {room}");
        }
        Some(Cmd::Unban { room, user, reason }) => {
            client.unban(&room, &user, reason.as_deref().unwrap_or_default()).await?;
            println!("unbanned {user} in {room}");
        }
        Some(Cmd::Role { room, user, role }) => {
            let role = proto::Role::from(role);
            let info = client.set_role(&room, &user, role).await?;
            match role {
                proto::Role::Owner => {
                    println!("{user} is now owner of {room}; you are {}", role_name(info.my_role()))
                }
                _ => println!("{user} is now {} in {room}", role_name(role)),
            }
        }
        Some(Cmd::Members { room }) => {
            let mut after_user = String::new();
            loop {
                let req = proto::ListMembers { room: room.clone(), after_user, limit: 0 };
                let page = client.list_members(req).await?;
                for m in &page.members {
                    println!("{}\t{}\t{}", m.user, role_name(m.role()), if m.online { "online" } else { "offline" });
                }
                match page.members.last() {
                    Some(last) if page.has_more => after_user = last.user.clone(),
                    _ => break,
                }
            }
        }
        Some(Cmd::Topic { room, text }) => {
            let update = proto::UpdateRoom { room: room.clone(), topic: Some(text.clone()), ..Default::default() };
            client.update_room(update).await?;
            if text.is_empty() {
                println!("cleared the topic of {room}");
            } else {
                println!("topic of {room}: {text}");
            }
        }
        Some(Cmd::Edit { room, seq, text }) => {
            println!("{}", change_line("edited", seq, &client.edit(&room, seq, &text).await?))
        }
        Some(Cmd::Delete { room, seq }) => {
            println!("{}", change_line("deleted", seq, &client.delete(&room, seq).await?))
        }
        Some(Cmd::React { room, seq, key, remove }) => {
            let ack = client.react(&room, seq, &key, !remove).await?;
            println!("{}", change_line(if remove { "took back" } else { "reacted" }, seq, &ack));
        }
        Some(Cmd::Reply { room, seq, text, mention }) => {
            let mentions: Vec<&str> = mention.iter().map(String::as_str).collect();
            let ack = client.reply(&room, seq, &text, &mentions).await?;
            println!("sent {} #{} (reply to #{seq})", ack.room, ack.seq);
        }
        Some(Cmd::Directory { query }) => {
            let query = query.unwrap_or_default();
            let mut after_room = String::new();
            let mut listed = 0;
            loop {
                let req = proto::ListRooms { query: query.clone(), after_room, limit: 0 };
                let list = client.list_rooms(req).await?;
                for r in &list.rooms {
                    println!("{}\t{}", r.room, describe(r));
                }
                listed += list.rooms.len();
                match list.rooms.last() {
                    Some(last) if list.has_more => after_room = last.room.clone(),
                    _ => break,
                }
            }
            if listed == 0 {
                eprintln!(
                    "no public rooms{}",
                    if query.is_empty() { String::new() } else { format!(" match {query:?}") }
                );
            }
        }
        None => interactive(client, &mut events, cli.rooms).await?,
    }
    Ok(())
}

/// Messages shown from a room's history when it becomes the current room.
const RECENT: u32 = 20;

/// What the interactive mode knows: the rooms the user is in, the current
/// one, and the last seq printed per room (history and live messages
/// overlap by the messages published while the history was fetched).
struct Shell {
    client: Client,
    rooms: std::collections::BTreeSet<String>,
    current: Option<String>,
    printed: std::collections::HashMap<String, u64>,
}

impl Shell {
    /// Prints `m` unless it was printed already.
    fn print(&mut self, m: &proto::Message) {
        let last = self.printed.entry(m.room.clone()).or_default();
        if m.seq > *last {
            *last = m.seq;
            println!("{}", line(m));
        }
    }

    /// Makes `room` current and shows its latest messages, even those a
    /// live message of it already passed; live messages the page holds too
    /// are not printed again.
    async fn enter(&mut self, room: &str) -> anyhow::Result<()> {
        self.current = Some(room.to_string());
        let page =
            self.client.history(proto::History { room: room.to_string(), limit: RECENT, ..Default::default() }).await?;
        if page.messages.is_empty() {
            eprintln!("* {room}: no messages yet");
        } else {
            eprintln!("* {room}: the latest {} messages", page.messages.len());
        }
        for m in &page.messages {
            println!("{}", line(m));
        }
        if let Some(last) = page.messages.last() {
            let printed = self.printed.entry(room.to_string()).or_default();
            *printed = (*printed).max(last.seq);
        }
        Ok(())
    }

    /// The room a command names, or the current one when it names none.
    fn room_arg(&self, arg: &str) -> anyhow::Result<String> {
        match (arg, &self.current) {
            ("", Some(room)) => Ok(room.clone()),
            ("", None) => anyhow::bail!("no current room; name one, or /join ROOM first"),
            (room, _) => Ok(room.to_string()),
        }
    }

    async fn command(&mut self, cmd: &str, arg: &str, text: &str) -> anyhow::Result<()> {
        match cmd {
            "/help" => eprintln!(
                "/join ROOM  /leave [ROOM]  /room ROOM (switch)  /rooms  /history [N]  /read  /quit; anything else is sent"
            ),
            "/join" => {
                anyhow::ensure!(!arg.is_empty(), "usage: /join ROOM");
                let j = self.client.join(arg).await?;
                let st = j.state.unwrap_or_default();
                eprintln!("* joined {} (head #{}, online: {})", st.room, st.head_seq, j.online.join(", "));
                self.rooms.insert(st.room.clone());
                self.enter(&st.room).await?;
            }
            "/leave" => {
                let room = self.room_arg(arg)?;
                self.client.leave(&room).await?;
                eprintln!("* left {room}");
                self.rooms.remove(&room);
                if self.current.as_deref() == Some(room.as_str()) {
                    self.current = None;
                    match self.rooms.iter().next().cloned() {
                        Some(next) => self.enter(&next).await?,
                        None => eprintln!("* in no room; /join ROOM"),
                    }
                }
            }
            "/room" => {
                anyhow::ensure!(!arg.is_empty(), "usage: /room ROOM (one of: {})", self.room_list());
                anyhow::ensure!(
                    self.rooms.contains(arg),
                    "you are not in {arg}; /join {arg} first (your rooms: {})",
                    self.room_list()
                );
                self.enter(arg).await?;
            }
            "/rooms" => eprintln!("* your rooms: {}", self.room_list()),
            "/history" => {
                let room = self.room_arg("")?;
                let limit = if arg.is_empty() { RECENT } else { arg.parse().context("usage: /history [N]")? };
                let page = self.client.history(proto::History { room, limit, ..Default::default() }).await?;
                page.messages.iter().for_each(|m| println!("{}", line(m)));
            }
            "/read" => {
                let room = self.room_arg("")?;
                let seq = self.printed.get(&room).copied().unwrap_or(u64::MAX);
                let r = self.client.mark_read(&room, seq).await?;
                eprintln!("* read up to #{} in {}", r.seq, r.room);
            }
            _ if cmd.starts_with('/') => anyhow::bail!("unknown command {cmd}; /help lists them"),
            _ => {
                let room = self.room_arg("")?;
                let ack = self.client.publish(&room, text).await?;
                // Sent from here, so read here, when everything before it
                // was shown here too (the read marker is a high-water mark).
                if self.printed.get(&room).is_some_and(|&p| p + 1 >= ack.seq) {
                    self.client.mark_read(&room, ack.seq).await?;
                }
            }
        }
        Ok(())
    }

    /// The user is no longer in `room` (left elsewhere, removed, banned).
    fn gone(&mut self, room: &str) {
        self.rooms.remove(room);
        if self.current.as_deref() == Some(room) {
            self.current = None;
            eprintln!("* no current room; /room or /join one (your rooms: {})", self.room_list());
        }
    }

    fn room_list(&self) -> String {
        if self.rooms.is_empty() { "none".into() } else { self.rooms.iter().cloned().collect::<Vec<_>>().join(", ") }
    }
}

async fn interactive(client: Client, events: &mut chat_client::Events, rooms: Vec<String>) -> anyhow::Result<()> {
    let w = client.welcome().clone();
    eprintln!("connected as {} ({} rooms); /help for commands", w.user, w.rooms.len());
    let mut shell = Shell {
        client,
        rooms: w.rooms.iter().map(|r| r.room.clone()).collect(),
        current: None,
        printed: Default::default(),
    };
    for r in &rooms {
        shell.client.join(r).await.with_context(|| format!("joining {r}"))?;
        shell.rooms.insert(r.clone());
    }
    if let Some(first) = rooms.first().cloned().or_else(|| w.rooms.first().map(|r| r.room.clone())) {
        shell.enter(&first).await?;
    }
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut reconnecting = false;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Message(m)) => shell.print(&m),
                Some(Event::Disconnected(why)) => {
                    eprintln!("* disconnected ({why}); reconnecting");
                    reconnecting = true;
                }
                // Back after a drop: rooms may have been joined or left
                // elsewhere meanwhile. (The first `Connected` is the welcome
                // this shell started from.)
                Some(Event::Connected(w)) if std::mem::take(&mut reconnecting) => {
                    shell.rooms = w.rooms.iter().map(|r| r.room.clone()).collect();
                }
                Some(Event::Connected(_)) => {}
                Some(Event::Synced(s)) => eprintln!("* {} caught up to #{}", s.room, s.head_seq),
                Some(Event::Typing(t)) if t.active => eprintln!("* {} is typing in {}", t.user, t.room),
                Some(Event::Presence(p)) => eprintln!("* {} is {} in {}", p.user, if p.online { "online" } else { "offline" }, p.room),
                Some(Event::ServerError(e)) => eprintln!("* server: {}: {}", chat_client::error_code_name(e.code()), e.message),
                Some(Event::GoAway(g)) => eprintln!("* server going away: {}", g.message),
                Some(Event::Added(j)) => {
                    if let Some(st) = j.state {
                        eprintln!("* you are now in {}", st.room);
                        shell.rooms.insert(st.room);
                    }
                }
                Some(Event::Invitation(i)) => eprintln!("* {} invited you to {}; /join {} to accept", i.by, i.room, i.room),
                // One's own joins and leaves are reported by their commands.
                Some(Event::RoomUpdate(u)) if !(u.by == w.user && u.user == w.user) => eprintln!("* {}", update_line(&u)),
                Some(Event::Left(l)) => {
                    eprintln!("* {}", left_line(&l));
                    shell.gone(&l.room);
                }
                Some(_) => {}
                None => return Ok(()),
            },
            l = stdin.next_line() => {
                let Some(l) = l? else { return Ok(()) };
                let l = l.trim();
                if l.is_empty() {
                    continue;
                }
                if l == "/quit" {
                    return Ok(());
                }
                let (cmd, arg) = l.split_once(' ').map_or((l, ""), |(c, a)| (c, a.trim()));
                if let Err(e) = shell.command(cmd, arg, l).await {
                    eprintln!("* {e:#}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(room: &str) -> proto::RoomInfo {
        proto::RoomInfo {
            room: room.into(),
            kind: proto::RoomKind::Private as i32,
            member_count: 2,
            owner: "ann".into(),
            my_role: proto::Role::Member as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_room_is_described_by_what_it_has() {
        let mut i = info("team");
        assert_eq!(describe(&i), "private, 2 members, owner ann");
        (i.member_count, i.title, i.topic) = (1, "Core \"team\"".into(), "Release 2.0".into());
        assert_eq!(describe(&i), r#"private, 1 member, owner ann, title "Core \"team\"", topic "Release 2.0""#);
    }

    #[test]
    fn a_message_from_the_system_prints_as_a_notice() {
        let message = |sender: &str, text: &str| proto::Message {
            room: "general".into(),
            seq: 4,
            sender: sender.into(),
            text: text.into(),
            ..Default::default()
        };
        assert_eq!(line(&message("ann", "hello")), "[general #4] ann: hello");
        assert_eq!(line(&message("", "your order has shipped")), "[general #4] * notice: your order has shipped");
        // A user named "notice" is still a user.
        assert_eq!(line(&message("notice", "hi")), "[general #4] notice: hi");
        let data = proto::Message { data: vec![0; 3].into(), ..message("", "") };
        assert_eq!(line(&data), "[general #4] * notice: <3 bytes>");
    }

    #[test]
    fn room_changes_and_departures_read_as_sentences() {
        let update = |change: proto::MemberChange, role: proto::Role| proto::RoomUpdate {
            info: Some(info("team")),
            by: "ann".into(),
            user: "bob".into(),
            change: change as i32,
            role: role as i32,
        };
        assert_eq!(update_line(&update(proto::MemberChange::Banned, proto::Role::Unspecified)), "team: ann banned bob");
        assert_eq!(
            update_line(&update(proto::MemberChange::RoleChanged, proto::Role::Admin)),
            "team: ann made bob admin"
        );
        assert_eq!(update_line(&update(proto::MemberChange::Joined, proto::Role::Member)), "team: bob joined");
        let mut details = update(proto::MemberChange::Unspecified, proto::Role::Unspecified);
        details.user.clear();
        assert_eq!(update_line(&details), "team: ann changed the room (private, 2 members, owner ann)");

        let left = |reason: proto::MemberChange, by: &str| proto::Left {
            room: "team".into(),
            reason: reason as i32,
            by: by.into(),
        };
        assert_eq!(left_line(&left(proto::MemberChange::Removed, "ann")), "you were removed from team by ann");
        assert_eq!(left_line(&left(proto::MemberChange::Banned, "ann")), "you were banned from team by ann");
        assert_eq!(left_line(&left(proto::MemberChange::Left, "me")), "you left team on another device");
        assert_eq!(left_line(&left(proto::MemberChange::Unspecified, "")), "you are not in team");
    }
}
