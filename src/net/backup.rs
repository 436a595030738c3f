//! The backup socket: a running server streams a backup of its store to
//! `chatd backup` over a Unix socket in its data directory
//! ([`SOCKET_NAME`]). The server holds the store's lock, so no other
//! process can open it; what the backup holds and how its point is taken
//! is in `store::sled::backup`.
//!
//! Access is the file system's: the socket is made with mode 0600 (bound
//! under a temporary name, restricted, then renamed into place), so only
//! the data directory's owner — who can read the store itself — connects.
//! One left by a crash is replaced at start (the store's lock says no
//! other server runs there); it is removed at shutdown.
//!
//! The protocol: the client sends one line, `backup`. The server answers
//! `ok` and a line break, then the backup to the end of the stream; or
//! `error: ` and why, and closes. A stream cut short (the server stopping,
//! a storage error once the backup has begun) shows in the backup's
//! trailer, which the client checks before keeping the file.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pipeline::Completion;
use crate::store::commit::{CommitQueue, Exclusive, Pending, Write as CommitWrite};
use crate::store::sled::SledStore;
use crate::store::sled::backup::{self, BackupError, Point, Summary, TakePoint};

/// The socket's name in the data directory.
pub const SOCKET_NAME: &str = "chatd.sock";

/// The one request.
const REQUEST: &str = "backup";

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one write to a client that does not read may block: the
/// backup holds the store's maintenance lock until it ends.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `chatd backup` waits for the server to send anything.
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// The listening socket and the backups it serves.
pub struct BackupSocket {
    path: PathBuf,
    stop: CancellationToken,
    backups: TaskTracker,
    accept: tokio::task::JoinHandle<()>,
}

/// Listens on the backup socket of the data directory `data`.
pub fn listen(data: &Path, store: Arc<SledStore>, commits: CommitQueue<Completion>) -> std::io::Result<BackupSocket> {
    let path = data.join(SOCKET_NAME);
    let temp = data.join(format!(".{SOCKET_NAME}.new"));
    for p in [&path, &temp] {
        match std::fs::remove_file(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(&temp)?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&temp, &path)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let stop = CancellationToken::new();
    let backups = TaskTracker::new();
    let accept = tokio::spawn(accept_loop(listener, store, commits, stop.clone(), backups.clone()));
    Ok(BackupSocket { path, stop, backups, accept })
}

impl BackupSocket {
    /// Stops listening, ends the backups being streamed (their clients see
    /// an incomplete backup and keep nothing) and removes the socket; waits
    /// for them until `deadline`.
    pub async fn stop(self, deadline: tokio::time::Instant) {
        self.stop.cancel();
        let _ = self.accept.await;
        self.backups.close();
        if tokio::time::timeout_at(deadline, self.backups.wait()).await.is_err() {
            tracing::warn!("a backup did not stop in time");
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(error = %e, path = %self.path.display(), "could not remove the backup socket");
        }
    }
}

async fn accept_loop(
    listener: tokio::net::UnixListener,
    store: Arc<SledStore>,
    commits: CommitQueue<Completion>,
    stop: CancellationToken,
    backups: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "backup socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // A backup is blocking work from end to end (the store, the socket),
        // on the blocking pool.
        let (store, commits, stop) = (store.clone(), commits.clone(), stop.clone());
        let runtime = tokio::runtime::Handle::current();
        backups.spawn_blocking(move || match stream.into_std() {
            Ok(stream) => serve(stream, &store, &commits, &runtime, &stop),
            Err(e) => tracing::warn!(error = %e, "backup socket: connection lost"),
        });
    }
}

/// Serves one connection.
fn serve(
    stream: UnixStream,
    store: &Arc<SledStore>,
    commits: &CommitQueue<Completion>,
    runtime: &tokio::runtime::Handle,
    stop: &CancellationToken,
) {
    let prepared = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(REQUEST_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
    if let Err(e) = prepared {
        tracing::warn!(error = %e, "backup socket: connection lost");
        return;
    }
    let mut line = String::new();
    let read = BufReader::new((&stream).take(256)).read_line(&mut line);
    let mut out = Answer { stream: &stream, stop, started: false };
    if read.is_err() || line.trim_end_matches('\n') != REQUEST {
        tracing::warn!(request = ?line, error = ?read.err(), "backup socket: malformed request refused");
        out.refuse(&format!("unknown request {:?}; the one request is {REQUEST:?}", line.trim_end()));
        return;
    }
    let started = Instant::now();
    tracing::info!("backup started");
    let result = backup::backup(store, |take| point_between_batches(take, commits, runtime), &mut out);
    let outcome = match &result {
        Ok(s) => {
            tracing::info!(
                bytes = s.bytes,
                records = s.records,
                rooms = s.rooms,
                stall_us = s.stall.as_micros() as u64,
                duration_ms = started.elapsed().as_millis() as u64,
                "backup finished"
            );
            "ok"
        }
        Err(e) => {
            tracing::error!(error = %e, duration_ms = started.elapsed().as_millis() as u64, "backup failed");
            if !out.started {
                out.refuse(&e.to_string());
            }
            "failed"
        }
    };
    metrics::counter!(crate::metrics::BACKUPS, "outcome" => outcome).increment(1);
}

/// Runs `take` between two group commits and returns its point.
fn point_between_batches(
    take: TakePoint,
    commits: &CommitQueue<Completion>,
    runtime: &tokio::runtime::Handle,
) -> Result<Point, BackupError> {
    let (tx, rx) = oneshot::channel();
    let work = Exclusive::new(move || {
        let _ = tx.send(take());
    });
    // Its completion tells only that the batch before it is settled, which
    // the point says better.
    let (done, _) = oneshot::channel();
    let queued = runtime.block_on(async {
        let slot = commits.reserve().await?;
        slot.send(Pending {
            write: CommitWrite::Exclusive(work),
            completion: Completion::Notify(done),
            epoch: commits.epoch(),
        });
        Some(())
    });
    let refused = || BackupError::Refused("storage has failed or the server is stopping; no backup was taken".into());
    queued.ok_or_else(refused)?;
    Ok(rx.blocking_recv().map_err(|_| refused())??)
}

/// The answer to a backup request: `ok` before the first byte of the
/// backup; every write refused once the server stops.
struct Answer<'a> {
    stream: &'a UnixStream,
    stop: &'a CancellationToken,
    started: bool,
}

impl Answer<'_> {
    fn refuse(&mut self, why: &str) {
        let _ = writeln!(self.stream, "error: {}", why.replace('\n', " "));
    }
}

impl Write for Answer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.stop.is_cancelled() {
            return Err(std::io::Error::other("the server is stopping"));
        }
        if !self.started {
            self.stream.write_all(b"ok\n")?;
            self.started = true;
        }
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// Connects to the backup socket of the data directory `data`; `None` when
/// no server listens there (no socket, or one left by a crash).
pub fn connect(data: &Path) -> std::io::Result<Option<UnixStream>> {
    match UnixStream::connect(data.join(SOCKET_NAME)) {
        Ok(s) => Ok(Some(s)),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Asks the server on `stream` for a backup and copies it to `out`;
/// returns the bytes copied. The backup is not checked here
/// (`store::sled::backup::write_file` does).
pub fn fetch(stream: UnixStream, out: &mut dyn Write) -> Result<u64, BackupError> {
    // A server that stops answering (its disk hung) must not hang a
    // scheduled backup for good.
    stream.set_read_timeout(Some(FETCH_TIMEOUT))?;
    (&stream).write_all(format!("{REQUEST}\n").as_bytes())?;
    let mut input = BufReader::with_capacity(256 << 10, stream);
    let mut status = Vec::new();
    (&mut input).take(4096).read_until(b'\n', &mut status)?;
    let status = String::from_utf8_lossy(&status);
    match status.trim_end() {
        "ok" => Ok(std::io::copy(&mut input, out)?),
        answer => match answer.strip_prefix("error: ") {
            Some(why) => Err(BackupError::Refused(format!("the server refused the backup: {why}"))),
            None => Err(BackupError::Invalid(format!("the server answered {answer:?}"))),
        },
    }
}

/// What `chatd backup` did.
pub struct Taken {
    /// Whether a running server made it.
    pub online: bool,
    /// What the file holds.
    pub summary: Summary,
}

/// Writes a backup of the store in `data` to `file`: made by the server
/// running there, or, with none running, from the store opened here.
pub fn backup_to_file(data: &Path, file: &Path, cache_bytes: u64) -> Result<Taken, BackupError> {
    if let Some(stream) = connect(data)? {
        let (_, summary) = backup::write_file(file, |out| fetch(stream, out))?;
        return Ok(Taken { online: true, summary });
    }
    let dir = data.join("store");
    if !dir.join("db").exists() {
        return Err(BackupError::Refused(format!("{} holds no chatd store", data.display())));
    }
    let store = match SledStore::open(&dir, cache_bytes) {
        Ok(store) => Arc::new(store),
        Err(crate::store::StoreError::InUse(_)) => {
            return Err(BackupError::Refused(format!(
                "another process holds the store in {} but no server answers on {}",
                data.display(),
                data.join(SOCKET_NAME).display()
            )));
        }
        Err(e) => return Err(e.into()),
    };
    // Nothing else writes to a store opened here: any point is between
    // two commits.
    let ((), summary) = backup::write_file(file, |out| {
        backup::backup(&store, |take| Ok(take()?), out)?;
        Ok(())
    })?;
    Ok(Taken { online: false, summary })
}
