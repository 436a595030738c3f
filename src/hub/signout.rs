//! Signing a user out: closing every session of theirs, and ("sign out
//! everywhere") refusing every token of theirs issued before now, across
//! restarts.

use std::sync::Arc;

use super::{Hub, Refusal};
use crate::codec::encode_frame;
use crate::proto::{self, Body, CloseReason, Envelope};
use crate::store::commit::Write;

impl Hub {
    /// Whether a token of `user` issued at `iat` (Unix seconds; `None`: the
    /// token does not say) was revoked. Call under the user's lock, as
    /// [`Hub::disconnect`] closes sessions under it.
    pub fn is_revoked(&self, user: &str, iat: Option<u64>) -> bool {
        let revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        match (revoked.get(user), iat) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(at), Some(iat)) => iat < *at,
        }
    }

    /// Refuses tokens of `user` issued before `at` (Unix seconds) from now
    /// on (the store has it already).
    pub(super) fn note_revocation(&self, user: &str, at: u64) {
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        let entry = revoked.entry(Arc::from(user)).or_insert(at);
        *entry = (*entry).max(at);
    }

    /// Closes every session of `user` with `GoAway` — in cluster mode on
    /// every node. With `revoke`, first stores that tokens of `user`
    /// issued before now are refused (the sessions get `AUTH_EXPIRED`: ask
    /// for a new token); without, they get `UNSPECIFIED` and may
    /// reconnect. Returns the sessions closed (on other nodes, as many as
    /// their device counts said).
    pub async fn disconnect(&self, user: &str, revoke: bool) -> Result<usize, Refusal> {
        if revoke {
            let at = crate::auth::unix_now();
            self.commit(Write::Revocation(user.to_string(), at)).await?;
            self.note_revocation(user, at);
        }
        let Some(c) = &self.cluster else { return Ok(self.close_sessions(user, revoke)) };
        // Counted before the sessions here close and their count changes.
        let elsewhere = c.log.devices_elsewhere(&c.node, user).await.map_err(super::cluster::unavailable)? as usize;
        let here = self.close_sessions(user, revoke);
        c.disconnect_elsewhere(user, revoke).await.map_err(super::cluster::unavailable)?;
        tracing::info!(user, revoke, sessions = here + elsewhere, "user disconnected on every node");
        Ok(here + elsewhere)
    }

    /// Closes every session of `user` here (see [`Hub::disconnect`]);
    /// returns how many.
    pub(super) fn close_sessions(&self, user: &str, revoke: bool) -> usize {
        let (reason, message) = if revoke {
            (CloseReason::AuthExpired, "signed out everywhere: sign in again")
        } else {
            (CloseReason::Unspecified, "disconnected by the application")
        };
        let frame = encode_frame(&Envelope::push(Body::GoAway(proto::GoAway::new(reason, message))));
        let entry = self.user(user);
        let st = entry.lock();
        for s in &st.sessions {
            self.metrics.close(reason);
            s.outbound.close_with(Some(frame.clone()));
            // The request loop sees the closed queue and releases the session.
            s.wake_reader();
        }
        tracing::info!(user, revoke, sessions = st.sessions.len(), "user disconnected");
        st.sessions.len()
    }
}
