//! A log that tests grow, a cursor store over a map, and HTTP receivers on 127.0.0.1.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::serve::{Listener, ListenerExt};
use axum::Router;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use webhook::{Backlog, CursorStore, Position, Source, SourceRecord, WebhookConfig};

/// Test waits give up after this: far beyond what a loaded machine needs.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `done` until it holds, failing the test after [`PATIENCE`].
pub async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A record line of `kind` for `tenant`, with id `id`.
pub fn record(id: &str, kind: &str, tenant: Option<&str>) -> String {
    serde_json::json!({
        "type": kind,
        "timestamp": "2025-03-01T10:00:00Z",
        "id": id,
        "sender": "bounces@news.example",
        "recipient": format!("{id}@example.test"),
        "tenant": tenant,
    })
    .to_string()
}

/// The `id` of every record in a JSON-array body.
pub fn ids(body: &[u8]) -> Vec<String> {
    let records: Vec<serde_json::Value> = serde_json::from_slice(body).expect("a JSON array");
    records
        .iter()
        .map(|r| r["id"].as_str().expect("an id").to_string())
        .collect()
}

/// A config for a receiver at `addr`, with quick retries.
/// Starts `config` over `log` from its beginning, storing its cursor in `store`.
pub fn spawn_with_store(
    config: WebhookConfig,
    log: &Log,
    store: &std::sync::Arc<Store>,
    cancel: &tokio_util::sync::CancellationToken,
) -> webhook::WebhookHandle {
    webhook::spawn(
        config,
        log.source(Position::default()),
        std::sync::Arc::clone(store),
        Position::default(),
        cancel.clone(),
    )
    .expect("spawns")
}

/// Starts `config` over `log` from its beginning, with a fresh cursor store.
pub fn spawn_fresh(
    config: WebhookConfig,
    log: &Log,
    cancel: &tokio_util::sync::CancellationToken,
) -> webhook::WebhookHandle {
    webhook::spawn(
        config,
        log.source(Position::default()),
        std::sync::Arc::new(Store::default()),
        Position::default(),
        cancel.clone(),
    )
    .expect("spawns")
}

pub fn config(addr: SocketAddr, name: &str) -> WebhookConfig {
    WebhookConfig {
        name: name.to_string(),
        url: format!("http://{addr}/events"),
        max_backoff: Duration::from_millis(20),
        max_delay: Duration::from_millis(20),
        ..WebhookConfig::default()
    }
}

#[derive(Default)]
struct LogState {
    records: Vec<SourceRecord>,
    /// Reads still to fail.
    failing_reads: u32,
}

/// The accounting log: records appended by the test, read by [`LogSource`]s.
#[derive(Clone, Default)]
pub struct Log {
    state: Arc<Mutex<LogState>>,
    grew: Arc<Notify>,
}

impl Log {
    /// Appends `line`, returning its end.
    pub fn push(&self, line: String) -> Position {
        let mut s = self.state.lock().expect("log lock");
        let last = s.records.last().map(|r| r.end).unwrap_or_default();
        let end = Position::new(last.segment, last.offset + line.len() as u64 + 1);
        s.records.push(SourceRecord { end, line });
        drop(s);
        self.grew.notify_waiters();
        end
    }

    /// Appends the first record of a new segment.
    pub fn push_in_new_segment(&self, line: String) -> Position {
        let mut s = self.state.lock().expect("log lock");
        let segment = s.records.last().map_or(0, |r| r.end.segment) + 1;
        let end = Position::new(segment, line.len() as u64 + 1);
        s.records.push(SourceRecord { end, line });
        drop(s);
        self.grew.notify_waiters();
        end
    }

    /// The end of the last record.
    pub fn end(&self) -> Position {
        let s = self.state.lock().expect("log lock");
        s.records.last().map(|r| r.end).unwrap_or_default()
    }

    /// The end of the record with `id`.
    pub fn end_of(&self, id: &str) -> Position {
        let needle = format!("\"id\":\"{id}\"");
        let s = self.state.lock().expect("log lock");
        s.records
            .iter()
            .find(|r| r.line.contains(&needle))
            .map(|r| r.end)
            .expect("a record with that id")
    }

    /// Makes the next `n` reads fail.
    pub fn fail_reads(&self, n: u32) {
        self.state.lock().expect("log lock").failing_reads = n;
    }

    /// A reader of the records after `start`.
    pub fn source(&self, start: Position) -> LogSource {
        let next = {
            let s = self.state.lock().expect("log lock");
            s.records.iter().take_while(|r| r.end <= start).count()
        };
        LogSource {
            log: self.clone(),
            next,
        }
    }
}

/// Reads a [`Log`].
pub struct LogSource {
    log: Log,
    next: usize,
}

impl LogSource {
    fn take(&mut self, max: usize) -> Result<Vec<SourceRecord>, String> {
        let mut s = self.log.state.lock().expect("log lock");
        if s.failing_reads > 0 {
            s.failing_reads -= 1;
            return Err("disk on fire".to_string());
        }
        let end = s.records.len().min(self.next + max);
        let out = s.records[self.next..end].to_vec();
        self.next = end;
        Ok(out)
    }
}

impl Source for LogSource {
    async fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<SourceRecord>, String> {
        let deadline = Instant::now() + wait;
        let grew = self.log.grew.clone();
        loop {
            let notified = grew.notified();
            tokio::pin!(notified);
            // Registered before looking, so a push between the look and the wait is not missed.
            notified.as_mut().enable();
            let out = self.take(max)?;
            if !out.is_empty() {
                return Ok(out);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    fn backlog(&self) -> Backlog {
        let s = self.log.state.lock().expect("log lock");
        let rest = &s.records[self.next.min(s.records.len())..];
        Backlog {
            records: rest.len() as u64,
            bytes: rest.iter().map(|r| r.line.len() as u64 + 1).sum(),
        }
    }
}

/// A check run on every cursor before it is stored: false marks a violation.
pub type CursorCheck = Box<dyn Fn(Position) -> bool + Send + Sync>;

/// Cursors in a map, with injectable failures.
#[derive(Default)]
pub struct Store {
    cursors: Mutex<HashMap<String, Position>>,
    /// Calls still to fail.
    pub failing: AtomicU32,
    /// Every call, failed or not.
    pub calls: AtomicU32,
    /// Stores that the check refused.
    pub violations: AtomicU32,
    check: Option<CursorCheck>,
}

impl Store {
    /// A store that runs `check` on every cursor it is given.
    pub fn checked(check: CursorCheck) -> Store {
        Store {
            check: Some(check),
            ..Store::default()
        }
    }

    /// The cursor of `name`, if stored.
    pub fn get(&self, name: &str) -> Option<Position> {
        self.cursors.lock().expect("store lock").get(name).copied()
    }
}

impl CursorStore for Store {
    fn store(
        &self,
        name: &str,
        cursor: Position,
    ) -> impl Future<Output = Result<(), String>> + Send {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let result = if self
            .failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            Err("store unavailable".to_string())
        } else {
            if self.check.as_ref().is_some_and(|check| !check(cursor)) {
                self.violations.fetch_add(1, Ordering::SeqCst);
            }
            self.cursors
                .lock()
                .expect("store lock")
                .insert(name.to_string(), cursor);
            Ok(())
        };
        std::future::ready(result)
    }
}

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub status: u16,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn batch_id(&self) -> &str {
        self.header("x-drover-batch-id").expect("a batch id")
    }

    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Default)]
pub struct ReceiverState {
    pub requests: Mutex<Vec<Request>>,
    /// Statuses to answer first, in order.
    pub script: Mutex<VecDeque<u16>>,
    /// The status once the script is used up.
    pub default_status: AtomicU16,
    pub connections: AtomicUsize,
}

/// An HTTP endpoint on 127.0.0.1 that records what it is sent.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    pub state: Arc<ReceiverState>,
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let status = state
        .script
        .lock()
        .expect("script lock")
        .pop_front()
        .unwrap_or_else(|| state.default_status.load(Ordering::SeqCst));
    state.requests.lock().expect("requests lock").push(Request {
        headers,
        body,
        status,
    });
    StatusCode::from_u16(status).expect("a status")
}

impl Receiver {
    /// A receiver answering `script` first, then `default_status`.
    pub async fn start(script: &[u16], default_status: u16) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Receiver::serve(listener, script, default_status)
    }

    /// Serves on `listener` (plain TCP or any other [`Listener`]).
    pub fn serve<L>(listener: L, script: &[u16], default_status: u16) -> Receiver
    where
        L: Listener<Addr = SocketAddr>,
    {
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(ReceiverState {
            script: Mutex::new(script.iter().copied().collect()),
            default_status: AtomicU16::new(default_status),
            ..ReceiverState::default()
        });
        let counted = state.clone();
        let listener = listener.tap_io(move |_| {
            counted.connections.fetch_add(1, Ordering::SeqCst);
        });
        let app = Router::new()
            .route("/events", post(receive))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, state }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().expect("requests lock").clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().expect("requests lock").len()
    }

    /// The ids of the acknowledged records, in the order they arrived.
    pub fn acknowledged(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter(|r| r.ok())
            .flat_map(|r| ids(&r.body))
            .collect()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

/// A TCP endpoint that accepts connections and never answers.
pub struct Silent {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

impl Silent {
    pub async fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            // Held open, so the client waits for an answer rather than seeing a reset.
            let mut held: Vec<TcpStream> = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        Silent { addr, accepted }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// TLS over a TCP listener, with a self-signed certificate.
pub struct TlsListener {
    pub tcp: TcpListener,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, peer)) = self.tcp.accept().await else {
                continue;
            };
            // A client that refuses the certificate fails the handshake: wait for the next.
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
