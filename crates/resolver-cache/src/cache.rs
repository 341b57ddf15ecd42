//! A bounded, sharded, TTL-aware cache with single-flight fills.
//!
//! Eviction is CLOCK (second chance), an approximation of LRU that lets hits run under a shared
//! read lock: a hit only sets an atomic "referenced" bit, so concurrent readers of one shard do
//! not serialise. Entries live inline in the shard's `HashTable` and the clock hand sweeps its
//! buckets, so a hit costs no more pointer chasing than a plain hash map (the bench compares).

use hashbrown::HashTable;
use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// How a value was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// A fresh cached value, or the result of a fill someone else ran.
    Cached,
    /// This caller's fetch ran.
    Fetched,
}

/// Top bit of a slot's stamp: read since the clock hand last passed.
const REFERENCED: u64 = 1 << 63;
/// The rest: milliseconds since the cache's epoch until which the value is fresh.
const EXPIRES: u64 = REFERENCED - 1;

struct Slot<V> {
    key: Box<str>,
    value: V,
    /// Expiry and the referenced bit in one word keeps a slot at five words.
    stamp: AtomicU64,
}

struct Table<V> {
    entries: HashTable<Slot<V>>,
    /// Next bucket the clock hand looks at.
    hand: usize,
    capacity: usize,
}

type Flight<V> = Arc<OnceCell<(V, Duration)>>;

struct Shard<V> {
    table: RwLock<Table<V>>,
    /// Fills in progress; an entry lives only while its fetch runs, so this map is bounded by
    /// the number of concurrent lookups, not by the key space.
    flights: Mutex<HashMap<Box<str>, Flight<V>>>,
}

/// The cache. `V` is cloned out on every hit, so it should be cheap to clone (an `Arc`).
pub(crate) struct Cache<V> {
    shards: Box<[Shard<V>]>,
    hasher: std::collections::hash_map::RandomState,
    epoch: Instant,
}

impl<V: Clone> Cache<V> {
    /// A cache holding at most `max_entries` values (0 disables caching, not single-flight).
    pub(crate) fn new(max_entries: usize) -> Self {
        // Enough shards that two cores rarely contend on a write lock, few enough that a small
        // cache still evicts in (approximately) global LRU order.
        let shard_count = (max_entries / 1024).clamp(1, 64).next_power_of_two();
        let shards = (0..shard_count)
            .map(|i| {
                let capacity =
                    max_entries / shard_count + usize::from(i < max_entries % shard_count);
                Shard {
                    table: RwLock::new(Table {
                        entries: HashTable::new(),
                        hand: 0,
                        capacity,
                    }),
                    flights: Mutex::new(HashMap::new()),
                }
            })
            .collect();
        Cache {
            shards,
            hasher: Default::default(),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        let elapsed = self.epoch.elapsed();
        elapsed
            .as_secs()
            .saturating_mul(1000)
            .saturating_add(u64::from(elapsed.subsec_millis()))
            .min(EXPIRES)
    }

    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> &Shard<V> {
        // hashbrown takes the bucket from the low bits and its tag from the top seven, so the
        // shard comes from the middle to keep all three independent.
        let i = (hash >> 32) as usize & (self.shards.len() - 1);
        &self.shards[i]
    }

    /// Number of entries held, fresh or expired.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| read(&s.table).entries.len())
            .sum()
    }

    /// The fresh value for `key` and how long it stays fresh.
    pub(crate) fn get(&self, key: &str) -> Option<(V, Duration)> {
        let hash = self.hash(key);
        self.get_hashed(hash, key, self.now())
    }

    fn get_hashed(&self, hash: u64, key: &str, now: u64) -> Option<(V, Duration)> {
        let table = read(&self.shard(hash).table);
        let slot = table.entries.find(hash, |s| &*s.key == key)?;
        let stamp = slot.stamp.load(Ordering::Relaxed);
        let expires = stamp & EXPIRES;
        if expires <= now {
            return None;
        }
        // Skip the store when already set, so hot keys do not bounce a cache line between cores.
        if stamp & REFERENCED == 0 {
            slot.stamp.fetch_or(REFERENCED, Ordering::Relaxed);
        }
        Some((slot.value.clone(), Duration::from_millis(expires - now)))
    }

    /// Stores `value` for `ttl`, evicting the least recently used entry when the shard is full.
    pub(crate) fn insert(&self, key: &str, value: V, ttl: Duration) {
        let hash = self.hash(key);
        self.insert_hashed(hash, key, value, ttl);
    }

    fn insert_hashed(&self, hash: u64, key: &str, value: V, ttl: Duration) {
        let now = self.now();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let expires = now.saturating_add(ttl_ms).min(EXPIRES);
        let mut guard = write(&self.shard(hash).table);
        let Table {
            entries,
            hand,
            capacity,
        } = &mut *guard;
        if let Some(slot) = entries.find_mut(hash, |s| &*s.key == key) {
            slot.value = value;
            // A refill follows a lookup: the name is in use.
            *slot.stamp.get_mut() = expires | REFERENCED;
            return;
        }
        if *capacity == 0 {
            return;
        }
        if entries.len() >= *capacity {
            // Second chance: referenced entries get their bit cleared and survive one more
            // sweep; expired ones go first whatever their bit. The table is not empty, so this
            // ends within two passes over the buckets.
            let buckets = entries.num_buckets();
            loop {
                let i = *hand % buckets;
                *hand = i + 1;
                let Some(slot) = entries.get_bucket_mut(i) else {
                    continue;
                };
                let stamp = slot.stamp.get_mut();
                if *stamp & EXPIRES <= now || *stamp & REFERENCED == 0 {
                    if let Ok(entry) = entries.get_bucket_entry(i) {
                        entry.remove();
                    }
                    break;
                }
                *stamp &= EXPIRES;
            }
        }
        let slot = Slot {
            key: key.into(),
            value,
            stamp: AtomicU64::new(expires),
        };
        entries.insert_unique(hash, slot, |s| self.hash(&s.key));
    }

    /// The cached value for `key`, or the result of `fetch`, which runs at most once at a time
    /// per key: concurrent callers wait for it and share its answer. If the caller running it is
    /// cancelled, one of the waiters runs its own `fetch` instead.
    pub(crate) async fn get_or_fetch<F, Fut>(&self, key: &str, fetch: F) -> (V, Duration, Source)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = (V, Duration)>,
    {
        let hash = self.hash(key);
        if let Some((v, ttl)) = self.get_hashed(hash, key, self.now()) {
            return (v, ttl, Source::Cached);
        }
        let shard = self.shard(hash);
        let flight = {
            let mut flights = shard.flights.lock().unwrap_or_else(|p| p.into_inner());
            match flights.get(key) {
                Some(flight) => Arc::clone(flight),
                None => {
                    // A fill that just finished stored its value before leaving this map, so
                    // looking again here closes the window between the first check and now.
                    if let Some((v, ttl)) = self.get_hashed(hash, key, self.now()) {
                        return (v, ttl, Source::Cached);
                    }
                    let flight: Flight<V> = Arc::new(OnceCell::new());
                    flights.insert(key.into(), Arc::clone(&flight));
                    flight
                }
            }
        };
        let mut source = Source::Cached;
        let (value, ttl) = flight
            .get_or_init(|| async {
                source = Source::Fetched;
                let _leave = LeaveFlight {
                    shard,
                    key,
                    flight: &flight,
                };
                let (value, ttl) = fetch().await;
                self.insert_hashed(hash, key, value.clone(), ttl);
                (value, ttl)
            })
            .await
            .clone();
        (value, ttl, source)
    }
}

/// Removes a flight from the map when its fill ends, also when the fill is cancelled.
struct LeaveFlight<'a, V> {
    shard: &'a Shard<V>,
    key: &'a str,
    flight: &'a Flight<V>,
}

impl<V> Drop for LeaveFlight<'_, V> {
    fn drop(&mut self) {
        let mut flights = self.shard.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights
            .get(self.key)
            .is_some_and(|f| Arc::ptr_eq(f, self.flight))
        {
            flights.remove(self.key);
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_evicts_unreferenced_first_and_respects_the_bound() {
        let cache = Cache::<u32>::new(4);
        let long = Duration::from_secs(60);
        for (i, k) in ["a", "b", "c", "d"].into_iter().enumerate() {
            cache.insert(k, i as u32, long);
        }
        assert!(cache.get("a").is_some());
        cache.insert("e", 4, long);
        assert_eq!(cache.len(), 4);
        assert!(cache.get("a").is_some(), "recently used survives");
        assert!(cache.get("e").is_some());
        let gone = ["b", "c", "d"]
            .iter()
            .filter(|k| cache.get(k).is_none())
            .count();
        assert_eq!(gone, 1, "one unused entry goes");
        // Those lookups referenced every entry, and when all are referenced any may go. From
        // a state where only "a" is in use, "a" is never the victim.
        let cache = Cache::<u32>::new(4);
        cache.insert("a", 0, long);
        for i in 0..1000 {
            cache.insert(&format!("k{i}"), i, long);
            // A name in constant use is never the victim.
            assert!(cache.get("a").is_some());
        }
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn expired_entries_go_before_referenced_ones() {
        let cache = Cache::<u32>::new(3);
        cache.insert("a", 1, Duration::from_secs(60));
        cache.insert("b", 2, Duration::from_secs(60));
        cache.insert("old", 3, Duration::ZERO);
        assert!(cache.get("a").is_some() && cache.get("b").is_some());
        cache.insert("c", 4, Duration::from_secs(60));
        assert!(cache.get("a").is_some() && cache.get("b").is_some());
        assert!(cache.get("c").is_some());
    }

    #[test]
    fn expiry_and_zero_capacity() {
        let cache = Cache::<u32>::new(10);
        cache.insert("a", 1, Duration::ZERO);
        assert!(cache.get("a").is_none());
        cache.insert("a", 2, Duration::from_secs(5));
        let (v, ttl) = cache.get("a").unwrap();
        assert_eq!(v, 2);
        assert!(ttl <= Duration::from_secs(5) && ttl > Duration::from_secs(4));
        let none = Cache::<u32>::new(0);
        none.insert("a", 1, Duration::from_secs(5));
        assert!(none.get("a").is_none());
        assert_eq!(none.len(), 0);
    }

    #[test]
    fn sharded_bound_is_exact() {
        let cache = Cache::<u32>::new(5000);
        for i in 0..20_000 {
            cache.insert(&format!("k{i}"), i, Duration::from_secs(60));
        }
        assert_eq!(cache.len(), 5000);
    }

    #[tokio::test]
    async fn single_flight_survives_a_cancelled_leader() {
        let cache = Arc::new(Cache::<u32>::new(10));
        let c = Arc::clone(&cache);
        let leader = tokio::spawn(async move {
            c.get_or_fetch("k", || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                (1, Duration::from_secs(60))
            })
            .await
        });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let c = Arc::clone(&cache);
        let waiter = tokio::spawn(async move {
            c.get_or_fetch("k", || async { (2, Duration::from_secs(60)) })
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let (v, _, source) = waiter.await.unwrap();
        assert_eq!((v, source), (2, Source::Fetched));
        assert!(cache.shards[0].flights.lock().unwrap().is_empty());
    }
}
