//! The edge that talks to Redis: scripts run through a reconnecting connection, each call
//! within the timeout, every outcome fed to the [`Health`] state machine.

use crate::logic::{self, Health, LeaseIds, RateKind, Settings, Transition};
use crate::scripts;
use crate::{ClusterError, FALLBACK, LEASES, REDIS_ERRORS};
use dashmap::DashMap;
use rate_limiter::{ClusterMode, Rate};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// A lease this instance holds, as the heartbeat renews it.
struct Held {
    destination: String,
    key: String,
    cap: usize,
    lost: Arc<AtomicBool>,
}

struct Inner {
    settings: Settings,
    ids: LeaseIds,
    client: redis::Client,
    /// `None` until the first connection succeeds (Redis may be down at start).
    conn: Mutex<Option<ConnectionManager>>,
    mode: Arc<ClusterMode>,
    health: Mutex<Health>,
    /// By lease id.
    leases: DashMap<String, Held>,
    /// Destinations of the leases held for which another session waits (as of the last
    /// heartbeat).
    wanted: DashMap<String, ()>,
    acquire: Script,
    release: Script,
    renew: Script,
    gcra: Script,
}

/// The cluster-wide limits of this instance: leases and shared rates in Redis. Cheap to
/// share (`Arc` inside); its heartbeat stops when the last handle is dropped.
#[derive(Clone)]
pub struct ClusterLimits {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLimits")
            .field("instance_id", &self.inner.settings.instance_id)
            .field("degraded", &self.inner.mode.is_degraded())
            .field("leases", &self.inner.leases.len())
            .finish_non_exhaustive()
    }
}

/// One session's share of a destination's cluster-wide cap. Dropping it releases it in
/// Redis (in the background); if that fails, it expires after `lease_ttl`.
pub struct Lease {
    id: String,
    destination: String,
    key: String,
    lost: Arc<AtomicBool>,
    inner: Weak<Inner>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl Lease {
    /// The lease's id in its destination's set.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the lease was found gone at a renewal and could not be taken again (it
    /// expired while Redis was out of reach and others took the room): the session should
    /// close rather than be reused.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Releases the lease now and waits for Redis to have it (within the timeout), so a
    /// waiter anywhere can take it at once, and a shutting-down instance leaves nothing to
    /// expire. Dropping a lease instead releases it in the background.
    pub async fn release(mut self) {
        let Some(inner) = std::mem::take(&mut self.inner).upgrade() else {
            return;
        };
        inner.leases.remove(&self.id);
        metrics::gauge!(LEASES).set(inner.leases.len() as f64);
        if self.is_lost() || inner.mode.is_degraded() {
            return;
        }
        let released = inner
            .eval::<i64>(&inner.release, &[&self.key], &[self.id.clone()])
            .await;
        if let Err(e) = released {
            tracing::debug!(key = %self.key, error = %e, "lease not released; it expires by itself");
        }
    }

    /// Whether a session somewhere in the cluster waits for a lease of this destination (as
    /// of the last heartbeat, within a second): an idle session holding this lease should
    /// close and make room rather than wait in a pool.
    pub fn is_wanted(&self) -> bool {
        self.inner
            .upgrade()
            .is_some_and(|inner| inner.wanted.contains_key(&self.destination))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        inner.leases.remove(&self.id);
        metrics::gauge!(LEASES).set(inner.leases.len() as f64);
        if self.is_lost() || inner.mode.is_degraded() {
            // Nothing of ours in Redis, or no way to reach it: it expires by itself.
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let id = std::mem::take(&mut self.id);
        let key = std::mem::take(&mut self.key);
        runtime.spawn(async move {
            let released = inner.eval::<i64>(&inner.release, &[&key], &[id]).await;
            if let Err(e) = released {
                tracing::debug!(%key, error = %e, "lease not released; it expires by itself");
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// The connection, made on first use (and again by the heartbeat after a failed start).
    async fn connection(&self) -> Result<ConnectionManager, ClusterError> {
        if let Some(conn) = lock(&self.conn).clone() {
            return Ok(conn);
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.settings.timeout)
            .set_response_timeout(self.settings.timeout)
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_with_config(self.client.clone(), config).await?;
        *lock(&self.conn) = Some(conn.clone());
        Ok(conn)
    }

    /// Runs `script` on `key` within the timeout, and records how it went.
    async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[String],
    ) -> Result<T, ClusterError> {
        let call = async {
            let mut conn = self.connection().await?;
            let mut invocation = script.prepare_invoke();
            for key in keys {
                invocation.key(*key);
            }
            for arg in args {
                invocation.arg(arg);
            }
            Ok::<T, ClusterError>(invocation.invoke_async(&mut conn).await?)
        };
        let result = self.timed(call).await;
        self.observe(result.as_ref().err());
        result
    }

    /// A PING: whether Redis answers.
    async fn ping(&self) -> Result<(), ClusterError> {
        let call = async {
            let mut conn = self.connection().await?;
            let _: String = redis::cmd("PING").query_async(&mut conn).await?;
            Ok::<(), ClusterError>(())
        };
        let result = self.timed(call).await;
        self.observe(result.as_ref().err());
        result
    }

    async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, ClusterError>>,
    ) -> Result<T, ClusterError> {
        let timeout = self.settings.timeout;
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(ClusterError::Timeout(timeout)))
    }

    /// Feeds a call's outcome to the health state; flips the fallback (mode, gauge, one log
    /// line) on a transition.
    fn observe(&self, error: Option<&ClusterError>) {
        if error.is_some() {
            metrics::counter!(REDIS_ERRORS).increment(1);
        }
        let transition = lock(&self.health).observe(error.is_none());
        match transition {
            Some(Transition::Degraded) => {
                self.mode.set_degraded(true);
                metrics::gauge!(FALLBACK).set(1.0);
                tracing::warn!(
                    error = %error.map(ToString::to_string).unwrap_or_default(),
                    local_share = self.mode.local_share(),
                    "cluster limits: Redis is unreachable; cluster-scoped limits fall back to this instance's local share"
                );
            }
            Some(Transition::Recovered) => {
                self.mode.set_degraded(false);
                metrics::gauge!(FALLBACK).set(0.0);
                tracing::info!("cluster limits: Redis answers again; cluster-wide limits are back");
            }
            None => {}
        }
    }

    /// Reads the "wanted" flags of the destinations whose leases are held (one MGET).
    async fn check_wanted(&self) {
        let mut destinations: Vec<String> =
            self.leases.iter().map(|h| h.destination.clone()).collect();
        destinations.sort_unstable();
        destinations.dedup();
        if destinations.is_empty() {
            self.wanted.clear();
            return;
        }
        let keys: Vec<String> = destinations
            .iter()
            .map(|d| logic::wanted_key(&self.settings.key_prefix, d))
            .collect();
        let call = async {
            let mut conn = self.connection().await?;
            let flags: Vec<Option<String>> =
                redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
            Ok::<_, ClusterError>(flags)
        };
        let result = self.timed(call).await;
        self.observe(result.as_ref().err());
        let Ok(flags) = result else {
            return;
        };
        self.wanted.clear();
        for (destination, flag) in destinations.into_iter().zip(flags) {
            if flag.is_some() {
                self.wanted.insert(destination, ());
            }
        }
    }

    /// Renews every lease held, a script call per destination; with none held, a PING.
    async fn beat(&self) {
        let mut by_key: HashMap<String, (usize, Vec<String>)> = HashMap::new();
        for held in self.leases.iter() {
            let entry = by_key
                .entry(held.key.clone())
                .or_insert((held.cap, Vec::new()));
            entry.0 = entry.0.max(held.cap);
            entry.1.push(held.key().clone());
        }
        if by_key.is_empty() {
            // Errors are counted and logged by `ping`.
            let _ = self.ping().await;
            return;
        }
        let ttl_ms = self.settings.lease_ttl.as_millis().to_string();
        for (key, (cap, ids)) in by_key {
            let mut args = vec![ttl_ms.clone(), cap.to_string()];
            args.extend(ids);
            let Ok(lost) = self.eval::<Vec<String>>(&self.renew, &[&key], &args).await else {
                // Unreachable: the fallback is on; the next beat tries again.
                return;
            };
            for id in lost {
                if let Some((_, held)) = self.leases.remove(&id) {
                    held.lost.store(true, Ordering::SeqCst);
                    tracing::warn!(%key, lease = %id, "cluster lease lost (expired while Redis was unreachable); its session closes");
                }
            }
        }
    }
}

/// Renews the leases and watches Redis's health until the limits are dropped.
async fn heartbeat(inner: Weak<Inner>, lease_ttl: Duration) {
    let every = logic::heartbeat_every(lease_ttl);
    let renew = logic::renew_every(lease_ttl);
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.mode.is_degraded() || last.elapsed() >= renew {
            inner.beat().await;
            last = tokio::time::Instant::now();
        }
        if !inner.mode.is_degraded() {
            inner.check_wanted().await;
        }
    }
}

impl ClusterLimits {
    /// Starts the limits: connects (a Redis that does not answer yet only starts them in
    /// fallback) and spawns the heartbeat. Fails only on a `redis_url` that does not parse.
    pub async fn start(
        settings: Settings,
        mode: Arc<ClusterMode>,
    ) -> Result<ClusterLimits, ClusterError> {
        let client =
            redis::Client::open(settings.redis_url.as_str()).map_err(|e| ClusterError::BadUrl {
                url: settings.redis_url.clone(),
                message: e.to_string(),
            })?;
        let inner = Arc::new(Inner {
            ids: LeaseIds::new(&settings.instance_id, rand::random()),
            settings,
            client,
            conn: Mutex::new(None),
            mode,
            health: Mutex::new(Health::default()),
            leases: DashMap::new(),
            wanted: DashMap::new(),
            acquire: Script::new(scripts::ACQUIRE),
            release: Script::new(scripts::RELEASE),
            renew: Script::new(scripts::RENEW),
            gcra: Script::new(scripts::GCRA),
        });
        metrics::gauge!(FALLBACK).set(0.0);
        metrics::counter!(REDIS_ERRORS).increment(0);
        // Errors are counted and logged by `ping`; the fallback is on until Redis answers.
        let _ = inner.ping().await;
        tokio::spawn(heartbeat(Arc::downgrade(&inner), inner.settings.lease_ttl));
        Ok(ClusterLimits { inner })
    }

    /// Whether the limits are in fallback (Redis unreachable).
    pub fn is_degraded(&self) -> bool {
        self.inner.mode.is_degraded()
    }

    /// Leases this instance holds.
    pub fn leases_held(&self) -> usize {
        self.inner.leases.len()
    }

    /// Waits for a lease of `destination` (a site, or `site|source`) under `cap` leases
    /// cluster-wide. Polls while the destination is full (no notification crosses
    /// instances). [`ClusterError::Unavailable`] or another error: Redis is unreachable (or
    /// became so while waiting), and the caller keeps to its local share.
    pub async fn acquire(&self, destination: &str, cap: usize) -> Result<Lease, ClusterError> {
        let inner = &self.inner;
        let key = logic::lease_key(&inner.settings.key_prefix, destination);
        let wanted = logic::wanted_key(&inner.settings.key_prefix, destination);
        let id = inner.ids.next_id();
        let args = [
            id.clone(),
            cap.max(1).to_string(),
            inner.settings.lease_ttl.as_millis().to_string(),
            logic::WANTED_TTL.as_millis().to_string(),
        ];
        let mut attempt = 0;
        loop {
            if inner.mode.is_degraded() {
                return Err(ClusterError::Unavailable);
            }
            let held: i64 = inner.eval(&inner.acquire, &[&key, &wanted], &args).await?;
            if held == 1 {
                let lost = Arc::new(AtomicBool::new(false));
                inner.leases.insert(
                    id.clone(),
                    Held {
                        destination: destination.to_owned(),
                        key: key.clone(),
                        cap: cap.max(1),
                        lost: Arc::clone(&lost),
                    },
                );
                metrics::gauge!(LEASES).set(inner.leases.len() as f64);
                return Ok(Lease {
                    id,
                    destination: destination.to_owned(),
                    key,
                    lost,
                    inner: Arc::downgrade(&self.inner),
                });
            }
            tokio::time::sleep(logic::poll_delay(attempt, rand::random())).await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// Waits for a permit of `destination`'s shared `kind` rate (GCRA in Redis), and takes
    /// it. An error: Redis is unreachable, and the caller keeps to its local share.
    pub async fn until_permitted(
        &self,
        kind: RateKind,
        destination: &str,
        rate: Rate,
    ) -> Result<(), ClusterError> {
        let inner = &self.inner;
        let key = logic::rate_key(&inner.settings.key_prefix, kind, destination);
        let (interval, tolerance) = logic::gcra_params(rate);
        let args = [interval.to_string(), tolerance.to_string()];
        loop {
            if inner.mode.is_degraded() {
                return Err(ClusterError::Unavailable);
            }
            let wait_us: i64 = inner.eval(&inner.gcra, &[&key], &args).await?;
            if wait_us <= 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_micros(wait_us.unsigned_abs())).await;
        }
    }

    /// One heartbeat now: renews the leases held (or probes Redis), as the background task
    /// does every third of `lease_ttl`. For tests and for a caller that knows Redis is back.
    pub async fn heartbeat(&self) {
        self.inner.beat().await;
    }
}
