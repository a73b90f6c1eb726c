//! A map of at most `capacity` entries keyed by text, the oldest inserted forgotten first: the
//! bounded per-process caches of the GraphQL transport (persisted queries, parsed documents).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

pub(super) struct Fifo<V> {
    capacity: usize,
    entries: HashMap<Arc<str>, V>,
    order: VecDeque<Arc<str>>,
}

impl<V> std::fmt::Debug for Fifo<V> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Fifo")
            .field("capacity", &self.capacity)
            .field("len", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl<V> Fifo<V> {
    /// At most `capacity` entries; 0 keeps none.
    pub(super) fn new(capacity: usize) -> Fifo<V> {
        Fifo {
            capacity,
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(super) fn get(&self, key: &str) -> Option<&V> {
        self.entries.get(key)
    }

    /// Keeps `value` under `key`, forgetting the oldest entries past the capacity; a key kept
    /// already keeps its value.
    pub(super) fn insert(&mut self, key: &str, value: V) {
        if self.capacity == 0 || self.entries.contains_key(key) {
            return;
        }
        while self.order.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.entries.remove(&oldest);
            }
        }
        let key: Arc<str> = Arc::from(key);
        self.order.push_back(key.clone());
        self.entries.insert(key, value);
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}
