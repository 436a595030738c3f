//! Recovery from a storage failure (a full disk, an I/O error): the probe
//! that tells when the disk takes writes again, and the reopen that
//! replaces a failed sled instance in place.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::SledStore;
use super::trees::Trees;
use crate::store::StoreError;

impl SledStore {
    /// Replaces the database with a freshly opened one.
    ///
    /// sled 0.34 keeps the first I/O error it meets (its "global error") and
    /// fails every later write, so after a full disk or an I/O error the only
    /// way back is a new instance. The old one cannot be dropped: its final
    /// flush waits forever for the write that failed (0.34.7,
    /// `make_stable_inner`). So it is leaked — its cache memory and idle
    /// threads stay — and its descriptors of the data file are pointed at
    /// `/dev/null`, which releases its lock on the file and makes sure it can
    /// never write into the reopened database. What the reopened database
    /// holds is what reached the disk; the commit writer then truncates what
    /// was never acknowledged.
    pub(super) fn reopen(&self) -> Result<(), StoreError> {
        // The reopened database holds what reached the disk, which the
        // cached counters may be ahead of.
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let mut trees = self.trees.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = trees.take() {
            let Trees {
                db,
                messages,
                rooms,
                members,
                bans,
                invites,
                revocations,
                reads,
                journal,
                folds,
                reactions,
                reacted,
                counts,
                deleted,
                trims,
                meta,
                data_file,
                blobs,
            } = old;
            drop((data_file, blobs));
            std::mem::forget((db, messages, rooms, members, bans, invites, revocations, reads, journal, meta));
            std::mem::forget((folds, reactions, reacted, counts, deleted, trims));
            let detached = detach_file(&self.path.join("db"))?;
            tracing::warn!(path = %self.path.display(), detached, "reopening the database after a storage failure");
        }
        *trees = Some(Trees::open(&self.path, self.cache_bytes)?);
        Ok(())
    }
}

/// Free space a recovering store must find before it reopens: a few of
/// sled's I/O buffers, so the fresh instance does not fail (and leak) again
/// at once.
const PROBE_BYTES: usize = 16 << 20;

/// Writes and syncs [`PROBE_BYTES`] in a scratch file in `dir`, then removes it.
pub(super) fn check_writable(dir: &Path) -> Result<(), StoreError> {
    use std::io::Write as _;
    let path = dir.join("probe.tmp");
    let written = File::create(&path).and_then(|mut f| {
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..PROBE_BYTES / chunk.len() {
            f.write_all(&chunk)?;
        }
        f.sync_data()
    });
    let _ = std::fs::remove_file(&path);
    Ok(written?)
}

/// Points every descriptor this process holds on `file` at `/dev/null`
/// (Linux: found through `/proc/self/fd`); returns how many.
fn detach_file(file: &Path) -> Result<usize, StoreError> {
    let target = std::fs::canonicalize(file)?;
    let null = File::options().read(true).write(true).open("/dev/null")?;
    let mut detached = 0;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if std::fs::read_link(entry.path()).is_ok_and(|p| p == target) {
            // SAFETY: dup2 replaces the descriptor atomically; the owner (the
            // leaked sled instance) keeps a valid descriptor number, which now
            // refers to /dev/null instead of the database file.
            if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            detached += 1;
        }
    }
    Ok(detached)
}
