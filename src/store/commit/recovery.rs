//! The group commit's failure state: after a failed write or sync, the
//! store is probed (after a second, then less often while it keeps
//! failing); once a probe succeeds, what the failed batches left in the
//! store is removed and a recovery marker goes down the pipeline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::store::{RoomId, Store, StoreError};

/// How soon a failed store is first probed; each failed probe doubles the
/// wait, up to [`PROBE_MAX`] (a probe of the sled store writes a 16 MiB
/// scratch file, which a long outage should not repeat every second).
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The longest wait between probes.
const PROBE_MAX: Duration = Duration::from_secs(8);

/// Where recovery from a failed store stands.
pub(super) struct Recovery {
    /// A recovery marker is on its way to the fan-out.
    marker_sent: bool,
    /// A probe of a failed store still running (a poisoned store may never
    /// answer; one stuck probe is enough).
    probing: Option<tokio::task::JoinHandle<Result<(), StoreError>>>,
    /// The wait before the next probe.
    probe_wait: Duration,
    /// Per room, the first seq of a failed batch: everything from there on
    /// was never acknowledged, but may be partly in the store. It is removed
    /// before writes resume, since those seqs will be handed out again.
    failed_tails: HashMap<RoomId, u64>,
}

impl Recovery {
    pub(super) fn new() -> Self {
        Recovery { marker_sent: false, probing: None, probe_wait: PROBE_EVERY, failed_tails: HashMap::new() }
    }

    /// How long the writer may wait for writes before the next probe:
    /// `None` unless the store has `failed` and no marker is on its way.
    pub(super) fn wait(&mut self, failed: bool) -> Option<Duration> {
        if !failed {
            self.marker_sent = false;
        }
        (failed && !self.marker_sent).then_some(self.probe_wait)
    }

    /// Notes a failed batch: per room, the first seq it held.
    pub(super) fn batch_failed(&mut self, firsts: HashMap<RoomId, u64>) {
        for (room, seq) in firsts {
            let first = self.failed_tails.entry(room).or_insert(seq);
            *first = (*first).min(seq);
        }
    }

    /// One step of probing, run when the wait is over: starts a probe (which
    /// also removes the failed tails and syncs), or collects a finished one.
    /// True once the store works again: the caller sends the recovery
    /// marker and then calls [`Recovery::marker_sent`].
    pub(super) async fn step(&mut self, store: &Arc<dyn Store>) -> bool {
        let probe = match self.probing.take() {
            Some(h) if !h.is_finished() => {
                self.probing = Some(h);
                return false;
            }
            Some(h) => h.await,
            None => {
                let st = store.clone();
                let tails = self.failed_tails.clone();
                self.probing = Some(tokio::task::spawn_blocking(move || {
                    st.probe()?;
                    for (&room, &from) in &tails {
                        let n = st.truncate(room, from)?;
                        if n > 0 {
                            tracing::info!(room, from, removed = n, "dropped unacknowledged messages");
                        }
                    }
                    st.sync()
                }));
                return false;
            }
        };
        if let Ok(Err(e)) = &probe {
            self.probe_wait = (self.probe_wait * 2).min(PROBE_MAX);
            tracing::debug!(error = %e, retry_in = ?self.probe_wait, "storage still failing");
        }
        if matches!(probe, Ok(Ok(()))) {
            self.probe_wait = PROBE_EVERY;
            self.failed_tails.clear();
            tracing::info!("storage works again; resuming writes");
            return true;
        }
        false
    }

    /// The recovery marker is on its way: no probe until the fan-out has
    /// reached it and cleared the failure (or another write failed).
    pub(super) fn marker_sent(&mut self) {
        self.marker_sent = true;
    }
}
