//! A small map keyed by `u64` ids (room ids, session ids), kept as a `Vec`
//! sorted by id.
//!
//! Most of these maps are tiny — a room per idle connection with one
//! subscriber, a user in a handful of rooms — and a `HashMap` allocates a
//! ~100–220-byte table for its first entry (benches/README.md, "Idle
//! memory per connection"). Here the first entry gets one slot, lookups are a binary
//! search, iteration walks contiguous memory in id order, and ids that only
//! grow (session ids) are appended. Removal moves the tail: microseconds
//! even for 10,000 entries; inserts and removals are joins and leaves, rare
//! next to messages.

/// Values by `u64` id, sorted by id.
pub struct IdMap<V>(Vec<(u64, V)>);

impl<V> Default for IdMap<V> {
    fn default() -> Self {
        IdMap(Vec::new())
    }
}

impl<V> IdMap<V> {
    fn find(&self, id: u64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&id, |(i, _)| *i)
    }

    fn add(&mut self, at: usize, id: u64, value: V) {
        // The first entry gets one slot, not `Vec`'s usual four.
        if self.0.capacity() == 0 {
            self.0.reserve_exact(1);
        }
        self.0.insert(at, (id, value));
    }

    /// Sets the value for `id`; returns the one it replaced, if any.
    pub fn insert(&mut self, id: u64, value: V) -> Option<V> {
        match self.find(id) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.add(i, id, value);
                None
            }
        }
    }

    /// The value for `id`, inserting `value` first if there is none.
    pub fn get_or_insert(&mut self, id: u64, value: V) -> &mut V {
        let i = match self.find(id) {
            Ok(i) => i,
            Err(i) => {
                self.add(i, id, value);
                i
            }
        };
        &mut self.0[i].1
    }

    /// The value for `id`.
    pub fn get(&self, id: &u64) -> Option<&V> {
        self.find(*id).ok().map(|i| &self.0[i].1)
    }

    /// The value for `id`, mutably.
    pub fn get_mut(&mut self, id: &u64) -> Option<&mut V> {
        self.find(*id).ok().map(|i| &mut self.0[i].1)
    }

    /// Removes the value for `id`. A map that emptied out gives back its
    /// buffer.
    pub fn remove(&mut self, id: &u64) -> Option<V> {
        let i = self.find(*id).ok()?;
        let (_, value) = self.0.remove(i);
        if self.0.capacity() > 4 * self.0.len().max(4) {
            self.0.shrink_to(2 * self.0.len());
        }
        Some(value)
    }

    /// Whether `id` has a value.
    pub fn contains_key(&self, id: &u64) -> bool {
        self.find(*id).is_ok()
    }

    /// The values, by id.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    /// The values, by id, mutably.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.0.iter_mut().map(|(_, v)| v)
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_maps_stay_sorted_and_behave_like_maps() {
        let mut m = IdMap::default();
        assert!(m.is_empty());
        for id in [7, 3, 9, 1] {
            assert_eq!(m.insert(id, id * 10), None);
        }
        assert_eq!(m.insert(3, 33), Some(30), "insert replaces and returns the old value");
        assert_eq!(m.values().copied().collect::<Vec<_>>(), [10, 33, 70, 90], "by id");
        assert_eq!(m.get(&9), Some(&90));
        assert!(m.get(&4).is_none() && !m.contains_key(&4) && m.contains_key(&1));
        *m.get_or_insert(4, 0) += 5;
        *m.get_or_insert(4, 0) += 5;
        assert_eq!(m.get(&4), Some(&10), "get_or_insert keeps an existing value");
        *m.get_mut(&9).unwrap() = 99;
        assert_eq!(m.remove(&7), Some(70));
        assert_eq!(m.remove(&7), None);
        assert_eq!(m.len(), 4);
        assert_eq!(m.values().copied().collect::<Vec<_>>(), [10, 33, 10, 99]);
        for v in m.values_mut() {
            *v += 1;
        }
        assert_eq!(m.values().copied().collect::<Vec<_>>(), [11, 34, 11, 100]);
    }

    #[test]
    fn the_first_entry_takes_one_slot_and_an_emptied_map_gives_its_buffer_back() {
        let mut m = IdMap::default();
        m.insert(1, ());
        assert_eq!(m.0.capacity(), 1);
        for id in 100..1100 {
            m.insert(id, ());
        }
        for id in 100..1100 {
            m.remove(&id);
        }
        assert_eq!(m.len(), 1);
        assert!(m.0.capacity() <= 16, "an emptied map gives its buffer back ({})", m.0.capacity());
    }
}
