//! A real `redis-server` on loopback for the cluster tests: started on a
//! free port in a temporary directory, durable as chatd requires
//! (`appendonly yes`, `appendfsync always`) unless a test asks otherwise,
//! and killable and restartable on the same port and data.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::WAIT;

/// A `redis-server` child process.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: std::path::PathBuf,
    _tmp: Option<tempfile::TempDir>,
    extra: Vec<String>,
}

impl RedisServer {
    /// The binary, or `None` after a loud skip message; under `CI=true` a
    /// missing Redis fails the test instead.
    pub fn available(test: &str) -> bool {
        let found = Command::new("redis-server").arg("--version").output().is_ok_and(|o| o.status.success());
        if !found {
            let msg = format!(
                "SKIPPED: {test} needs redis-server (apt-get install redis-server); cluster mode was NOT tested"
            );
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg} — under CI=true this is a failure");
            eprintln!("\n!!!!!!!!!! {msg} !!!!!!!!!!\n");
        }
        found
    }

    /// [`RedisServer::start_with`] for `test`, or `None` after the skip
    /// message of [`RedisServer::available`].
    pub fn for_test(test: &str, extra: &[&str]) -> Option<RedisServer> {
        Self::available(test).then(|| Self::start_with(extra))
    }

    /// A durable Redis (`appendonly yes`, `appendfsync always`), with
    /// `extra` arguments after those defaults.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = RedisServer {
            child: None,
            port: free_port(),
            dir: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.spawn();
        r
    }

    /// A durable Redis whose data is in `dir` (created if missing): one
    /// started again on the same `dir` has everything the last one had.
    pub fn start_at(dir: &std::path::Path) -> RedisServer {
        std::fs::create_dir_all(dir).unwrap();
        let mut r =
            RedisServer { child: None, port: free_port(), dir: dir.to_path_buf(), _tmp: None, extra: Vec::new() };
        r.spawn();
        r
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let dir = self.dir.to_str().unwrap().to_string();
        let mut args: Vec<String> = [
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--logfile",
            "redis.log",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.extra.iter().cloned());
        let child = Command::new("redis-server")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while self.cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(Instant::now() < deadline, "redis-server on port {} did not answer PING", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `redis-cli` against it; its trimmed output, or `None` when it
    /// failed to connect.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }

    /// SIGKILL: whatever Redis had not written is gone with it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters (no replicas), each a durable
/// `redis-server` with cluster mode on, joined by `redis-cli --cluster
/// create`.
pub struct RedisCluster {
    /// The masters.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three masters and waits until the cluster is ok on each.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let deadline = Instant::now() + WAIT;
        for n in &nodes {
            while !n.cli(&["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok")) {
                assert!(Instant::now() < deadline, "the Redis Cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    /// `redis+cluster://H1:P1,H2:P2,H3:P3`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The master that serves `key`'s slot.
    pub fn owner_of(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[0].cli(&["CLUSTER", "KEYSLOT", key]).unwrap().parse().unwrap();
        // Each master's own line of CLUSTER NODES ends with its slot ranges.
        for (i, n) in self.nodes.iter().enumerate() {
            let nodes = n.cli(&["CLUSTER", "NODES"]).unwrap();
            let mine = nodes.lines().find(|l| l.contains("myself")).unwrap();
            for range in mine.split(' ').skip(8) {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(start), Ok(end)) = (start.parse::<u16>(), end.parse::<u16>())
                    && (start..=end).contains(&slot)
                {
                    return i;
                }
            }
        }
        panic!("no master serves slot {slot}");
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
