//! A server in this process, and what any server under test offers: its TCP
//! address, tokens signed with its secret, raw connections as a user.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chat_client::{Client, ClientConfig, Events};
use chatd::auth::Auth;
use chatd::config::Config;
use chatd::proto;
use chatd::server::Server;

use super::{Raw, Ws};

/// A server in this process.
pub struct TestServer {
    pub server: Option<Server>,
    pub addr: String,
    pub http: String,
    pub tls: Option<String>,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    /// With `CHATD_TEST_CLUSTER=1`: the server is the first of three
    /// cluster nodes over a Redis of its own ([`TestServer::start_in`]).
    cluster: Option<ClusterNodes>,
}

/// The other nodes of a test cluster, and its Redis.
struct ClusterNodes {
    others: Vec<Server>,
    /// Every node's TCP address, the first node's first.
    addrs: Vec<String>,
    /// Which node the next connection goes to.
    next: std::sync::atomic::AtomicUsize,
    _redis: super::redis::RedisServer,
}

/// Whether the suites run against a three-node cluster
/// (`CHATD_TEST_CLUSTER=1`, set by `.ci/run` for a second pass of the
/// suites where one node and a cluster must behave alike).
pub fn cluster_mode() -> bool {
    std::env::var("CHATD_TEST_CLUSTER").as_deref() == Ok("1")
}

/// The configuration of a test server on `dir`: ephemeral loopback ports and
/// no publish rate limit.
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

    /// A server on an existing data directory. With
    /// `CHATD_TEST_CLUSTER=1`, three cluster nodes over a Redis whose data
    /// is in the data directory (the
    /// server the tests reach by `server`, `addr` and `http` is the first;
    /// connections made through [`ChatServer`] and [`TestServer::client`]
    /// go to the nodes in turn).
    pub async fn start_in(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = test_config(dir);
        tweak(&mut config);
        let redis = match cluster_mode() && config.cluster_redis.is_none() {
            true => {
                assert!(
                    super::redis::RedisServer::available("CHATD_TEST_CLUSTER=1"),
                    "cluster mode needs redis-server"
                );
                // In the data directory: a restart of the cluster on it
                // finds what Redis had.
                let redis = super::redis::RedisServer::start_at(&dir.join("redis"));
                config.cluster_redis = Some(redis.url());
                // Rooms idle for a moment are evicted and read again when
                // used: the suites exercise that path throughout.
                config.cluster_replica_idle_ms = 200;
                Some(redis)
            }
            false => None,
        };
        let server = Server::start(&config).await.expect("server starts");
        let cluster = match redis {
            Some(redis) => {
                let mut others = Vec::new();
                let mut addrs = vec![server.tcp_addr.to_string()];
                // Ports of their own (a test that gives the server fixed
                // addresses gives them to the first), the same again when
                // the cluster restarts on this directory: its clients
                // reconnect where they were.
                let known = dir.join("cluster-nodes");
                let before: Vec<String> =
                    std::fs::read_to_string(&known).unwrap_or_default().lines().map(str::to_string).collect();
                let mut config = config.clone();
                config.http = "127.0.0.1:0".parse().unwrap();
                config.tls = config.tls.map(|_| "127.0.0.1:0".parse().unwrap());
                for i in 0..2 {
                    config.tcp = before.get(i).map_or("127.0.0.1:0", |a| a.as_str()).parse().unwrap();
                    let node = Server::start(&config).await.expect("a cluster node starts");
                    addrs.push(node.tcp_addr.to_string());
                    others.push(node);
                }
                std::fs::write(&known, addrs[1..].join("\n")).unwrap();
                Some(ClusterNodes { others, addrs, next: Default::default(), _redis: redis })
            }
            None => None,
        };
        TestServer {
            addr: server.tcp_addr.to_string(),
            http: server.http_addr.to_string(),
            tls: server.tls_addr.map(|a| a.to_string()),
            server: Some(server),
            dir: dir.to_path_buf(),
            _tmp: None,
            cluster,
        }
    }

    /// Graceful shutdown, keeping the data directory (the TempDir moves out).
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        if let Some(c) = self.cluster.take() {
            for node in c.others {
                node.shutdown().await;
            }
        }
        self._tmp.take()
    }

    /// A connected client for `user`.
    pub async fn client(&self, user: &str) -> (Client, Events) {
        self.client_with(user, |_| {}).await
    }

    /// A connected client for `user`; `tweak` adjusts its configuration.
    pub async fn client_with(&self, user: &str, tweak: impl FnOnce(&mut ClientConfig)) -> (Client, Events) {
        let mut c = ClientConfig::new(ChatServer::addr(self).to_string(), self.token(user));
        tweak(&mut c);
        Client::connect(c).await.expect("client connects")
    }

    /// A WebSocket connection that has said Hello (JSON) as `user`.
    pub async fn ws_user(&self, user: &str) -> Ws {
        let mut ws = Ws::connect(&self.http).await;
        ws.hello(&self.token(user)).await;
        ws
    }
}

/// What a test reaches a server by, in process ([`TestServer`]) or as the
/// binary ([`super::Process`]): its TCP address and its data directory,
/// whose secret signs the users' tokens.
pub trait ChatServer {
    /// The native protocol's address.
    fn addr(&self) -> &str;

    /// The data directory (holding the token secret).
    fn dir(&self) -> &Path;

    /// A token for `user`, valid for an hour.
    fn token(&self, user: &str) -> String {
        token_for(self.dir(), user)
    }

    /// A token for `user` that expires `ttl` from now.
    fn token_valid_for(&self, user: &str, ttl: Duration) -> String {
        mint_token(self.dir(), user, ttl, chatd::auth::unix_now())
    }

    /// A raw connection (no Hello sent yet).
    async fn raw(&self) -> Raw {
        Raw::connect(self.addr()).await
    }

    /// A raw connection that has said Hello as `user`.
    async fn raw_user(&self, user: &str) -> (Raw, proto::Welcome) {
        let mut r = self.raw().await;
        let w = r.hello(&self.token(user), vec![]).await;
        (r, w)
    }

    /// A raw connection that has said Hello as `user` and joined `room`.
    async fn raw_member(&self, user: &str, room: &str) -> Raw {
        let (mut r, _) = self.raw_user(user).await;
        r.join(room).await;
        r
    }
}

impl ChatServer for TestServer {
    fn addr(&self) -> &str {
        match &self.cluster {
            Some(c) => &c.addrs[c.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % c.addrs.len()],
            None => &self.addr,
        }
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Mints a token for `user` with the secret in `dir`, valid for an hour.
pub fn token_for(dir: &Path, user: &str) -> String {
    mint_token(dir, user, Duration::from_secs(3600), chatd::auth::unix_now())
}

/// Mints a token for `user` with the secret in `dir`, issued at `now` (unix
/// seconds) and valid for `ttl`: short-lived, or already expired.
pub fn mint_token(dir: &Path, user: &str, ttl: Duration, now: u64) -> String {
    let secret = chatd::auth::load_or_create_secret(dir).unwrap();
    Auth::new(secret.as_bytes()).mint(user, ttl, now)
}
