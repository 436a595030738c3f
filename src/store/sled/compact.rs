//! Offline compaction (`chatd compact --data DIR`): the store is copied,
//! tree by tree, into a fresh database that replaces it.
//!
//! sled never rewrites a value in place: an overwritten or removed value —
//! the content of a deleted message, of its edits — stays in the files
//! until sled's segment cleaning happens to reclaim its segment, which it
//! does not promise to do. The copy holds only the live values, so after
//! it the bytes of every deleted message are gone from the disk
//! (proto/README.md, §9 "Deleting erases"; the operations section of
//! README.md says when to run it). The log's small runs are merged on the
//! way ([`super::runs::copy_merged`]): with many rooms that halves the
//! space it takes.

use std::path::{Path, PathBuf};

use super::trees::{Blobs, open_db};
use crate::store::StoreError;

/// Beside the store: the copy being made, and the store it replaced.
fn siblings(store: &Path) -> (PathBuf, PathBuf) {
    let name = store.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "store".into());
    (store.with_file_name(format!("{name}.compact")), store.with_file_name(format!("{name}.old")))
}

/// Finishes or undoes a compaction a crash interrupted: with the store
/// moved aside but the copy not yet in its place, the store goes back.
pub fn recover_interrupted(store: &Path) -> Result<(), StoreError> {
    let (copy, old) = siblings(store);
    if !store.exists() && old.exists() {
        std::fs::rename(&old, store)?;
        tracing::warn!(store = %store.display(), "an interrupted compaction was undone");
    }
    if copy.exists() {
        std::fs::remove_dir_all(&copy)?;
    }
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Compacts the store in `store` (which no server may have open); returns
/// its size on disk before and after.
pub fn compact(store: &Path, cache_bytes: u64) -> Result<(u64, u64), StoreError> {
    recover_interrupted(store)?;
    let (copy, old) = siblings(store);
    // Opening checks the format (and upgrades an older one) and takes the
    // store's lock, so a running server is refused.
    let source = super::SledStore::open(store, cache_bytes)?;
    let before = crate::store::Store::size_on_disk(&source);
    let after = source.with(|t| {
        let target = open_db(&copy, cache_bytes)?;
        for name in t.db.tree_names() {
            let from = t.db.open_tree(&name)?;
            let to = target.open_tree(&name)?;
            if name == "messages" {
                let (read, written) = super::runs::copy_merged(&from, &to)?;
                tracing::info!(read, written, "the log's small runs merged");
                continue;
            }
            for kv in from.iter() {
                let (k, v) = kv?;
                to.insert(k, v)?;
            }
        }
        target.flush()?;
        Blobs::new(&copy).sync()?;
        std::fs::File::open(copy.join("db"))?.sync_all()?;
        Ok(target.size_on_disk()?)
    })?;
    drop(source);
    std::fs::rename(store, &old)?;
    std::fs::rename(&copy, store)?;
    if let Some(parent) = store.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    std::fs::remove_dir_all(&old)?;
    Ok((before, after))
}
