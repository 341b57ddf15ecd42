//! The feedback loop's benchmark (issue 11), against the `drover serve` binary on loopback:
//!
//! 1. inbound reports: DSN and ARF fixtures (`crates/reports/tests/fixtures`) sent over SMTP to
//!    the bounce domain by 8 clients, every one parsed, matched (unmatched here: the ids are
//!    the fixtures') and recorded; the baseline is the same number of ordinary messages of the
//!    same sizes injected over SMTP by the same clients into the same engine (queued for a
//!    suspended domain): reports/s, messages/s and their ratio.
//! 2. injection against the suppression list: 100 000 recipients injected over HTTP (batches
//!    of 1 000, four clients, a suspended domain so nothing is delivered) into an engine with an
//!    empty list, then into one holding 1 000 000 suppressed addresses of the same tenant (none
//!    of the injected ones; loaded through the admin API, then 15 s for RocksDB to flush and
//!    compact them): msgs/s of both and the ratio.
//!
//! `cargo bench -p drover --bench feedback`; `DROVER_BENCH_QUICK=1` (10 000 reports, 20 000
//! recipients, 200 000 suppressed), `DROVER_BENCH_BINARY=PATH`. Writes `target/bench/feedback.json`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "support/net.rs"]
mod net;
// Shared with the relay bench, which uses all of it.
#[allow(dead_code)]
#[path = "relay/proc.rs"]
mod proc;

use connection_pool::{ConnectOptions, Envelope, SmtpClient, TlsFailureMemory, TlsMode};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Engine {
    child: Child,
    http: u16,
    smtp: u16,
    _dir: tempfile::TempDir,
}

impl Engine {
    fn start(drover: &Path, work: &Path) -> Engine {
        let dir = tempfile::Builder::new()
            .prefix("feedback-")
            .tempdir_in(work)
            .unwrap();
        let (http, smtp) = (net::free_port(), net::free_port());
        let config = format!(
            "[spool]\npath = \"{spool}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n\
             [smtp_listener]\nlisten = \"127.0.0.1:{smtp}\"\n\
             [accounting]\npath = \"{acc}\"\n\
             [[route]]\ndomain = \"held.test\"\nhosts = [\"127.0.0.1:9\"]\n\
             [bounce_processing]\ndomains = [\"bounces.example.net\"]\nverp = true\n\
             max_reports_per_minute = 0\n",
            spool = dir.path().join("spool").display(),
            acc = dir.path().join("accounting.jsonl").display(),
        );
        let path = dir.path().join("drover.toml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(drover)
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(net::wait_for_port(http, Duration::from_secs(30)));
        assert!(net::wait_for_port(smtp, Duration::from_secs(30)));
        let e = Engine {
            child,
            http,
            smtp,
            _dir: dir,
        };
        e.post("/api/admin/v1/suspend", &json!({"domain": "held.test"}));
        e
    }

    fn post(&self, path: &str, body: &serde_json::Value) -> serde_json::Value {
        post(self.http, path, body)
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// POSTs JSON to the engine's HTTP API and returns the JSON reply.
fn post(port: u16, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let out = net::http_post(port, path, body);
    let json = out.split("\r\n\r\n").nth(1).unwrap_or("{}");
    // Chunked or not, the JSON object is the part between the outer braces.
    let start = json.find('{').unwrap_or(0);
    let end = json.rfind('}').map_or(json.len(), |e| e + 1);
    serde_json::from_str(&json[start..end]).unwrap_or(serde_json::Value::Null)
}

/// Sends `jobs` (recipient, message) over SMTP from `clients` concurrent sessions; returns
/// the elapsed seconds and how many got a 250.
fn smtp_load(port: u16, jobs: Vec<(String, Vec<u8>)>, clients: usize) -> (f64, usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs));
        let start = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let jobs = std::sync::Arc::clone(&jobs);
                tokio::spawn(async move {
                    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                    let mut client = SmtpClient::connect_with(ConnectOptions {
                        tls: TlsMode::Disabled,
                        tls_failures: TlsFailureMemory::default(),
                        ..ConnectOptions::new("localhost", addr, "bench.test")
                    })
                    .await
                    .unwrap();
                    let mut ok = 0;
                    loop {
                        let job = jobs.lock().unwrap().pop();
                        let Some((rcpt, data)) = job else { break };
                        let envelope = Envelope {
                            sender: String::new(),
                            recipients: vec![rcpt],
                            ..Default::default()
                        };
                        let tx = client.send(&envelope, &data).await.unwrap();
                        ok += usize::from(tx.data.is_some_and(|r| r.code == 250));
                    }
                    client.quit().await;
                    ok
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            ok += t.await.unwrap();
        }
        (start.elapsed().as_secs_f64(), ok)
    })
}

fn fixtures() -> Vec<Vec<u8>> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("../reports/tests/fixtures");
    [
        "postfix-dsn.eml",
        "gmail-dsn.eml",
        "exchange-online-dsn.eml",
        "yahoo-arf.eml",
        "microsoft-jmrp-arf.eml",
    ]
    .iter()
    .map(|f| {
        let text = std::fs::read(dir.join(f)).unwrap();
        let text = String::from_utf8_lossy(&text)
            .replace("\r\n", "\n")
            .replace('\n', "\r\n");
        text.into_bytes()
    })
    .collect()
}

fn inject_http(e: &Engine, n: usize, tenant: &str) -> f64 {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let next = std::sync::Arc::clone(&next);
            let (port, tenant) = (e.http, tenant.to_owned());
            std::thread::spawn(move || loop {
                let first = next.fetch_add(1000, std::sync::atomic::Ordering::SeqCst);
                if first >= n {
                    return;
                }
                let recipients: Vec<_> = (first..(first + 1000).min(n))
                    .map(|i| json!({"email": format!("r{i}@held.test")}))
                    .collect();
                let body = json!({
                    "envelope_sender": "news@sender.example.com",
                    "content": "From: news@sender.example.com\r\nSubject: s\r\n\r\nbody\r\n",
                    "recipients": recipients,
                    "tenant": tenant,
                });
                let probe = post(port, "/api/inject/v1", &body);
                assert!(probe["success_count"].as_u64().is_some(), "{probe}");
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    start.elapsed().as_secs_f64()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("feedback: run with `cargo bench -p drover --bench feedback`; skipped");
        return;
    }
    let quick = std::env::var("DROVER_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
    let (reports_n, inject_n, suppressed_n) = if quick {
        (10_000usize, 20_000usize, 200_000usize)
    } else {
        (50_000, 100_000, 1_000_000)
    };
    let drover = net::drover_binary(env!("CARGO_BIN_EXE_drover"));
    let work = net::bench_dir(env!("CARGO_MANIFEST_DIR"));

    // 1. Inbound reports vs ordinary SMTP injection of the same bytes.
    let fixtures = fixtures();
    let e = Engine::start(&drover, &work);
    let report_jobs: Vec<_> = (0..reports_n)
        .map(|i| {
            (
                "fbl@bounces.example.net".to_owned(),
                fixtures[i % fixtures.len()].clone(),
            )
        })
        .collect();
    let inject_jobs: Vec<_> = (0..reports_n)
        .map(|i| {
            (
                format!("r{i}@held.test"),
                fixtures[i % fixtures.len()].clone(),
            )
        })
        .collect();
    let (inject_secs, injected) = smtp_load(e.smtp, inject_jobs, 8);
    let (report_secs, reported) = smtp_load(e.smtp, report_jobs, 8);
    assert_eq!((injected, reported), (reports_n, reports_n));
    e.stop();
    let reports_per_s = reports_n as f64 / report_secs;
    let smtp_per_s = reports_n as f64 / inject_secs;
    eprintln!(
        "inbound: {reports_per_s:.0} reports/s parsed and recorded; baseline SMTP injection of the same messages {smtp_per_s:.0} msgs/s; ratio {:.2}",
        reports_per_s / smtp_per_s
    );

    // 2. Injection with an empty suppression list, then with a large one: wall time and the
    // engine's CPU seconds per 1 000 messages (this machine's speed drifts; CPU drifts less).
    let timed = |e: &Engine| {
        let cpu = proc::cpu_seconds(e.child.id()).unwrap_or(0.0);
        let secs = inject_http(e, inject_n, "acme");
        let cpu = proc::cpu_seconds(e.child.id()).unwrap_or(0.0) - cpu;
        (inject_n as f64 / secs, cpu * 1000.0 / inject_n as f64)
    };
    let e = Engine::start(&drover, &work);
    let (empty_rate, empty_cpu) = timed(&e);
    e.stop();
    let e = Engine::start(&drover, &work);
    let fill = Instant::now();
    for chunk in 0..suppressed_n.div_ceil(10_000) {
        let entries: Vec<_> = (chunk * 10_000..((chunk + 1) * 10_000).min(suppressed_n))
            .map(|i| json!({"tenant": "acme", "address": format!("gone{i}@held.test")}))
            .collect();
        let reply = e.post("/api/admin/v1/suppressions", &json!({"entries": entries}));
        assert!(reply["added"].as_u64().is_some(), "{reply}");
    }
    let fill_secs = fill.elapsed().as_secs_f64();
    // A list that size is loaded long before a send, not during it: let RocksDB finish
    // flushing and compacting what was just written before timing the injection.
    std::thread::sleep(Duration::from_secs(15));
    let (full_rate, full_cpu) = timed(&e);
    e.stop();
    eprintln!(
        "suppression: {suppressed_n} entries added in {fill_secs:.1} s; injection {empty_rate:.0} msgs/s ({empty_cpu:.3} CPU s per 1 000) with an empty list, {full_rate:.0} msgs/s ({full_cpu:.3} CPU s per 1 000) with {suppressed_n} suppressed (ratios {:.2} / {:.2})",
        full_rate / empty_rate,
        full_cpu / empty_cpu
    );
    let out = json!({
        "bench": "feedback",
        "mode": if quick { "quick" } else { "full" },
        "inbound": {"reports": reports_n, "reports_per_s": reports_per_s.round(), "baseline_smtp_msgs_per_s": smtp_per_s.round(), "ratio": (reports_per_s / smtp_per_s * 100.0).round() / 100.0},
        "suppression": {"entries": suppressed_n, "fill_seconds": (fill_secs * 10.0).round() / 10.0, "injected": inject_n, "empty_msgs_per_s": empty_rate.round(), "full_msgs_per_s": full_rate.round(), "ratio": (full_rate / empty_rate * 100.0).round() / 100.0, "empty_cpu_s_per_1000": (empty_cpu * 1000.0).round() / 1000.0, "full_cpu_s_per_1000": (full_cpu * 1000.0).round() / 1000.0},
    });
    std::fs::write(
        work.join("feedback.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
