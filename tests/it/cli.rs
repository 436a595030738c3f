//! The command-line programs as a newcomer meets them: `chatd token` says
//! which secret it signs with and does not invent one for a directory that
//! is not a server's, `chatd config print-default` shows a value for every
//! field, logs carry no colour codes when they are not on a terminal, and
//! the `chat` CLI explains an HTTP port, shows a room's recent messages on
//! entry, answers bad room commands plainly and reads its own messages.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::common::*;

fn chatd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatd")).args(args).env_remove("CHATD_TOKEN_SECRET").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn chatd_token_names_the_secret_it_signs_with() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data_s = data.to_str().unwrap();

    // A directory that does not exist yet: a new secret, and it says where.
    let o = chatd(&["token", "--data", data_s, "--user", "ann"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("created a new secret in") && stderr(&o).contains(data_s), "{}", stderr(&o));
    let secret = std::fs::read_to_string(data.join("secret")).unwrap();

    // The same directory again: the same secret, named.
    let o = chatd(&["token", "--data", data_s, "--user", "ann"]);
    assert!(o.status.success());
    assert!(stderr(&o).contains(&format!("signed with the secret in {}", data.join("secret").display())));
    assert_eq!(std::fs::read_to_string(data.join("secret")).unwrap(), secret, "kept");
    let token = stdout(&o).trim().to_string();
    let auth = chatd::auth::Auth::new(secret.trim_end().as_bytes());
    assert_eq!(auth.verify(&token, chatd::auth::unix_now()).unwrap().sub, "ann");

    // An empty directory (made ahead of the server, as a service manager
    // or a volume does) is new: it gets a secret.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = chatd(&["token", "--data", empty.to_str().unwrap(), "--user", "ann"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("created a new secret in"), "{}", stderr(&o));

    // A directory that holds files but no secret (a server that takes its
    // secret from its config, or something else) gets no new one.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("db"), b"a store").unwrap();
    let o = chatd(&["token", "--data", other.to_str().unwrap(), "--user", "ann"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("holds files but no secret"), "{}", stderr(&o));
    assert!(!other.join("secret").exists());
    assert!(stdout(&o).is_empty(), "no token printed");
}

#[test]
fn print_default_shows_a_value_for_every_field() {
    let o = chatd(&["config", "print-default"]);
    assert!(o.status.success());
    let text = stdout(&o);
    for line in text.lines() {
        assert!(!line.trim_end().ends_with('='), "a field without a value: {line:?}");
    }
    assert!(text.contains("# tls = \"0.0.0.0:7401\""), "{text}");
}

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = Process::start_with_env(tmp.path(), &[], &[("RUST_LOG", "info")]);
    // A connection that says nothing valid makes the server log something.
    let mut s = std::net::TcpStream::connect(&p.addr).unwrap();
    std::io::Write::write_all(&mut s, &u32::MAX.to_be_bytes()).unwrap();
    drop(s);
    assert!(p.terminate().success());
    // The lines are read by a thread: wait (bounded) for the shutdown's.
    p.wait_for_logs("shutdown line", |lines| lines.iter().any(|l| l.contains("SIGTERM")).then_some(()));
    let lines = p.log_lines();
    for l in &lines {
        assert!(!l.contains('\u{1b}'), "an ANSI escape in a log line: {l:?}");
    }
}

/// Runs the `chat` CLI with `args`, feeding `input` on stdin.
async fn chat(token: &str, args: &[String], input: &str) -> Output {
    let bin = workspace_bin("chat-client", "chat");
    let (token, args, input) = (token.to_string(), args.to_vec(), input.to_string());
    tokio::task::spawn_blocking(move || run_chat(&bin, &token, &args, &input)).await.unwrap()
}

fn run_chat(bin: &Path, token: &str, args: &[String], input: &str) -> Output {
    let mut child = Command::new(bin)
        .args(args)
        .env("CHAT_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_pointed_at_the_http_port_says_so() {
    let s = TestServer::start().await;
    let o = chat(&s.token("ann"), &args(&["--server", &s.http, "rooms"]), "").await;
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("HTTP") && err.contains("7400"), "{err}");
    assert!(!err.contains("frame length exceeds"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_send_leaves_no_unread_message_of_ones_own() {
    let s = TestServer::start().await;
    let o = chat(&s.token("ann"), &args(&["--server", &s.addr, "send", "general", "hello"]), "").await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("sent general #1"), "{}", stdout(&o));
    let o = chat(&s.token("ann"), &args(&["--server", &s.addr, "rooms"]), "").await;
    assert_eq!(stdout(&o).trim(), "general\thead 1\tread 1\tunread 0");

    // Messages from others that ann has not seen stay unread: the read
    // marker is a high-water mark, so her send does not move it past them;
    // her own message after it is not unread.
    let (bob, _ev) = s.client("bob").await;
    bob.join("general").await.unwrap();
    bob.publish("general", "one").await.unwrap();
    bob.publish("general", "two").await.unwrap();
    let o = chat(&s.token("ann"), &args(&["--server", &s.addr, "send", "general", "back"]), "").await;
    assert!(stdout(&o).contains("sent general #4"), "{}", stdout(&o));
    let o = chat(&s.token("ann"), &args(&["--server", &s.addr, "rooms"]), "").await;
    assert_eq!(stdout(&o).trim(), "general\thead 4\tread 1\tunread 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_chat_shows_recent_history_and_explains_bad_room_commands() {
    let s = TestServer::start().await;
    let (bob, _ev) = s.client("bob").await;
    bob.join("general").await.unwrap();
    for i in 1..=25 {
        bob.publish("general", &format!("earlier {i}")).await.unwrap();
    }
    let input = "/room nosuch\n/room\n/leave\n/leave\nstill here?\n/quit\n";
    let o = chat(&s.token("ann"), &args(&["--server", &s.addr, "--room", "general"]), input).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let (out, err) = (stdout(&o), stderr(&o));
    // The latest 20 on entry, oldest first; nothing older.
    let shown: Vec<&str> = out.lines().filter(|l| l.contains("earlier")).collect();
    assert_eq!(shown.len(), 20, "{out}");
    assert!(shown[0].ends_with("bob: earlier 6") && shown[19].ends_with("bob: earlier 25"), "{out}");
    assert!(err.contains("you are not in nosuch; /join nosuch first (your rooms: general)"), "{err}");
    assert!(err.contains("usage: /room ROOM"), "{err}");
    // `/leave` with no room leaves the current one; a second has none left.
    assert!(err.contains("* left general"), "{err}");
    assert!(err.contains("no current room"), "{err}");
    assert!(!err.contains("Unspecified") && !err.contains("BadRequest"), "{err}");
}
