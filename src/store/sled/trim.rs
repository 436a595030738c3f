//! Retention in the sled store: the trim record first, then the runs below
//! its start and what is kept beside them ([`crate::store::retention`]).

use prost::Message as _;

use super::SledStore;
use super::trees::Trees;
use crate::store::{RoomId, StoreError, Trim, TrimRecord, fold};

/// Entries read per step of a trim: a room trimmed for the first time
/// after years holds millions, and each step is a complete, smaller trim.
/// The first step is small: most passes of an age limit find the first
/// entry young enough and stop there.
const TRIM_STEP: (u64, u64) = (64, 4096);

impl SledStore {
    pub(super) fn trim_room(&self, room: RoomId, trim: &Trim) -> Result<TrimRecord, StoreError> {
        self.with(|t| {
            let mut rec = t.trim_of(room)?.unwrap_or_default();
            let Some(_maintenance) = self.try_maintenance() else { return Ok(rec) };
            let mut step = TRIM_STEP.0;
            while rec.start() <= trim.head {
                let (from, before) = (rec.start(), rec.start());
                let to = trim.head.min(from.saturating_add(step - 1));
                step = (step * 4).min(TRIM_STEP.1);
                let stopped = rec.advance(trim, t.entries(room, from, to)?)?;
                if rec.start() == before {
                    break;
                }
                t.trims.insert(room.to_be_bytes(), rec.encode_to_vec())?;
                let _rewrites = self.rewrites();
                forget_below(t, room, rec.start())?;
                if stopped {
                    break;
                }
            }
            Ok(rec)
        })
    }
}

/// Removes the entries of `room` below `start` and what is kept beside
/// them; what a crash left of an earlier trim is removed the same way.
pub(super) fn forget_below(t: &Trees, room: RoomId, start: u64) -> Result<usize, StoreError> {
    let runs = t.drop_below(room, start)?;
    Ok(runs + fold::forget_below(&mut &*t, room, start)?)
}
