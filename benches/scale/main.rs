//! The scale benchmark (issue 7): a million queued messages over 100 000 domains, scheduled
//! into the future.
//!
//! `cargo bench -p drover --bench scale` (see README.md, "Benchmarks"). Reports:
//! 1. memory of the in-memory schedule alone (`queue::Scheduler`, filled in this process):
//!    VmRSS before/after, bytes per queued message;
//! 2. the whole engine: a spool of N messages (written directly with `queue::Spool`), one more
//!    message due now routed to a sink and written last (the reload reaches it last: the worst
//!    case); `drover serve` is started on it and timed until that message's `Delivery` record
//!    (restart to first delivery) and until the whole queue is reloaded; then its VmRSS minus
//!    that of an engine on an empty spool, per queued message;
//! 3. the delivery rate when messages come due: the campaign `due` (20 000 messages over 1 000
//!    domains; 10 000 in quick mode) made due at once through the admin API's retry, timed to
//!    the last `Delivery` record and counting deferrals (a 20 s command timeout). Every due
//!    domain opens its own connections at once, all to one sink (`drover sink`).
//!
//! 4. the process that did the work (issue 16): the same number of messages injected over HTTP
//!    into a live engine whose every attempt is soft-rejected, RSS during and after the
//!    deferral wave, then a clean stop and a restart on that spool: time to listening, to the
//!    first delivery of a new message, to ready (see `live_process`).
//!
//! Environment: `DROVER_BENCH_QUICK=1` (100 000 messages over 10 000 domains),
//! `DROVER_BENCH_SCALE_PHASES` (`restart,live`; either alone), `DROVER_BENCH_SCALE_LIVE_N`,
//! `DROVER_BENCH_SCALE_N`, `DROVER_BENCH_SCALE_DOMAINS`, `DROVER_BENCH_SCALE_DUE`,
//! `DROVER_BENCH_SCALE_DUE_DOMAINS`,
//! `DROVER_BENCH_SCALE_BODY` (bytes, default 1024), `DROVER_BENCH_BINARY=PATH` (a `drover` binary
//! to measure instead of this build's, e.g. an older one for a before/after). Writes
//! `target/bench/scale.json`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "../support/net.rs"]
mod net;
#[path = "../relay/proc.rs"]
mod proc;

use net::{free_port, wait_until};

use queue::{MessageId, MessageMeta, Scheduler, Spool, SpoolOptions};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn domain(k: usize) -> String {
    format!("d{k}.scale.test")
}

/// The shape of the queue: `n` messages over `domains` domains; the first `due` of them (the
/// campaign `due`, made due at once later) over the first `due_domains` domains.
#[derive(Clone, Copy)]
struct Shape {
    n: usize,
    domains: usize,
    due: usize,
    due_domains: usize,
}

fn meta(i: usize, shape: Shape, due_ms: u64) -> MessageMeta {
    let due = shape.due;
    let d = if i < due {
        domain(i % shape.due_domains)
    } else {
        domain(i % shape.domains)
    };
    MessageMeta {
        id: MessageId::generate(),
        sender: "bounces@sender.example.com".into(),
        recipient: format!("user{i}@{d}"),
        domain: d,
        campaign: Some(if i < due { "due" } else { "later" }.into()),
        tenant: None,
        received_ms: now_ms(),
        due_ms,
        attempts: 0,
        headers: BTreeMap::new(),
        last_source: None,
        priority: Default::default(),
        metadata: None,
        arrived_ms: None,
        size: 0,
    }
}

/// 1. The schedule alone, in this process.
fn scheduler_memory(shape: Shape) -> serde_json::Value {
    let Shape {
        n, domains, due, ..
    } = shape;
    let names: Vec<queue_key::QueueKey> = (0..domains)
        .map(|d| queue_key::QueueKey::new(domain(d)))
        .collect();
    let ids: Vec<MessageId> = (0..n).map(|_| MessageId::generate()).collect();
    let me = std::process::id();
    let before = proc::rss_kb(me).unwrap_or(0);
    let scheduler = Scheduler::new();
    let now = now_ms();
    let later = now + 86_400_000;
    let start = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let campaign = if i < due { "due" } else { "later" };
        scheduler.schedule(*id, &names[i % domains], Some(campaign), later, now, now);
    }
    let fill = start.elapsed().as_secs_f64();
    let after = proc::rss_kb(me).unwrap_or(0);
    let per = (after.saturating_sub(before) * 1024) as f64 / n as f64;
    eprintln!(
        "scheduler: {n} messages over {domains} domains: +{} MB RSS, {per:.0} bytes/message, filled in {fill:.2} s",
        (after - before) / 1024
    );
    assert_eq!(scheduler.len(), n);
    drop(scheduler);
    json!({
        "messages": n,
        "domains": domains,
        "rss_before_kb": before,
        "rss_after_kb": after,
        "bytes_per_message": per.round(),
        "fill_seconds": (fill * 1000.0).round() / 1000.0,
    })
}

/// Writes the spool: `n` messages due in a day, then one due now for `now.scale.test`.
fn build_spool(path: &Path, shape: Shape, body_size: usize) -> f64 {
    let n = shape.n;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let start = Instant::now();
    let spool = Spool::open(path, SpoolOptions::default()).unwrap();
    let body = vec![b'x'; body_size];
    let later = now_ms() + 86_400_000;
    rt.block_on(async {
        let mut i = 0;
        while i < n {
            let batch: Vec<_> = (i..(i + 2000).min(n))
                .map(|j| (meta(j, shape, later), body.clone()))
                .collect();
            i += batch.len();
            spool.insert(batch).await.unwrap();
        }
        let mut now_msg = meta(n, shape, 0);
        now_msg.domain = "now.scale.test".into();
        now_msg.recipient = "first@now.scale.test".into();
        now_msg.campaign = Some("first".into());
        spool.insert(vec![(now_msg, body.clone())]).await.unwrap();
        spool.close().unwrap();
    });
    start.elapsed().as_secs_f64()
}

struct Engine {
    child: Child,
    port: u16,
    accounting: PathBuf,
}

fn start_engine(drover: &Path, dir: &Path, spool: &Path, sink_port: u16) -> Engine {
    start_engine_with(drover, dir, spool, sink_port, "", "")
}

/// An engine with `delivery` lines added to its `[delivery]` table and `extra` TOML appended.
fn start_engine_with(
    drover: &Path,
    dir: &Path,
    spool: &Path,
    sink_port: u16,
    delivery: &str,
    extra: &str,
) -> Engine {
    let port = free_port();
    let accounting = dir.join("accounting.jsonl");
    let config = format!(
        r#"
[spool]
path = "{spool}"
[http]
listen = "127.0.0.1:{port}"
[accounting]
path = "{accounting}"
[delivery]
ehlo_name = "drover.scale.test"
command_timeout = "20s"
{delivery}
[[route]]
domain = "*"
hosts = ["127.0.0.1:{sink_port}"]
{extra}
"#,
        spool = spool.display(),
        accounting = accounting.display(),
    );
    let config_path = dir.join("drover.toml");
    std::fs::write(&config_path, config).unwrap();
    let log = std::fs::File::create(dir.join("drover.log")).unwrap();
    let child = Command::new(drover)
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Engine {
        child,
        port,
        accounting,
    }
}

impl Engine {
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        if !wait_until(Duration::from_secs(60), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        }) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn http(&self, method: &str, path: &str, body: &str) -> String {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// `drover_queue_messages{state="scheduled"}` from /metrics.
    fn scheduled(&self) -> u64 {
        let text = self.http("GET", "/metrics", "");
        text.lines()
            .find(|l| l.starts_with("drover_queue_messages{state=\"scheduled\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }
}

/// RSS of `pid` sampled every 200 ms on a thread until stopped: (samples, peak) in kB.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<(Vec<(f64, u64)>, u64)>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = std::sync::Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            let mut samples = Vec::new();
            let mut peak = 0;
            while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(rss) = proc::rss_kb(pid) {
                    peak = peak.max(rss);
                    samples.push((start.elapsed().as_secs_f64(), rss));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (samples, peak)
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> (Vec<(f64, u64)>, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

/// POSTs one inject request of `count` recipients starting at `first`; panics unless 200.
fn inject_batch(port: u16, first: usize, count: usize, domains: usize, body: &str) {
    let recipients: Vec<serde_json::Value> = (first..first + count)
        .map(|i| json!({"email": format!("u{i}@{}", live_domain(i % domains))}))
        .collect();
    post_inject(
        port,
        &json!({
            "envelope_sender": "bounces@sender.example.com",
            "content": body,
            "recipients": recipients,
            "campaign": "live",
        }),
    );
}

/// POSTs one inject request; panics unless 200.
fn post_inject(port: u16, request: &serde_json::Value) {
    use std::io::Write;
    let request = request.to_string();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /api/inject/v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        request.len()
    )
    .unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "inject failed: {reply}");
}

fn live_domain(i: usize) -> String {
    format!("d{i}.live.scale.test")
}

/// Whether `GET /readyz` answers 200.
fn ready(port: u16) -> bool {
    use std::io::Write;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    );
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200")
}

/// Phase 4, the process that did the work: `n` messages injected over HTTP (batches of
/// 1 000, four clients) into an engine whose every delivery is soft-rejected (`drover sink`
/// with a 100 % tempfail share, retry in a day), RSS sampled throughout; after the last
/// deferral, RSS at +5 s and +30 s; then SIGTERM and a new process on the same spool: time
/// until its listeners accept, until `/readyz` says ready, and until a message injected at
/// once is delivered (to an accepting sink).
fn live_process(
    drover: &Path,
    work: &Path,
    n: usize,
    domains: usize,
    body_size: usize,
) -> serde_json::Value {
    let reject_port = free_port();
    let mut reject = Command::new(drover)
        .args([
            "sink",
            "--listen",
            &format!("127.0.0.1:{reject_port}"),
            "--tempfail-percent",
            "100",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let accept_port = free_port();
    let mut accept = Command::new(drover)
        .args(["sink", "--listen", &format!("127.0.0.1:{accept_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(net::wait_for_port(reject_port, Duration::from_secs(30)));
    assert!(net::wait_for_port(accept_port, Duration::from_secs(30)));
    let dir = tempfile::Builder::new()
        .prefix("scale-live-")
        .tempdir_in(work)
        .unwrap();
    let spool = dir.path().join("spool");
    let extra = format!(
        "[[route]]\ndomain = \"now.scale.test\"\nhosts = [\"127.0.0.1:{accept_port}\"]\n\
         [retry]\nintervals = [\"1d\"]\n"
    );
    // As the operator ran it: at most 100 sessions.
    let delivery = "max_connections = 100";
    let e = start_engine_with(drover, dir.path(), &spool, reject_port, delivery, &extra);
    assert!(net::wait_for_port(e.port, Duration::from_secs(30)));
    let pid = e.child.id();
    let empty_rss = proc::rss_kb(pid).unwrap_or(0);
    let body = format!(
        "From: News <news@sender.example.com>\r\nSubject: live\r\n\r\n{}\r\n",
        "x".repeat(body_size)
    );
    let sampler = Sampler::start(pid);
    let start = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (next, body, port) = (std::sync::Arc::clone(&next), body.clone(), e.port);
            std::thread::spawn(move || loop {
                let first = next.fetch_add(1000, std::sync::atomic::Ordering::SeqCst);
                if first >= n {
                    return;
                }
                inject_batch(port, first, 1000.min(n - first), domains, &body);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let injected = start.elapsed().as_secs_f64();
    eprintln!("live: injected {n} over HTTP in {injected:.1} s");
    let mut tail = Tail::new(&e.accounting, 0);
    let attempted = wait_until(Duration::from_secs(3600), || {
        tail.poll();
        tail.failures >= n as u64
    });
    let deferred = start.elapsed().as_secs_f64();
    eprintln!(
        "live: {} first attempts deferred {deferred:.1} s after the start{}",
        tail.failures,
        if attempted { "" } else { " (timed out)" }
    );
    std::thread::sleep(Duration::from_secs(5));
    let after_5s = proc::rss_kb(pid).unwrap_or(0);
    // What RocksDB holds of that (the engine's own gauges; refreshed every few seconds).
    let spool_memory: serde_json::Map<String, serde_json::Value> = e
        .http("GET", "/metrics", "")
        .lines()
        .filter(|l| l.starts_with("drover_spool_memory_bytes{"))
        .filter_map(|l| {
            let part = l.split('"').nth(1)?;
            let value: f64 = l.split_whitespace().last()?.parse().ok()?;
            Some((part.to_owned(), json!((value / 1048576.0).round())))
        })
        .collect();
    eprintln!("live: RocksDB memory 5 s after the wave (MB): {spool_memory:?}");
    std::thread::sleep(Duration::from_secs(25));
    let after_30s = proc::rss_kb(pid).unwrap_or(0);
    let (samples, peak) = sampler.finish();
    let per = |kb: u64| ((kb.saturating_sub(empty_rss) * 1024) as f64 / n as f64).round();
    eprintln!(
        "live: RSS peak {} MB, 5 s after the wave {} MB ({} B/message), 30 s after {} MB ({} B/message)",
        peak / 1024,
        after_5s / 1024,
        per(after_5s),
        after_30s / 1024,
        per(after_30s)
    );
    let stop_start = Instant::now();
    e.stop();
    let stop_secs = stop_start.elapsed().as_secs_f64();

    let restart = Instant::now();
    let e = start_engine_with(drover, dir.path(), &spool, reject_port, delivery, &extra);
    let pid = e.child.id();
    assert!(net::wait_for_port(e.port, Duration::from_secs(600)));
    let listening = restart.elapsed().as_secs_f64();
    inject_batch_to(e.port, "first@now.scale.test", &body);
    let mut tail = Tail::new(
        &e.accounting,
        std::fs::metadata(&e.accounting).map_or(0, |m| m.len()),
    );
    assert!(
        wait_until(Duration::from_secs(600), || tail.poll() >= 1),
        "the new message was not delivered"
    );
    let first_delivery = restart.elapsed().as_secs_f64();
    assert!(wait_until(Duration::from_secs(900), || ready(e.port)));
    let readyz = restart.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let restarted_rss = proc::rss_kb(pid).unwrap_or(0);
    eprintln!(
        "live restart: listening {listening:.2} s, first delivery {first_delivery:.2} s, ready {readyz:.2} s; RSS {} MB ({} B/message)",
        restarted_rss / 1024,
        per(restarted_rss)
    );
    e.stop();
    let _ = reject.kill();
    let _ = reject.wait();
    let _ = accept.kill();
    let _ = accept.wait();
    // Every second sample is enough to show the curve.
    let curve: Vec<_> = samples
        .iter()
        .step_by(5)
        .map(|(t, kb)| json!([(t * 10.0).round() / 10.0, kb / 1024]))
        .collect();
    json!({
        "messages": n,
        "domains": domains,
        "inject_seconds": (injected * 10.0).round() / 10.0,
        "first_attempts_done_seconds": (deferred * 10.0).round() / 10.0,
        "empty_rss_kb": empty_rss,
        "peak_rss_kb": peak,
        "rss_5s_after_kb": after_5s,
        "rss_30s_after_kb": after_30s,
        "bytes_per_message_5s_after": per(after_5s),
        "bytes_per_message_30s_after": per(after_30s),
        "peak_bytes_per_message": per(peak),
        "spool_memory_mb_5s_after": spool_memory,
        "stop_seconds": (stop_secs * 100.0).round() / 100.0,
        "restart_to_listening_s": (listening * 100.0).round() / 100.0,
        "restart_to_first_delivery_s": (first_delivery * 100.0).round() / 100.0,
        "restart_to_ready_s": (readyz * 100.0).round() / 100.0,
        "restarted_rss_kb": restarted_rss,
        "restarted_bytes_per_message": per(restarted_rss),
        "rss_mb_curve": curve,
    })
}

/// Injects one message for `recipient`.
fn inject_batch_to(port: u16, recipient: &str, body: &str) {
    post_inject(
        port,
        &json!({
            "envelope_sender": "bounces@sender.example.com",
            "content": body,
            "recipients": [{"email": recipient}],
        }),
    );
}

/// Counts `Delivery` lines of the accounting file incrementally.
struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    deliveries: u64,
    failures: u64,
    /// Deferral reasons (the reply text) and how often each came.
    reasons: std::collections::BTreeMap<String, u64>,
}

impl Tail {
    /// Reads `path` from `offset` on.
    fn new(path: &Path, offset: u64) -> Tail {
        Tail {
            path: path.to_owned(),
            offset,
            partial: Vec::new(),
            deliveries: 0,
            failures: 0,
            reasons: Default::default(),
        }
    }

    fn poll(&mut self) -> u64 {
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            let mut buf = Vec::new();
            if f.seek(SeekFrom::Start(self.offset)).is_ok() && f.read_to_end(&mut buf).is_ok() {
                self.offset += buf.len() as u64;
                self.partial.extend_from_slice(&buf);
                if let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') {
                    for l in self.partial[..end].split(|b| *b == b'\n') {
                        if l.starts_with(br#"{"type":"Delivery""#) {
                            self.deliveries += 1;
                        } else if l.starts_with(br#"{"type":"TransientFailure""#) {
                            self.failures += 1;
                            let text = serde_json::from_slice::<serde_json::Value>(l)
                                .ok()
                                .and_then(|r| r["response"]["text"].as_str().map(str::to_owned))
                                .unwrap_or_default();
                            *self.reasons.entry(text).or_default() += 1;
                        }
                    }
                    self.partial.drain(..=end);
                }
            }
        }
        self.deliveries
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("scale: run with `cargo bench -p drover --bench scale`; skipped");
        return;
    }
    let quick = std::env::var("DROVER_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
    let n = env_usize(
        "DROVER_BENCH_SCALE_N",
        if quick { 100_000 } else { 1_000_000 },
    );
    let domains = env_usize(
        "DROVER_BENCH_SCALE_DOMAINS",
        if quick { 10_000 } else { 100_000 },
    )
    .clamp(1, n);
    let due = env_usize(
        "DROVER_BENCH_SCALE_DUE",
        if quick { 10_000 } else { 20_000 },
    )
    .min(n);
    // Each due domain opens its own connections at once, all to one sink: a burst the sink
    // must accept; keep the due domains few (see README, "Benchmarks").
    let due_domains = env_usize("DROVER_BENCH_SCALE_DUE_DOMAINS", 1000).clamp(1, domains.min(due));
    let shape = Shape {
        n,
        domains,
        due,
        due_domains,
    };
    let body_size = env_usize("DROVER_BENCH_SCALE_BODY", 1024);
    let drover = net::drover_binary(env!("CARGO_BIN_EXE_drover"));
    let work = net::bench_dir(env!("CARGO_MANIFEST_DIR"));
    let machine = proc::machine();

    let sched = scheduler_memory(shape);
    let phases =
        std::env::var("DROVER_BENCH_SCALE_PHASES").unwrap_or_else(|_| "restart,live".into());
    let live = phases.contains("live").then(|| {
        let live_n = env_usize("DROVER_BENCH_SCALE_LIVE_N", n);
        eprintln!("live: {live_n} messages over {domains} domains, every one soft-rejected");
        live_process(&drover, &work, live_n, domains, body_size)
    });
    if !phases.contains("restart") {
        let out = json!({
            "bench": "scale",
            "mode": if quick { "quick" } else { "full" },
            "machine": machine,
            "scheduler_only": sched,
            "live": live,
        });
        let path = work.join("scale.json");
        std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
        println!("{}", serde_json::to_string_pretty(&out).unwrap());
        return;
    }

    // The sink: Drover's own (this bench measures the engine's memory and start-up, not the wire).
    let (mut sink, sink_port) = net::spawn_sink(&drover);

    // An engine on an empty spool: the fixed part of its memory.
    let empty_dir = tempfile::Builder::new()
        .prefix("scale-empty-")
        .tempdir_in(&work)
        .unwrap();
    let e = start_engine(
        &drover,
        empty_dir.path(),
        &empty_dir.path().join("spool"),
        sink_port,
    );
    assert!(net::wait_for_port(e.port, Duration::from_secs(30)));
    std::thread::sleep(Duration::from_secs(2));
    let empty_rss = proc::rss_kb(e.child.id()).unwrap_or(0);
    e.stop();

    let dir = tempfile::Builder::new()
        .prefix("scale-")
        .tempdir_in(&work)
        .unwrap();
    let spool = dir.path().join("spool");
    eprintln!("writing a spool of {n} messages over {domains} domains ({body_size} B bodies)...");
    let build = build_spool(&spool, shape, body_size);
    eprintln!("  written in {build:.1} s");

    let start = Instant::now();
    let e = start_engine(&drover, dir.path(), &spool, sink_port);
    let pid = e.child.id();
    let mut tail = Tail::new(&e.accounting, 0);
    assert!(
        wait_until(Duration::from_secs(600), || tail.poll() >= 1),
        "the due message was not delivered"
    );
    let first_delivery = start.elapsed().as_secs_f64();
    eprintln!("restart to first delivery: {first_delivery:.2} s");
    assert!(
        wait_until(Duration::from_secs(900), || e.scheduled() >= n as u64),
        "the reload did not finish"
    );
    let reloaded = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let full_rss = proc::rss_kb(pid).unwrap_or(0);
    let per = (full_rss.saturating_sub(empty_rss) * 1024) as f64 / n as f64;
    eprintln!(
        "reloaded {n} in {reloaded:.1} s; engine RSS {} MB (empty: {} MB): {per:.0} bytes/message",
        full_rss / 1024,
        empty_rss / 1024
    );

    // Delivery rate when messages come due: one per domain, all at once.
    let due_start = Instant::now();
    let reply = e.http("POST", "/api/admin/v1/retry", r#"{"campaign":"due"}"#);
    assert!(reply.starts_with("HTTP/1.1 200"), "retry failed: {reply}");
    let ok = wait_until(Duration::from_secs(1800), || {
        tail.poll() + tail.failures > due as u64
    });
    let due_secs = due_start.elapsed().as_secs_f64();
    let delivered = tail.deliveries.saturating_sub(1);
    let rate = delivered as f64 / due_secs;
    eprintln!(
        "came due: {delivered} messages over {due_domains} domains delivered in {due_secs:.1} s: {rate:.0} msgs/s, {} deferred{}",
        tail.failures,
        if ok { "" } else { " (timed out)" }
    );
    for (reason, count) in &tail.reasons {
        eprintln!("  deferred {count}×: {reason}");
    }
    let cpu = proc::cpu_seconds(pid).unwrap_or(0.0);
    let peak = proc::peak_rss_kb(pid).unwrap_or(0);
    e.stop();
    let _ = sink.kill();
    let _ = sink.wait();

    let out = json!({
        "bench": "scale",
        "mode": if quick { "quick" } else { "full" },
        "machine": machine,
        "scheduler_only": sched,
        "engine": {
            "messages": n,
            "domains": domains,
            "body_bytes": body_size,
            "spool_write_seconds": (build * 10.0).round() / 10.0,
            "empty_rss_kb": empty_rss,
            "loaded_rss_kb": full_rss,
            "bytes_per_message": per.round(),
            "restart_to_first_delivery_s": (first_delivery * 1000.0).round() / 1000.0,
            "restart_to_full_reload_s": (reloaded * 100.0).round() / 100.0,
            "peak_rss_kb": peak,
            "cpu_seconds_total": (cpu * 10.0).round() / 10.0,
        },
        "came_due": {
            "messages": delivered,
            "domains": due_domains,
            "deferred": tail.failures,
            "deferred_reasons": tail.reasons,
            "seconds": (due_secs * 100.0).round() / 100.0,
            "msgs_per_s": rate.round(),
            "completed": ok,
        },
        "live": live,
    });
    let path = work.join("scale.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    println!("written: {}", path.display());
}
