//! Changes to a room's messages that are committed but not yet settled:
//! what validating the next change must see beyond the store
//! (ARCHITECTURE.md, "Message changes").
//!
//! A change is validated against its target's state — deleted? who
//! reacted? — and given its seq in the same critical section, under this
//! lock. The store answers for everything committed and fanned out; a
//! change still on its way through the group commit is known only here,
//! until the fan-out settles it. A new commit epoch (after a failed commit)
//! drops everything: what failed never happened, and the store already
//! answers for what succeeded.

use std::collections::HashMap;
use std::sync::Arc;

use crate::store::Target;

/// A target's state after the changes on their way.
pub struct PendingTarget {
    /// Its state, as the store will have it.
    pub state: Target,
    /// Reactions added (true) or removed (false) by those changes.
    pub reacted: HashMap<(String, Arc<str>), bool>,
    /// The seq of the last change on its way.
    pub last_seq: u64,
}

/// The changes on their way, by target seq.
#[derive(Default)]
pub struct Pending {
    epoch: u64,
    targets: HashMap<u64, PendingTarget>,
}

impl Pending {
    /// The targets with changes on their way in commit `epoch` (a new
    /// epoch forgets the old one's).
    pub fn targets(&mut self, epoch: u64) -> &mut HashMap<u64, PendingTarget> {
        if self.epoch != epoch {
            self.epoch = epoch;
            self.targets.clear();
        }
        &mut self.targets
    }

    /// The change `seq` to `target` is committed and fanned out: the store
    /// answers for it now, unless another change followed it.
    pub fn settle(&mut self, target: u64, seq: u64) {
        if self.targets.get(&target).is_some_and(|t| t.last_seq <= seq) {
            self.targets.remove(&target);
        }
    }
}
