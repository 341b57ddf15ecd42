//! The relay benchmark (issue 7): Drover against the wire's limit and against Postfix, in one run.
//!
//! `cargo bench -p drover --bench relay` (see README.md, "Benchmarks"). On loopback only:
//!
//! 1. Postfix's `smtp-sink` is started once; `smtp-source -d -s 20` into it, per message size,
//!    gives the baseline (messages/s): what the C tools reach on this machine.
//! 2. `drover serve` (the release binary, a fresh durable spool, default sync) routes the bench
//!    domain to the same sink; messages are injected through `POST /api/inject/v1` by concurrent
//!    HTTP clients, in batches of 100 personalised recipients and one recipient per request.
//!    The rate runs from the first request to the last `Delivery` record in the accounting file.
//! 3. A loopback-only Postfix instance (its own config and queue directories, `relayhost` to the
//!    sink) relays `smtp-source` load, when `postfix` is installed (`DROVER_BENCH_POSTFIX=0`
//!    skips it).
//! 4. A table on stdout; every figure as JSON in `target/bench/relay.json`.
//!
//! Environment: `DROVER_BENCH_QUICK=1` (one short run per case), `DROVER_BENCH_SIZES=2048,20480`,
//! `DROVER_BENCH_RUNS=3`, `DROVER_BENCH_SECS=12` (target length of a run),
//! `DROVER_BENCH_POSTFIX=0`, `DROVER_BENCH_VARIANTS=batch,single`, `DROVER_BENCH_BINARY=PATH` (a
//! `drover` binary to measure instead of this build's, e.g. an older one for a before/after).
//! Benchmarks report numbers; they never assert timing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "../support/net.rs"]
mod net;
mod postfix;
mod proc;

use net::{free_port, wait_for_port, wait_until};

use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const DOMAIN: &str = "bench.test";
const SENDER: &str = "bounces@sender.example.com";

/// The settings of this run.
#[derive(Debug, Clone)]
struct Settings {
    quick: bool,
    sizes: Vec<usize>,
    runs: usize,
    target_secs: f64,
    postfix: bool,
    variants: Vec<Variant>,
    work: PathBuf,
    drover: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// 100 personalised recipients per request.
    Batch,
    /// One recipient per request.
    Single,
    /// `smtp-source -d -s 20` into Drover's SMTP listener.
    Smtp,
    /// Delivery alone: inject in batches of 100 with the domain suspended, then resume and
    /// time from the resume to the last `Delivery` (a queue of already-spooled messages).
    Spooled,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Batch => "drover-http-batch100",
            Variant::Single => "drover-http-single",
            Variant::Smtp => "drover-smtp",
            Variant::Spooled => "drover-spooled",
        }
    }
    fn per_request(self) -> usize {
        match self {
            Variant::Batch | Variant::Spooled => 100,
            Variant::Single | Variant::Smtp => 1,
        }
    }
    /// Concurrent HTTP clients: enough requests in flight to fill group commits.
    fn clients(self) -> usize {
        match self {
            Variant::Batch | Variant::Spooled => env_usize("DROVER_BENCH_BATCH_CLIENTS", 8),
            Variant::Single => env_usize("DROVER_BENCH_SINGLE_CLIENTS", 64),
            Variant::Smtp => 20,
        }
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn settings() -> Settings {
    let quick = std::env::var("DROVER_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
    let sizes = std::env::var("DROVER_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![2048, 20 * 1024, 100 * 1024]);
    let variants = std::env::var("DROVER_BENCH_VARIANTS")
        .ok()
        .map(|s| {
            s.split(',')
                .filter_map(|x| match x.trim() {
                    "batch" => Some(Variant::Batch),
                    "single" => Some(Variant::Single),
                    "smtp" => Some(Variant::Smtp),
                    "spooled" => Some(Variant::Spooled),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_else(|| {
            vec![
                Variant::Batch,
                Variant::Single,
                Variant::Smtp,
                Variant::Spooled,
            ]
        });
    let target_dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    Settings {
        quick,
        sizes,
        runs: env_usize("DROVER_BENCH_RUNS", if quick { 1 } else { 3 }),
        target_secs: std::env::var("DROVER_BENCH_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 3.0 } else { 12.0 }),
        postfix: std::env::var("DROVER_BENCH_POSTFIX").map_or(true, |v| v != "0"),
        variants,
        work: target_dir.join("bench"),
        drover: std::env::var_os("DROVER_BENCH_BINARY").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_drover")),
            PathBuf::from,
        ),
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}

/// Postfix's `smtp-sink`, with its running message counter (`-c`) read from stdout.
struct Sink {
    child: Child,
    port: u16,
    messages: Arc<AtomicU64>,
}

impl Sink {
    fn start() -> Sink {
        let port = free_port();
        let mut child = Command::new(
            which("smtp-sink")
                .expect("smtp-sink (Debian's postfix package; run scripts/install-deps.sh)"),
        )
        .args(["-u", "nobody", "-c", &format!("127.0.0.1:{port}"), "1024"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start smtp-sink");
        let messages = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&messages);
        let mut out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            // Lines look like "sess=N quit=N mesg=N\r"; keep the latest mesg value.
            let mut buf = [0u8; 8192];
            let mut tail = Vec::new();
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if let Some(end) = tail.iter().rposition(|b| *b == b'\r' || *b == b'\n') {
                    let text = String::from_utf8_lossy(&tail[..end]).into_owned();
                    if let Some(v) = text
                        .rsplit("mesg=")
                        .next()
                        .and_then(|s| s.split_whitespace().next())
                        .and_then(|s| s.parse().ok())
                    {
                        counter.store(v, Ordering::Relaxed);
                    }
                    tail.drain(..=end);
                }
            }
        });
        assert!(
            wait_for_port(port, Duration::from_secs(5)),
            "smtp-sink did not listen"
        );
        Sink {
            child,
            port,
            messages,
        }
    }

    fn count(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    fn cpu(&self) -> f64 {
        proc::cpu_seconds(self.child.id()).unwrap_or(0.0)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One measured run.
#[derive(Debug, Clone, Default)]
struct Run {
    messages: u64,
    seconds: f64,
    rate: f64,
    inject_seconds: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    cpu_per_1000: f64,
    peak_rss_mb: f64,
    sink_cpu_share: f64,
    client_cpu_share: f64,
}

impl Run {
    fn json(&self) -> Value {
        json!({
            "messages": self.messages,
            "seconds": round(self.seconds, 3),
            "msgs_per_s": round(self.rate, 1),
            "inject_seconds": round(self.inject_seconds, 3),
            "latency_p50_ms": round(self.latency_p50_ms, 2),
            "latency_p99_ms": round(self.latency_p99_ms, 2),
            "cpu_s_per_1000": round(self.cpu_per_1000, 4),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "sink_cpu_share": round(self.sink_cpu_share, 3),
            "client_cpu_share": round(self.client_cpu_share, 3),
        })
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let m = values.len() / 2;
    if values.len() % 2 == 1 {
        values[m]
    } else {
        (values[m - 1] + values[m]) / 2.0
    }
}

/// Per-field medians of several runs.
fn median_run(runs: &[Run]) -> Run {
    let m = |f: fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    Run {
        messages: m(|r| r.messages as f64) as u64,
        seconds: m(|r| r.seconds),
        rate: m(|r| r.rate),
        inject_seconds: m(|r| r.inject_seconds),
        latency_p50_ms: m(|r| r.latency_p50_ms),
        latency_p99_ms: m(|r| r.latency_p99_ms),
        cpu_per_1000: m(|r| r.cpu_per_1000),
        peak_rss_mb: m(|r| r.peak_rss_mb),
        sink_cpu_share: m(|r| r.sink_cpu_share),
        client_cpu_share: m(|r| r.client_cpu_share),
    }
}

fn n_for(rate: f64, secs: f64, per_request: usize) -> u64 {
    let n = (rate * secs).max(200.0) as u64;
    // Whole requests.
    n.div_ceil(per_request as u64) * per_request as u64
}

/// `smtp-source -d -s 20 -m n -l size` (connection reuse, 20 sessions) into `port`.
fn smtp_source(port: u16, size: usize, n: u64) -> Result<(), String> {
    let status = Command::new(which("smtp-source").ok_or("smtp-source is not installed")?)
        .args([
            "-d",
            "-s",
            "20",
            "-m",
            &n.to_string(),
            "-l",
            &size.to_string(),
            "-f",
            SENDER,
            "-t",
            &format!("rcpt@{DOMAIN}"),
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run smtp-source: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("smtp-source into port {port} failed: {status}"))
    }
}

/// `smtp-source` into the sink: the baseline.
fn baseline(sink: &Sink, size: usize, n: u64) -> Run {
    let before = sink.count();
    let sink_cpu = sink.cpu();
    let start = Instant::now();
    smtp_source(sink.port, size, n).expect("baseline run");
    let seconds = start.elapsed().as_secs_f64();
    wait_until(Duration::from_secs(10), || sink.count() >= before + n);
    Run {
        messages: n,
        seconds,
        rate: n as f64 / seconds,
        sink_cpu_share: (sink.cpu() - sink_cpu) / seconds,
        ..Run::default()
    }
}

/// A message template of about `size` bytes: headers with substitutions, a body of 76-column
/// lines (some starting with a dot, to exercise stuffing) greeting the recipient by name.
fn template(size: usize) -> String {
    let mut t = String::with_capacity(size + 256);
    t.push_str("From: Bench <news@sender.example.com>\r\nTo: {{ name }} <{{ email }}>\r\n");
    t.push_str("Subject: Hello {{ name }}, your {{ plan }} newsletter\r\n");
    t.push_str("List-Unsubscribe: <mailto:unsub@sender.example.com>\r\nMIME-Version: 1.0\r\n");
    t.push_str("Content-Type: text/plain; charset=utf-8\r\n\r\nHi {{ name }},\r\n");
    let line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempo";
    let mut i = 0;
    while t.len() + 80 < size {
        if i % 40 == 39 {
            t.push('.');
        }
        t.push_str(line);
        t.push_str("\r\n");
        i += 1;
    }
    t.push_str("Bye {{ name }}\r\n");
    t
}

/// Pre-serialised request pieces: `head` + recipients + `tail`; building a request is memcpy.
struct Bodies {
    head: Vec<u8>,
    tail: &'static [u8],
}

impl Bodies {
    fn new(size: usize) -> Bodies {
        let head = format!(
            "{{\"envelope_sender\":{},\"campaign\":\"bench\",\"substitutions\":{{\"plan\":\"gold\"}},\"content\":{},\"recipients\":[",
            serde_json::to_string(SENDER).unwrap(),
            serde_json::to_string(&template(size)).unwrap()
        );
        Bodies {
            head: head.into_bytes(),
            tail: b"]}",
        }
    }

    fn request(&self, first: u64, count: usize) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.head.len() + count * 64 + 2);
        body.extend_from_slice(&self.head);
        for i in 0..count as u64 {
            if i > 0 {
                body.push(b',');
            }
            let n = first + i;
            body.extend_from_slice(
                format!("{{\"email\":\"user{n}@{DOMAIN}\",\"name\":\"User {n}\"}}").as_bytes(),
            );
        }
        body.extend_from_slice(self.tail);
        body
    }
}

/// Counts `Delivery` records appended to the accounting file, reading only what is new.
struct AccountingTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    deliveries: u64,
    other_finals: u64,
    last_delivery: Option<String>,
}

impl AccountingTail {
    fn new(path: PathBuf) -> AccountingTail {
        AccountingTail {
            path,
            offset: 0,
            partial: Vec::new(),
            deliveries: 0,
            other_finals: 0,
            last_delivery: None,
        }
    }

    fn poll(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        let Ok(n) = f.read_to_end(&mut buf) else {
            return;
        };
        self.offset += n as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        for line in self.partial[..end].split(|b| *b == b'\n') {
            if line.starts_with(br#"{"type":"Delivery""#) {
                self.deliveries += 1;
                self.last_delivery = Some(String::from_utf8_lossy(line).into_owned());
            } else if line.starts_with(br#"{"type":"Bounce""#)
                || line.starts_with(br#"{"type":"TransientFailure""#)
                || line.starts_with(br#"{"type":"Expiration""#)
            {
                self.other_finals += 1;
            }
        }
        self.partial.drain(..=end);
    }

    /// The timestamp of the last `Delivery` record.
    fn last_delivery_time(&self) -> Option<SystemTime> {
        let line: Value = serde_json::from_str(self.last_delivery.as_deref()?).ok()?;
        let ts = time::OffsetDateTime::parse(
            line["timestamp"].as_str()?,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        let nanos = u64::try_from(ts.unix_timestamp_nanos()).ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos))
    }
}

/// A `drover serve` process on a fresh spool.
struct Drover {
    child: Child,
    port: u16,
    smtp_port: u16,
    dir: tempfile::TempDir,
}

impl Drover {
    fn start(s: &Settings, sink_port: u16) -> Drover {
        std::fs::create_dir_all(&s.work).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("relay-drover-")
            .tempdir_in(&s.work)
            .unwrap();
        let port = free_port();
        let smtp_port = free_port();
        let config = format!(
            r#"
[spool]
path = "{spool}"
[http]
listen = "127.0.0.1:{port}"
[smtp_listener]
listen = "127.0.0.1:{smtp_port}"
[delivery]
ehlo_name = "drover.bench.test"
[[route]]
domain = "{DOMAIN}"
hosts = ["127.0.0.1:{sink_port}"]
[[shaping]]
match = "{DOMAIN}"
max_connections = 32
max_deliveries_per_connection = 1000
"#,
            spool = dir.path().join("spool").display()
        );
        let config_path = dir.path().join("drover.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("drover.log")).unwrap();
        let child = Command::new(&s.drover)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start drover serve");
        assert!(
            wait_for_port(port, Duration::from_secs(20)),
            "drover serve did not listen; see {}",
            dir.path().join("drover.log").display()
        );
        Drover {
            child,
            port,
            smtp_port,
            dir,
        }
    }

    fn accounting(&self) -> PathBuf {
        self.dir.path().join("spool").join("accounting.jsonl")
    }

    /// SIGTERM, then wait (up to 30 s) for the graceful exit.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let exited = wait_until(Duration::from_secs(30), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Injects `n` messages through the HTTP API and waits for their `Delivery` records.
fn drover_run(
    s: &Settings,
    rt: &tokio::runtime::Runtime,
    sink: &Sink,
    size: usize,
    n: u64,
    variant: Variant,
) -> Run {
    let drover = Drover::start(s, sink.port);
    let pid = drover.child.id();
    let url = format!("http://127.0.0.1:{}/api/inject/v1", drover.port);
    let admin = |action: &str| {
        let url = format!("http://127.0.0.1:{}/api/admin/v1/{action}", drover.port);
        rt.block_on(async {
            let resp = reqwest::Client::new()
                .post(&url)
                .json(&json!({ "domain": DOMAIN }))
                .send()
                .await
                .expect("admin request failed");
            assert!(resp.status().is_success(), "{action}: {}", resp.status());
        });
    };
    if variant == Variant::Spooled {
        admin("suspend");
    }
    let bodies = Arc::new(Bodies::new(size));
    let per = variant.per_request();
    let requests = n.div_ceil(per as u64) as usize;
    let cpu_before = proc::cpu_seconds(pid).unwrap_or(0.0);
    let sink_before = sink.cpu();
    let self_before = proc::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let wall_start = SystemTime::now();
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(variant.clients())
        .build()
        .unwrap();
    let latencies: Vec<Duration> = if variant == Variant::Smtp {
        // smtp-source reports no per-message latency; the whole run is timed below.
        smtp_source(drover.smtp_port, size, n).expect("SMTP-fed run");
        Vec::new()
    } else {
        rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..variant.clients() {
                let (client, url, bodies, next) = (
                    client.clone(),
                    url.clone(),
                    Arc::clone(&bodies),
                    Arc::clone(&next),
                );
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= requests {
                            break;
                        }
                        let body = bodies.request((i * per) as u64, per);
                        let sent = Instant::now();
                        let resp = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await
                            .expect("inject request failed");
                        let status = resp.status();
                        let text = resp.bytes().await.unwrap_or_default();
                        assert!(
                            status.is_success(),
                            "inject answered {status}: {}",
                            String::from_utf8_lossy(&text)
                        );
                        lat.push(sent.elapsed());
                    }
                    lat
                }));
            }
            let mut all = Vec::with_capacity(requests);
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        })
    };
    let inject_seconds = start.elapsed().as_secs_f64();
    let self_cpu = proc::cpu_seconds(std::process::id()).unwrap_or(0.0) - self_before;
    // For the spooled variant the clock (and the CPU account) starts at the resume.
    let (wall_start, cpu_before) = if variant == Variant::Spooled {
        let marks = (SystemTime::now(), proc::cpu_seconds(pid).unwrap_or(0.0));
        admin("resume");
        marks
    } else {
        (wall_start, cpu_before)
    };
    let mut tail = AccountingTail::new(drover.accounting());
    let limit = Duration::from_secs(600);
    let done = wait_until(limit, || {
        tail.poll();
        tail.deliveries + tail.other_finals >= n
    });
    let observed = start.elapsed().as_secs_f64();
    assert!(done, "not every message was delivered within {limit:?}");
    assert_eq!(
        tail.other_finals,
        0,
        "some messages were not delivered at the first attempt; see {}",
        drover.accounting().display()
    );
    // The last Delivery record's own timestamp; the poll time if it cannot be read.
    let seconds = tail
        .last_delivery_time()
        .and_then(|t| t.duration_since(wall_start).ok())
        .map_or(observed, |d| d.as_secs_f64());
    let cpu = proc::cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
    let sink_cpu = sink.cpu() - sink_before;
    let peak_rss_mb = proc::peak_rss_kb(pid).unwrap_or(0) as f64 / 1024.0;
    drover.stop();
    let mut lat = latencies;
    lat.sort();
    Run {
        messages: n,
        seconds,
        rate: n as f64 / seconds,
        inject_seconds,
        latency_p50_ms: percentile(&lat, 0.5),
        latency_p99_ms: percentile(&lat, 0.99),
        cpu_per_1000: cpu / n as f64 * 1000.0,
        peak_rss_mb,
        sink_cpu_share: sink_cpu / seconds,
        client_cpu_share: self_cpu / seconds,
    }
}

/// The results of one system at one size.
struct Case {
    size: usize,
    system: &'static str,
    runs: Vec<Run>,
    median: Run,
}

fn main() {
    // `cargo test --benches` runs bench targets without `--bench`: nothing to check here.
    if !std::env::args().any(|a| a == "--bench") {
        println!("relay: run with `cargo bench -p drover --bench relay`; skipped");
        return;
    }
    let s = settings();
    std::fs::create_dir_all(&s.work).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let machine = proc::machine();
    eprintln!(
        "relay bench: {} ({} mode, {} run(s), ~{} s each); drover = {}",
        machine["cpu_model"].as_str().unwrap_or("?"),
        if s.quick { "quick" } else { "full" },
        s.runs,
        s.target_secs,
        s.drover.display()
    );
    let sink = Sink::start();
    let postfix = if s.postfix {
        match postfix::Postfix::start(&s.work, sink.port) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("postfix relay skipped: {e}");
                None
            }
        }
    } else {
        None
    };
    let mut cases = Vec::new();
    for &size in &s.sizes {
        // The first guess comes from the figures in /work/shared/test-peers.md (messages/s).
        let mut rate = match size {
            0..=4096 => 12_000.0,
            4097..=40960 => 4_300.0,
            _ => 1_250.0,
        };
        let mut runs = Vec::new();
        for r in 0..s.runs {
            let run = baseline(&sink, size, n_for(rate, s.target_secs, 1));
            eprintln!(
                "  {size:>6} B smtp-source -d   run {r}: {:>8.0} msgs/s",
                run.rate
            );
            rate = run.rate;
            runs.push(run);
        }
        let base = median_run(&runs);
        cases.push(Case {
            size,
            system: "smtp-source-d",
            median: base.clone(),
            runs,
        });
        for &variant in &s.variants {
            // Calibrate N with a short uncounted run (full mode), then aim at target_secs.
            let per = variant.per_request();
            let mut rate = base.rate * 0.25;
            if !s.quick {
                let cal = drover_run(&s, &rt, &sink, size, n_for(rate, 2.0, per), variant);
                rate = cal.rate;
            }
            let mut runs = Vec::new();
            for r in 0..s.runs {
                let run = drover_run(
                    &s,
                    &rt,
                    &sink,
                    size,
                    n_for(rate, s.target_secs, per),
                    variant,
                );
                eprintln!(
                    "  {size:>6} B {:<22} run {r}: {:>8.0} msgs/s ({} msgs, {:.1} s, p99 {:.1} ms)",
                    variant.name(),
                    run.rate,
                    run.messages,
                    run.seconds,
                    run.latency_p99_ms
                );
                runs.push(run);
            }
            cases.push(Case {
                size,
                system: variant.name(),
                median: median_run(&runs),
                runs,
            });
        }
        if let Some(pf) = &postfix {
            let mut rate = 375.0 * (2048.0 / size as f64).sqrt();
            let mut runs = Vec::new();
            for r in 0..s.runs {
                match pf.relay(&sink, size, n_for(rate, s.target_secs, 1)) {
                    Ok(run) => {
                        eprintln!(
                            "  {size:>6} B postfix-relay          run {r}: {:>8.0} msgs/s",
                            run.rate
                        );
                        rate = run.rate;
                        runs.push(run);
                    }
                    Err(e) => {
                        eprintln!("postfix relay run failed: {e}");
                        break;
                    }
                }
            }
            if !runs.is_empty() {
                cases.push(Case {
                    size,
                    system: "postfix-relay",
                    median: median_run(&runs),
                    runs,
                });
            }
        }
    }
    drop(postfix);
    drop(sink);
    report(&s, machine, &cases);
}

fn report(s: &Settings, machine: Value, cases: &[Case]) {
    let base_of = |size: usize| {
        cases
            .iter()
            .find(|c| c.size == size && c.system == "smtp-source-d")
            .map_or(0.0, |c| c.median.rate)
    };
    let pf_of = |size: usize| {
        cases
            .iter()
            .find(|c| c.size == size && c.system == "postfix-relay")
            .map(|c| c.median.rate)
    };
    println!();
    println!(
        "| size | system | msgs/s | ratio to smtp-source -d | × Postfix relay | inject p50 / p99 ms | CPU s / 1000 msgs | peak RSS MB | sink CPU |"
    );
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut json_cases = Vec::new();
    for c in cases {
        let m = &c.median;
        let ratio = m.rate / base_of(c.size);
        let vs_pf = pf_of(c.size).map(|p| m.rate / p);
        let is_drover = c.system.starts_with("drover");
        println!(
            "| {} KB | {} | {:.0} | {:.2} | {} | {} | {} | {} | {:.0} % |",
            c.size / 1024,
            c.system,
            m.rate,
            ratio,
            vs_pf.map_or("–".into(), |v| format!("{v:.1}")),
            // smtp-source feeds the SMTP variant: no per-request latencies to report.
            if is_drover && m.latency_p99_ms > 0.0 {
                format!("{:.1} / {:.1}", m.latency_p50_ms, m.latency_p99_ms)
            } else {
                "–".into()
            },
            if is_drover {
                format!("{:.3}", m.cpu_per_1000)
            } else {
                "–".into()
            },
            if is_drover {
                format!("{:.0}", m.peak_rss_mb)
            } else {
                "–".into()
            },
            m.sink_cpu_share * 100.0
        );
        json_cases.push(json!({
            "size_bytes": c.size,
            "system": c.system,
            "median": m.json(),
            "ratio_to_smtp_source": round(ratio, 3),
            "ratio_to_postfix_relay": vs_pf.map(|v| round(v, 2)),
            "runs": c.runs.iter().map(Run::json).collect::<Vec<_>>(),
        }));
    }
    let out = json!({
        "bench": "relay",
        "mode": if s.quick { "quick" } else { "full" },
        "runs_per_case": s.runs,
        "target_seconds_per_run": s.target_secs,
        "machine": machine,
        "drover_settings": {
            "spool_sync": true,
            "max_connections": 32,
            "max_deliveries_per_connection": 1000,
            "batch_clients": Variant::Batch.clients(),
            "single_clients": Variant::Single.clients(),
        },
        "cases": json_cases,
    });
    let path = s.work.join("relay.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("\nwritten: {}", path.display());
}
