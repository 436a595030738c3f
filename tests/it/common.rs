//! Test harness: a real server on ephemeral ports with a temporary data
//! directory (in-process, or the `chatd` binary for kill tests), a raw
//! frame-level connection, and token minting.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use chat_client::{Client, ClientConfig, Event, Events};
use chatd::auth::Auth;
use chatd::codec::{FrameReader, decode_envelope, put_frame};
use chatd::config::Config;
use chatd::proto::{self, Body, Envelope};
use chatd::server::Server;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(10);

/// A server in this process.
pub struct TestServer {
    pub server: Option<Server>,
    pub addr: String,
    pub http: String,
    pub tls: Option<String>,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

pub fn test_config(dir: &Path) -> Config {
    Config {
        data: dir.to_path_buf(),
        tcp: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        publish_rate: 0,
        ..Config::default()
    }
}

impl TestServer {
    /// A fresh server with a new data directory.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// A fresh server; `tweak` adjusts its configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut s = Self::start_in(&dir, tweak).await;
        s._tmp = Some(tmp);
        s
    }

    /// A server on an existing data directory.
    pub async fn start_in(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = test_config(dir);
        tweak(&mut config);
        let server = Server::start(&config).await.expect("server starts");
        TestServer {
            addr: server.tcp_addr.to_string(),
            http: server.http_addr.to_string(),
            tls: server.tls_addr.map(|a| a.to_string()),
            server: Some(server),
            dir: dir.to_path_buf(),
            _tmp: None,
        }
    }

    /// Graceful shutdown, keeping the data directory (the TempDir moves out).
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        self._tmp.take()
    }

    pub fn token(&self, user: &str) -> String {
        token_for(&self.dir, user)
    }

    /// A connected client for `user`.
    pub async fn client(&self, user: &str) -> (Client, Events) {
        self.client_with(user, |_| {}).await
    }

    pub async fn client_with(&self, user: &str, tweak: impl FnOnce(&mut ClientConfig)) -> (Client, Events) {
        let mut c = ClientConfig::new(self.addr.clone(), self.token(user));
        tweak(&mut c);
        Client::connect(c).await.expect("client connects")
    }

    /// A raw connection (no Hello sent yet).
    pub async fn raw(&self) -> Raw {
        Raw::connect(&self.addr).await
    }

    /// A raw connection that has said Hello as `user`.
    pub async fn raw_user(&self, user: &str) -> (Raw, proto::Welcome) {
        let mut r = self.raw().await;
        let w = r.hello(&self.token(user), vec![]).await;
        (r, w)
    }
}

/// Mints a token with the secret in `dir`.
pub fn token_for(dir: &Path, user: &str) -> String {
    let secret = chatd::auth::load_or_create_secret(dir).unwrap();
    Auth::new(secret.as_bytes()).mint(user, Duration::from_secs(3600), chatd::auth::unix_now())
}

/// A frame-level connection.
pub struct Raw {
    pub reader: FrameReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
}

impl Raw {
    pub async fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let (r, w) = s.into_split();
        Raw { reader: FrameReader::new(r, 1 << 20), writer: w }
    }

    /// A connection with a small receive buffer, so a reader that pauses
    /// makes the server's writes block early.
    pub async fn connect_small(addr: &str) -> Raw {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let s = sock.connect(addr.parse().unwrap()).await.unwrap();
        s.set_nodelay(true).unwrap();
        let (r, w) = s.into_split();
        Raw { reader: FrameReader::new(r, 1 << 20), writer: w }
    }

    /// Sends one envelope. A peer that already closed shows up on the next
    /// read (every caller checks what comes back).
    pub async fn send(&mut self, id: u64, body: Body) {
        let mut buf = BytesMut::new();
        put_frame(&mut buf, &Envelope::new(id, body));
        let _ = self.writer.write_all(&buf).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The server may already have closed on us; that is its right.
        let _ = self.writer.write_all(bytes).await;
    }

    /// The next envelope; panics after `WAIT`.
    pub async fn recv(&mut self) -> Envelope {
        self.try_recv().await.expect("connection closed while a frame was expected")
    }

    /// The next envelope, or None at end of stream.
    pub async fn try_recv(&mut self) -> Option<Envelope> {
        let f = tokio::time::timeout(WAIT, self.reader.read_frame()).await.expect("frame in time").ok()??;
        Some(decode_envelope(&f).expect("server frames decode"))
    }

    /// Whether the server closes the connection (EOF or reset) within `WAIT`.
    pub async fn closed(&mut self) -> bool {
        loop {
            match tokio::time::timeout(WAIT, self.reader.read_frame()).await {
                Err(_) => return false,
                Ok(Ok(Some(_))) => continue,
                Ok(_) => return true,
            }
        }
    }

    pub async fn hello(&mut self, token: &str, resume: Vec<proto::Cursor>) -> proto::Welcome {
        let h = proto::Hello { protocol_version: 1, token: token.into(), device: "raw".into(), resume };
        self.send(1, Body::Hello(h)).await;
        match self.recv().await.body {
            Some(Body::Welcome(w)) => w,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Sends a request and returns the reply with the same id, skipping pushes.
    pub async fn call(&mut self, id: u64, body: Body) -> Body {
        self.send(id, body).await;
        loop {
            let env = self.recv().await;
            if env.id == id {
                return env.body.expect("reply has a body");
            }
        }
    }

    /// The next server push (`id = 0`) of a message, skipping other frames.
    pub async fn next_message(&mut self) -> proto::Message {
        loop {
            if let Some(Body::Message(m)) = self.recv().await.body {
                return m;
            }
        }
    }
}

/// Asserts that `body` is an `Error` with `code`, returning its message.
pub fn expect_error(body: &Body, code: proto::ErrorCode) -> String {
    match body {
        Body::Error(e) if e.code() == code => e.message.clone(),
        other => panic!("expected error {code:?}, got {other:?}"),
    }
}

/// The next `Message` event, skipping other events; panics after `WAIT`.
pub async fn next_message(events: &mut Events) -> proto::Message {
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await.expect("message in time") {
            Some(Event::Message(m)) => return m,
            Some(_) => continue,
            None => panic!("client closed"),
        }
    }
}

/// Collects `n` messages from `events`.
pub async fn collect_messages(events: &mut Events, n: usize) -> Vec<proto::Message> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        v.push(next_message(events).await);
    }
    v
}

/// The `chatd` binary run as a child process (for signals).
pub struct Process {
    pub child: Child,
    pub addr: String,
    pub tls: Option<String>,
    /// Every stderr line after the listening line.
    logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `chatd serve` on `dir` and waits until it listens.
    pub fn start(dir: &Path, extra: &[&str]) -> Process {
        Self::start_with_env(dir, extra, &[("RUST_LOG", "warn")])
    }

    /// Starts `chatd serve` with extra environment variables.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatd"))
            .args(["serve", "--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--publish-rate", "0", "--data"])
            .arg(dir)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chatd starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                match line.strip_prefix("chatd listening: tcp ") {
                    Some(rest) if tx.is_some() => {
                        let _ = tx.take().unwrap().send(rest.to_string());
                    }
                    _ => sink.lock().unwrap().push(line),
                }
            }
        });
        let line = match rx.recv_timeout(WAIT) {
            Ok(line) => line,
            Err(e) => {
                let status = child.try_wait();
                panic!(
                    "chatd did not print its address ({e}); exit: {status:?}; its output: {:?}",
                    logs.lock().unwrap()
                );
            }
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        let addr = words[0].to_string();
        let tls = words.iter().position(|w| *w == "tls").map(|i| words[i + 1].to_string());
        Process { child, addr, tls, logs }
    }

    /// Log lines printed so far (after the listening line).
    pub fn log_lines(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Whether the process is still running.
    pub fn try_wait_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare HTTP/1.1 GET; returns the status code and body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).await
}

/// A bare HTTP/1.1 POST without a body.
pub async fn http_post(addr: &str, path: &str) -> (u16, String) {
    http_request(addr, "POST", path).await
}

async fn http_request(addr: &str, method: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_raw(addr, method, path, &format!("Host: {addr}\r\n")).await;
    (status, body)
}

/// A bare HTTP/1.1 request without a body; `headers` are whole lines, each
/// ending in CRLF, and must include `Host`. Returns the status, the header
/// block (names as sent, one `name: value` per line) and the body.
pub async fn http_raw(addr: &str, method: &str, path: &str, headers: &str) -> (u16, String, String) {
    use tokio::io::AsyncReadExt;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out)).await.unwrap().unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_string(), body.to_string())
}

/// A WebSocket client speaking JSON (or protobuf in binary messages).
pub struct Ws {
    pub ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
}

impl Ws {
    pub async fn connect(http: &str) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws")).await.expect("websocket upgrade");
        Ws { ws }
    }

    /// Over a socket with a small receive buffer (for slow-reader tests).
    pub async fn connect_small(http: &str) -> Ws {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let tcp = sock.connect(http.parse().unwrap()).await.unwrap();
        let (ws, _) =
            tokio_tungstenite::client_async(format!("ws://{http}/ws"), tokio_tungstenite::MaybeTlsStream::Plain(tcp))
                .await
                .expect("websocket upgrade");
        Ws { ws }
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        use futures_util::SinkExt;
        self.ws.send(tokio_tungstenite::tungstenite::Message::Text(text.into().into())).await.unwrap();
    }

    pub async fn send_json(&mut self, v: serde_json::Value) {
        self.send_text(v.to_string()).await
    }

    pub async fn send_binary(&mut self, env: &Envelope) {
        use futures_util::SinkExt;
        use prost::Message as _;
        self.ws.send(tokio_tungstenite::tungstenite::Message::Binary(env.encode_to_vec().into())).await.unwrap();
    }

    /// The next data message: JSON text as a Value, or binary decoded and
    /// re-expressed as JSON (so tests can compare both the same way).
    pub async fn recv(&mut self) -> Received {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next()).await.expect("message in time");
            match m {
                Some(Ok(Message::Text(t))) => return Received::Json(serde_json::from_str(t.as_str()).unwrap()),
                Some(Ok(Message::Binary(b))) => return Received::Binary(decode_envelope(&b).unwrap()),
                Some(Ok(Message::Close(f))) => return Received::Closed(f.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) => return Received::Failed,
                None => return Received::Closed(None),
            }
        }
    }

    pub async fn json(&mut self) -> serde_json::Value {
        match self.recv().await {
            Received::Json(v) => v,
            other => panic!("expected a JSON message, got {other:?}"),
        }
    }

    /// Hello with a token; returns the welcome.
    pub async fn hello(&mut self, token: &str) -> serde_json::Value {
        self.send_json(
            serde_json::json!({"id": "1", "hello": {"protocolVersion": 1, "token": token, "device": "ws-test"}}),
        )
        .await;
        let w = self.json().await;
        assert!(w.get("welcome").is_some(), "{w}");
        w
    }

    /// The reply (JSON) to request `id`, skipping pushes.
    pub async fn call(&mut self, id: u64, body: serde_json::Value) -> serde_json::Value {
        let mut req = body;
        req["id"] = serde_json::Value::String(id.to_string());
        self.send_json(req).await;
        loop {
            let v = self.json().await;
            if v["id"] == serde_json::Value::String(id.to_string()) {
                return v;
            }
        }
    }
}

#[derive(Debug)]
pub enum Received {
    Json(serde_json::Value),
    Binary(Envelope),
    Closed(Option<u16>),
    Failed,
}

/// A binary of another workspace package (`chat`, `chat-bench`), built into
/// this test run's target directory: the test run builds only this
/// package's binaries, and cargo has released its lock by the time tests
/// run. It is built (a no-op when fresh) on each test process's first use,
/// not only when missing: a binary left from before an edit would otherwise
/// be tested in place of the code being changed.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let chatd = Path::new(env!("CARGO_BIN_EXE_chatd"));
    let path = chatd.with_file_name(bin);
    let mut built = BUILT.lock().unwrap();
    if !built.iter().any(|b| b == bin) {
        let profile_dir = chatd.parent().expect("target/<profile>/chatd");
        let target_dir = profile_dir.parent().expect("target/<profile>/chatd");
        // Cargo's `dev` profile builds into `debug`; the others into their names.
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", package, "--bin", bin, "--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building {bin} failed");
        built.push(bin.to_string());
    }
    path
}
