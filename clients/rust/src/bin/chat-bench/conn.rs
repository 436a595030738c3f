//! Bench connections: TCP (or TLS) to the server, framed with chatd's codec,
//! source addresses spread over 127.0.0.x when asked, and tokens minted
//! locally with the server's secret (HS256, as any JWT library would).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::BytesMut;
use chatd::codec::{FrameReader, decode_envelope, put_frame};
use chatd::proto::{self, Body, Envelope};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::Common;

pub type Reader = FrameReader<Box<dyn AsyncRead + Unpin + Send>>;
pub type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// How to obtain a token for a user.
pub enum Tokens {
    /// Mint with this HMAC key.
    Secret(Vec<u8>),
    /// One token for everyone.
    Fixed(String),
}

impl Tokens {
    pub fn from(c: &Common) -> anyhow::Result<Self> {
        let read = |p: &std::path::Path| -> anyhow::Result<Vec<u8>> {
            let s = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Ok(s.strip_suffix('\n').unwrap_or(&s).as_bytes().to_vec())
        };
        if let Some(dir) = &c.data {
            return Ok(Tokens::Secret(read(&dir.join("secret"))?));
        }
        if let Some(f) = &c.secret_file {
            return Ok(Tokens::Secret(read(f)?));
        }
        if let Some(t) = &c.token {
            return Ok(Tokens::Fixed(t.clone()));
        }
        bail!("give --data DIR (the server's data directory), --secret-file FILE or --token TOKEN")
    }

    /// A token for `user`, valid for a day.
    pub fn token(&self, user: &str) -> String {
        match self {
            Tokens::Fixed(t) => t.clone(),
            Tokens::Secret(key) => {
                use base64::Engine as _;
                let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
                let claims = b64.encode(format!(r#"{{"sub":"{user}","exp":{}}}"#, now + 86400));
                let signed = format!("{header}.{claims}");
                let sig = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), signed.as_bytes());
                format!("{signed}.{}", b64.encode(sig.as_ref()))
            }
        }
    }
}

/// One open, authenticated connection.
pub struct Conn {
    pub reader: Reader,
    pub writer: Writer,
    pub welcome: proto::Welcome,
    next_id: u64,
}

/// Connects from 127.0.0.(1 + n % spread) when `spread > 1`.
async fn dial(addr: SocketAddr, spread: u8, n: usize) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    if spread > 1 && addr.is_ipv4() {
        let ip = Ipv4Addr::new(127, 0, 0, 1 + (n % spread as usize) as u8);
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    socket.connect(addr).await
}

/// Opens connection number `n` for `user`, says Hello (with `resume`), and
/// waits for Welcome.
pub async fn open(
    c: &Common,
    tokens: &Tokens,
    n: usize,
    user: &str,
    resume: Vec<proto::Cursor>,
) -> anyhow::Result<Conn> {
    // A list of a cluster's nodes: connection n goes to the n-th, in turn.
    let servers: Vec<&str> = c.server.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let server = *servers.get(n % servers.len().max(1)).ok_or_else(|| anyhow!("--server names no address"))?;
    let addr: SocketAddr = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("resolving {server}"))?
        .next()
        .ok_or_else(|| anyhow!("{server} resolves to nothing"))?;
    let tcp = match dial(addr, c.src_ips, n).await {
        // One source address has ~28k ephemeral ports to a given server
        // port; when they run out, spread over 127.0.0.2.. by ourselves.
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable && addr.ip().is_loopback() && c.src_ips <= 1 => {
            dial(addr, 250, n).await
        }
        other => other,
    }
    .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let (r, w): (Box<dyn AsyncRead + Unpin + Send>, Writer) = if c.tls {
        let opts = chat_client::TlsOptions { ca: c.ca.clone(), server_name: None };
        let tls = chat_client::tls::connect(tcp, server, &opts).await?;
        let (r, w) = tokio::io::split(tls);
        (Box::new(r), Box::new(w))
    } else {
        let (r, w) = tcp.into_split();
        (Box::new(r), Box::new(w))
    };
    let mut conn = Conn { reader: FrameReader::new(r, 1 << 20), writer: w, welcome: Default::default(), next_id: 1 };
    let hello = proto::Hello { protocol_version: 1, token: tokens.token(user), device: "chat-bench".into(), resume };
    match conn.call(Body::Hello(hello)).await? {
        Body::Welcome(w) => conn.welcome = w,
        other => bail!("hello as {user}: expected welcome, got {}", other.name()),
    }
    Ok(conn)
}

impl Conn {
    /// A fresh request id.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends one request and waits for its reply (skipping pushes).
    pub async fn call(&mut self, body: Body) -> anyhow::Result<Body> {
        let id = self.next_id();
        let mut buf = BytesMut::new();
        put_frame(&mut buf, &Envelope::new(id, body));
        self.writer.write_all(&buf).await?;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.reader.read_frame())
                .await
                .map_err(|_| anyhow!("no reply within 30 s"))??
                .ok_or_else(|| anyhow!("server closed the connection"))?;
            let env = decode_envelope(&frame)?;
            if env.id == id {
                return match env.body {
                    Some(Body::Error(e)) => Err(anyhow!("{:?}: {}", e.code(), e.message)),
                    Some(b) => Ok(b),
                    None => bail!("empty reply"),
                };
            }
        }
    }

    /// Joins `room`; returns its head.
    pub async fn join(&mut self, room: &str) -> anyhow::Result<u64> {
        match self.call(Body::Join(proto::Join { room: room.into() })).await? {
            Body::Joined(j) => Ok(j.state.map_or(0, |s| s.head_seq)),
            other => bail!("join: expected joined, got {}", other.name()),
        }
    }
}

/// Opens `count` connections, `rate` per second, running `setup` on each.
pub async fn open_many<F, Fut>(c: &Common, count: usize, make: F) -> anyhow::Result<Vec<Conn>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Conn>> + Send + 'static,
{
    let mut handles = Vec::with_capacity(count);
    let pause =
        if c.connect_rate == 0 { Duration::ZERO } else { Duration::from_secs_f64(1.0 / f64::from(c.connect_rate)) };
    let mut next = tokio::time::Instant::now();
    for i in 0..count {
        handles.push(tokio::spawn(make(i)));
        if !pause.is_zero() {
            next += pause;
            tokio::time::sleep_until(next).await;
        }
    }
    let mut out = Vec::with_capacity(count);
    for h in handles {
        out.push(h.await??);
    }
    Ok(out)
}
