//! The workspace's binaries as child processes: `chatd` itself (for
//! signals, kills and its logs) and the others (`chat`, `chat-bench`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{ChatServer, WAIT};

/// The `chatd` binary run as a child process (for signals).
pub struct Process {
    pub child: Child,
    pub addr: String,
    /// The HTTP listener's address.
    pub http: String,
    pub tls: Option<String>,
    /// The data directory.
    dir: PathBuf,
    /// Every stderr line after the listening line.
    logs: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `chatd serve` on `dir` and waits until it listens.
    pub fn start(dir: &Path, extra: &[&str]) -> Process {
        Self::start_with_env(dir, extra, &[("RUST_LOG", "warn")])
    }

    /// Starts `chatd serve` with extra environment variables.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Process {
        Self::try_start_with_env(dir, extra, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `chatd serve` on `dir`, or says why it did not come up (it
    /// exited, or printed no address within `WAIT`): for a test that
    /// counts a refusal to start as a finding rather than a failure.
    pub fn try_start(dir: &Path, extra: &[&str]) -> Result<Process, String> {
        Self::try_start_with_env(dir, extra, &[("RUST_LOG", "warn")])
    }

    /// Starts `chatd serve` on `dir` listening on the given TCP and HTTP
    /// addresses (a node restarted where its clients look for it).
    pub fn start_at(dir: &Path, tcp: &str, http: &str, extra: &[&str]) -> Process {
        Self::spawn(dir, [tcp, http], extra, &[("RUST_LOG", "warn")]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Result<Process, String> {
        Self::spawn(dir, ["127.0.0.1:0", "127.0.0.1:0"], extra, env)
    }

    fn spawn(dir: &Path, [tcp, http]: [&str; 2], extra: &[&str], env: &[(&str, &str)]) -> Result<Process, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatd"))
            .args(["serve", "--tcp", tcp, "--http", http, "--publish-rate", "0", "--data"])
            .arg(dir)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chatd starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let logs = Arc::new(Mutex::new(Vec::new()));
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
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "chatd did not print its address ({e}); exit: {status:?}; its output: {:?}",
                    logs.lock().unwrap()
                ));
            }
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        let addr = words[0].to_string();
        let tls = words.iter().position(|w| *w == "tls").map(|i| words[i + 1].to_string());
        let http = words.iter().position(|w| *w == "http").map(|i| words[i + 1].to_string()).unwrap_or_default();
        Ok(Process { child, addr, http, tls, dir: dir.to_path_buf(), logs })
    }

    /// Log lines printed so far (after the listening line).
    pub fn log_lines(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Polls the log lines (blocking this thread) until `check` takes them,
    /// returning what it found; panics, naming `what`, after `WAIT`.
    pub fn wait_for_logs<T>(&self, what: &str, mut check: impl FnMut(&[String]) -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let lines = self.log_lines();
            if let Some(found) = check(&lines) {
                return found;
            }
            assert!(std::time::Instant::now() < deadline, "no {what} in the logs: {lines:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn try_wait_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends the signal `name` (`"TERM"`, `"HUP"`, …) without waiting.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success(), "kill -{name}");
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.child.wait().unwrap()
    }
}

impl ChatServer for Process {
    fn addr(&self) -> &str {
        &self.addr
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that a finished command succeeded, showing its output if not.
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A binary of another workspace package (`chat`, `chat-bench`), built into
/// this test run's target directory: the test run builds only this
/// package's binaries, and cargo has released its lock by the time tests
/// run. It is built (a no-op when fresh) on each test process's first use,
/// not only when missing: a binary left from before an edit would otherwise
/// be tested in place of the code being changed.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
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
