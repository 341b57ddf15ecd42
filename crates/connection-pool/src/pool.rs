//! Idle sessions per destination, so consecutive messages reuse a connection.

use crate::SmtpClient;
use dashmap::DashMap;
use queue_key::QueueKey;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// What the pool can hold: a session, possibly bundled with what must live exactly as long
/// as the connection (the engine keeps its connection-cap permit there, so idle sessions
/// count against `max_connections` too).
pub trait Pooled: Send + 'static {
    /// Whether the session can carry another transaction.
    fn is_usable(&self) -> bool;
    /// Says goodbye (QUIT) and closes.
    fn close(self) -> impl Future<Output = ()> + Send;
}

impl Pooled for SmtpClient {
    fn is_usable(&self) -> bool {
        SmtpClient::is_usable(self)
    }

    fn close(self) -> impl Future<Output = ()> + Send {
        self.quit()
    }
}

struct Idle<S> {
    since: Instant,
    client: S,
}

/// Idle sessions keyed by destination: the site, and the egress source when there is one.
pub struct Pool<S: Pooled = SmtpClient> {
    idle: DashMap<QueueKey, Vec<Idle<S>>>,
    idle_timeout: Duration,
}

impl<S: Pooled> std::fmt::Debug for Pool<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("destinations", &self.idle.len())
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl<S: Pooled> Pool<S> {
    /// An empty pool whose sessions are closed after `idle_timeout` unused.
    pub fn new(idle_timeout: Duration) -> Pool<S> {
        Pool {
            idle: DashMap::new(),
            idle_timeout,
        }
    }

    /// Takes an idle session for `key`, if one is open and fresh.
    pub fn checkout(&self, key: &QueueKey) -> Option<S> {
        let mut stale = Vec::new();
        let found = {
            let mut entry = self.idle.get_mut(key)?;
            let mut found = None;
            while let Some(idle) = entry.pop() {
                if idle.since.elapsed() < self.idle_timeout && idle.client.is_usable() {
                    found = Some(idle.client);
                    break;
                }
                stale.push(idle.client);
            }
            found
        };
        // An emptied entry is dropped, so destinations seen once do not stay in the map.
        self.idle.remove_if(key, |_, sessions| sessions.is_empty());
        close_all(stale);
        found
    }

    /// Whether an idle session for `key` is waiting (it may still turn out stale).
    pub fn has_idle(&self, key: &QueueKey) -> bool {
        self.idle.get(key).is_some_and(|s| !s.is_empty())
    }

    /// Returns a session after use. Broken sessions are dropped.
    pub fn checkin(&self, key: &QueueKey, client: S) {
        if !client.is_usable() {
            return;
        }
        self.idle.entry(key.clone()).or_default().push(Idle {
            since: Instant::now(),
            client,
        });
    }

    /// Closes (QUIT) every session idle longer than the timeout, or no longer usable (what
    /// a session's usability depends on may change while it waits). Call periodically.
    pub fn reap(&self) {
        let mut stale = Vec::new();
        self.idle.retain(|_, sessions| {
            let (keep, old): (Vec<Idle<S>>, Vec<Idle<S>>) = std::mem::take(sessions)
                .into_iter()
                .partition(|i| i.since.elapsed() < self.idle_timeout && i.client.is_usable());
            *sessions = keep;
            stale.extend(old.into_iter().map(|i| i.client));
            !sessions.is_empty()
        });
        close_all(stale);
    }

    /// Closes the idle session that has waited longest, of any destination; returns whether
    /// there was one. Used when a global connection budget is exhausted: an idle session to
    /// one destination must not keep a busy destination waiting.
    pub fn evict_oldest(&self) -> bool {
        let oldest = self
            .idle
            .iter()
            .filter_map(|e| e.value().first().map(|i| (i.since, e.key().clone())))
            .min_by_key(|(since, _)| *since);
        let Some((_, key)) = oldest else {
            return false;
        };
        let victim = self
            .idle
            .get_mut(&key)
            .and_then(|mut sessions| (!sessions.is_empty()).then(|| sessions.remove(0).client));
        self.idle.remove_if(&key, |_, sessions| sessions.is_empty());
        match victim {
            Some(client) => {
                close_all(vec![client]);
                true
            }
            None => false,
        }
    }

    /// Number of idle sessions held.
    pub fn idle_count(&self) -> usize {
        self.idle.iter().map(|e| e.value().len()).sum()
    }

    /// Closes every idle session and waits for the QUITs (shutdown).
    pub async fn close(&self) {
        let mut all = Vec::new();
        self.idle.retain(|_, sessions| {
            all.extend(std::mem::take(sessions).into_iter().map(|i| i.client));
            false
        });
        let quits: Vec<_> = all.into_iter().map(|c| tokio::spawn(c.close())).collect();
        for q in quits {
            let _ = q.await;
        }
    }
}

fn close_all<S: Pooled>(clients: Vec<S>) {
    for client in clients {
        tokio::spawn(client.close());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Fake {
        usable: Arc<AtomicBool>,
        closed: Arc<AtomicUsize>,
    }

    impl Pooled for Fake {
        fn is_usable(&self) -> bool {
            self.usable.load(Ordering::SeqCst)
        }

        fn close(self) -> impl Future<Output = ()> + Send {
            let closed = self.closed;
            async move {
                closed.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    #[tokio::test]
    async fn a_reap_closes_sessions_that_became_unusable_while_idle() {
        let pool = Pool::new(Duration::from_secs(60));
        let closed = Arc::new(AtomicUsize::new(0));
        let key = QueueKey::new("mx.test");
        let flags: Vec<_> = (0..2).map(|_| Arc::new(AtomicBool::new(true))).collect();
        for usable in &flags {
            pool.checkin(
                &key,
                Fake {
                    usable: Arc::clone(usable),
                    closed: Arc::clone(&closed),
                },
            );
        }
        pool.reap();
        assert_eq!(pool.idle_count(), 2, "fresh and usable: kept");
        flags[0].store(false, Ordering::SeqCst);
        pool.reap();
        assert_eq!(pool.idle_count(), 1);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            closed.load(Ordering::SeqCst),
            1,
            "closed with QUIT, not dropped"
        );
    }
}
