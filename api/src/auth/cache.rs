//! Short-lived in-process caches of what the ingestion hot path reads on every request: the
//! principal behind a write key and the tenant's ingestion settings.
//!
//! Guarantees: an entry lives at most its time to live, so a change made by another process is
//! seen after at most that long. A change made in this process invalidates the cache, and a
//! value read from the database before or during that change is never cached afterwards: every
//! read takes a [`Ticket`] first, and [`TtlCache::insert`] refuses a ticket older than the last
//! invalidation (and, for invalidations announced before their transaction commits, younger
//! than the settle time after it).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Principal;

/// How long the principal behind a write key is reused without asking the database. A key
/// revoked through this process stops working at once; revoked through another process of the
/// same deployment, within this time.
pub const WRITE_KEY_TIME_TO_LIVE: Duration = Duration::from_secs(10);

/// How long after a revocation is announced (before its transaction commits) no write key is
/// cached: much longer than a revocation's transaction takes to commit.
pub const REVOCATION_SETTLE: Duration = Duration::from_secs(10);

/// The principals of recently used write keys, by the hash of the key.
pub static WRITE_KEYS: TtlCache<String, Principal> = TtlCache::new(WRITE_KEY_TIME_TO_LIVE);

/// Taken before reading the value from the database; see [`TtlCache::insert`].
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    generation: u64,
    taken_at: Instant,
}

/// Entries past this many are dropped wholesale: the caches hold one entry per key or tenant,
/// so this bounds memory against a flood of distinct values without an eviction policy.
const MAX_ENTRIES: usize = 10_000;

struct Inner<K, V> {
    generation: u64,
    /// Reads that started before this instant are not cached (see [`TtlCache::invalidate`]).
    quiet_until: Option<Instant>,
    entries: HashMap<K, (Instant, V)>,
}

pub struct TtlCache<K, V> {
    time_to_live: Duration,
    inner: Mutex<Option<Inner<K, V>>>,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    pub const fn new(time_to_live: Duration) -> TtlCache<K, V> {
        TtlCache {
            time_to_live,
            inner: Mutex::new(None),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner<K, V>) -> T) -> T {
        // A panic while holding this lock cannot leave the map inconsistent (every change is a
        // single insert, remove or clear), so a poisoned lock is still usable.
        let mut guard = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let inner = guard.get_or_insert_with(|| Inner {
            generation: 0,
            quiet_until: None,
            entries: HashMap::new(),
        });
        f(inner)
    }

    /// The cached value, if it is younger than the time to live.
    pub fn get(&self, key: &K) -> Option<V> {
        let now = Instant::now();
        self.with(|inner| match inner.entries.get(key) {
            Some((stored_at, value)) if now.duration_since(*stored_at) < self.time_to_live => {
                Some(value.clone())
            }
            Some(_) => {
                inner.entries.remove(key);
                None
            }
            None => None,
        })
    }

    /// Take this before reading the value that will be inserted.
    pub fn ticket(&self) -> Ticket {
        let taken_at = Instant::now();
        self.with(|inner| Ticket {
            generation: inner.generation,
            taken_at,
        })
    }

    /// Caches a value read after `ticket` was taken, unless the cache was invalidated since, or
    /// the read started within the settle time of the last invalidation.
    pub fn insert(&self, ticket: Ticket, key: K, value: V) {
        self.with(|inner| {
            if ticket.generation != inner.generation
                || inner
                    .quiet_until
                    .is_some_and(|quiet_until| ticket.taken_at < quiet_until)
            {
                return;
            }
            if inner.entries.len() >= MAX_ENTRIES {
                inner.entries.clear();
            }
            inner.entries.insert(key, (Instant::now(), value));
        });
    }

    /// Forgets every entry and refuses values read before now. Call it after the change has
    /// committed with `settle` zero; when it can only be called before the commit, `settle` is
    /// how long reads starting after this call are still not cached, and must exceed the time
    /// until the commit.
    pub fn invalidate(&self, settle: Duration) {
        let now = Instant::now();
        self.with(|inner| {
            inner.generation += 1;
            inner.entries.clear();
            let until = now + settle;
            inner.quiet_until = Some(inner.quiet_until.map_or(until, |old| old.max(until)));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_served_until_it_expires() {
        let cache: TtlCache<u32, &str> = TtlCache::new(Duration::from_millis(50));
        let ticket = cache.ticket();
        cache.insert(ticket, 1, "one");
        assert_eq!(cache.get(&1), Some("one"));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get(&1), None);
    }

    #[test]
    fn a_value_read_before_an_invalidation_is_not_cached() {
        let cache: TtlCache<u32, &str> = TtlCache::new(Duration::from_secs(60));
        let ticket = cache.ticket();
        cache.insert(ticket, 1, "old");
        cache.invalidate(Duration::ZERO);
        assert_eq!(cache.get(&1), None);
        cache.insert(ticket, 1, "old");
        assert_eq!(cache.get(&1), None, "a stale read stays out");
        let fresh = cache.ticket();
        cache.insert(fresh, 1, "new");
        assert_eq!(cache.get(&1), Some("new"));
    }

    #[test]
    fn reads_within_the_settle_time_are_not_cached() {
        let cache: TtlCache<u32, &str> = TtlCache::new(Duration::from_secs(60));
        cache.invalidate(Duration::from_secs(60));
        let ticket = cache.ticket();
        cache.insert(ticket, 1, "maybe stale");
        assert_eq!(cache.get(&1), None);
    }
}
