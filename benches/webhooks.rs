//! Records out by webhook (issue 12), the engine end to end.
//!
//! Delivery: 20 000 messages for one destination are injected over HTTP while it is
//! suspended, then it is resumed and the time to the last `Delivery` record (at a `drover
//! sink`) gives the delivery rate — with no webhook (the baseline); with two webhooks sending
//! to a live local receiver meanwhile (the receiver runs in this process, on the same two
//! cores); with the two webhooks' endpoint refusing (503); and with one live webhook and one
//! hung (accepts connections, never answers). Runs alternate (three rounds, medians); the
//! ratios to the baseline are the figures: a webhook must not slow delivery.
//!
//! Webhook throughput: in the refusing runs the receiver accepts once delivery is done; the
//! time the senders take to drain their backlog gives records/s, shown next to the rate at
//! which the engine wrote those records (how much faster the webhooks drain than the engine
//! fills the log).
//!
//! `cargo bench -p drover --bench webhooks` (`DROVER_BENCH_QUICK=1`: 5 000 messages, one
//! round; `DROVER_BENCH_BINARY=PATH`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "support/net.rs"]
mod net;

use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Follows the accounting file, reading only what was added since the last look: polling a
/// whole file every few milliseconds would take the CPU the engine is being measured on.
struct LogCounter {
    path: std::path::PathBuf,
    offset: u64,
    lines: u64,
    deliveries: u64,
    partial: Vec<u8>,
}

impl LogCounter {
    fn new(path: &Path) -> LogCounter {
        LogCounter {
            path: path.to_owned(),
            offset: 0,
            lines: 0,
            deliveries: 0,
            partial: Vec::new(),
        }
    }

    fn update(&mut self) {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut new = Vec::new();
        let Ok(n) = file.read_to_end(&mut new) else {
            return;
        };
        self.offset += n as u64;
        self.partial.extend_from_slice(&new);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        self.lines += memchr::memchr_iter(b'\n', &complete).count() as u64;
        self.deliveries +=
            memchr::memmem::find_iter(&complete, b"\"type\":\"Delivery\"").count() as u64;
    }
}

/// A local webhook endpoint: counts the records of the batches it accepts.
struct Receiver {
    port: u16,
    accept: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
}

fn start_receiver(runtime: &tokio::runtime::Runtime) -> Receiver {
    let accept = Arc::new(AtomicBool::new(true));
    let received = Arc::new(AtomicU64::new(0));
    let (a, r) = (Arc::clone(&accept), Arc::clone(&received));
    let app = axum::Router::new().route(
        "/events",
        axum::routing::post(move |body: axum::body::Bytes| {
            let (a, r) = (Arc::clone(&a), Arc::clone(&r));
            async move {
                if !a.load(Ordering::SeqCst) {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                let records = memchr::memmem::find_iter(&body, b"{\"type\":").count();
                r.fetch_add(records as u64, Ordering::SeqCst);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(async move { axum::serve(listener, app).await });
    Receiver {
        port,
        accept,
        received,
    }
}

/// Accepts connections and never answers.
fn start_hung() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    port
}

#[derive(Clone, Copy, PartialEq)]
enum Hooks {
    None,
    /// Two webhooks taking the records while the engine delivers.
    TwoLive,
    /// Two webhooks whose endpoint refuses (503) until delivery is done.
    TwoDown,
    /// One live webhook and one whose endpoint never answers.
    LiveAndHung,
}

struct Run {
    delivery_rate: f64,
    /// Records/s the engine wrote during delivery, and records/s the webhook drained.
    fill_rate: f64,
    drain_rate: f64,
}

fn run(
    drover: &Path,
    work: &Path,
    sink_port: u16,
    n: usize,
    hooks: Hooks,
    receiver: &Receiver,
    hung: u16,
) -> Run {
    let dir = tempfile::Builder::new()
        .prefix("webhooks-")
        .tempdir_in(work)
        .unwrap();
    let http = net::free_port();
    let accounting = dir.path().join("accounting.jsonl");
    let live = format!("http://127.0.0.1:{}/events", receiver.port);
    let webhooks = match hooks {
        Hooks::None => String::new(),
        Hooks::TwoLive | Hooks::TwoDown => format!(
            "[[webhook]]\nname = \"a\"\nurl = \"{live}\"\nmax_backoff = \"1s\"\n[[webhook]]\nname = \"b\"\nurl = \"{live}\"\ntypes = [\"Delivery\"]\nmax_backoff = \"1s\"\n"
        ),
        Hooks::LiveAndHung => format!(
            "[[webhook]]\nname = \"a\"\nurl = \"{live}\"\n[[webhook]]\nname = \"hung\"\nurl = \"http://127.0.0.1:{hung}/events\"\ntimeout = \"30s\"\n"
        ),
    };
    let config = format!(
        "[spool]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[smtp_listener]\nlisten = \"127.0.0.1:0\"\n\
         [accounting]\npath = \"{}\"\n[[route]]\ndomain = \"gmail.test\"\nhosts = [\"127.0.0.1:{sink_port}\"]\n\
         [[shaping]]\nmatch = \"gmail.test\"\nmax_connections = 8\n{webhooks}",
        dir.path().join("spool").display(),
        accounting.display()
    );
    let path = dir.path().join("drover.toml");
    std::fs::write(&path, config).unwrap();
    receiver.received.store(0, Ordering::SeqCst);
    // With TwoDown the receiver refuses while the engine delivers: the backlog is drained
    // after.
    receiver
        .accept
        .store(hooks != Hooks::TwoDown, Ordering::SeqCst);
    let mut child = net::spawn_serve(drover, &path, http);
    net::http_post(
        http,
        "/api/admin/v1/suspend",
        &json!({"domain": "gmail.test"}),
    );
    for first in (0..n).step_by(1000) {
        let body = json!({
            "envelope_sender": "news@sender.example.com",
            "content": "From: news@sender.example.com\r\nSubject: s\r\n\r\nbody\r\n",
            "recipients": (first..(first + 1000).min(n)).map(|i| json!({"email": format!("r{i}@gmail.test")})).collect::<Vec<_>>(),
        });
        let reply = net::http_post(http, "/api/inject/v1", &body);
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut log = LogCounter::new(&accounting);
    log.update();
    let before = log.lines;
    let start = Instant::now();
    net::http_post(
        http,
        "/api/admin/v1/resume",
        &json!({"domain": "gmail.test"}),
    );
    assert!(net::wait_until(Duration::from_secs(600), || {
        log.update();
        log.deliveries >= n as u64
    }));
    let delivery_secs = start.elapsed().as_secs_f64();
    let delivery_rate = n as f64 / delivery_secs;
    let total = log.lines;
    let fill_rate = (total - before) as f64 / delivery_secs;
    let mut drain_rate = 0.0;
    if hooks == Hooks::TwoDown {
        // Webhook "a" takes every record, "b" only the deliveries.
        let want = total + n as u64;
        let drain = Instant::now();
        receiver.accept.store(true, Ordering::SeqCst);
        assert!(
            net::wait_until(Duration::from_secs(600), || receiver
                .received
                .load(Ordering::SeqCst)
                >= want),
            "the webhooks never caught up"
        );
        drain_rate = want as f64 / drain.elapsed().as_secs_f64();
    }
    net::terminate(&mut child);
    Run {
        delivery_rate,
        fill_rate,
        drain_rate,
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("webhooks: run with `cargo bench -p drover --bench webhooks`; skipped");
        return;
    }
    let quick = std::env::var("DROVER_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
    let (n, rounds) = if quick { (5_000, 1) } else { (20_000, 3) };
    let drover = net::drover_binary(env!("CARGO_BIN_EXE_drover"));
    let work = net::bench_dir(env!("CARGO_MANIFEST_DIR"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let receiver = start_receiver(&runtime);
    let hung = start_hung();
    let (mut sink, sink_port) = net::spawn_sink(&drover);
    let (mut none, mut two, mut down, mut with_hung) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut fill, mut drain) = (Vec::new(), Vec::new());
    // `DROVER_BENCH_PROFILE=1`: only the two-live-webhooks runs, for a profiler to attach to.
    if std::env::var("DROVER_BENCH_PROFILE").is_ok_and(|v| v == "1") {
        for _ in 0..rounds {
            let r = run(
                &drover,
                &work,
                sink_port,
                n,
                Hooks::TwoLive,
                &receiver,
                hung,
            );
            println!("two live webhooks: {:.0} msgs/s", r.delivery_rate);
        }
        let _ = sink.kill();
        let _ = sink.wait();
        return;
    }
    for _ in 0..rounds {
        let go = |hooks| run(&drover, &work, sink_port, n, hooks, &receiver, hung);
        none.push(go(Hooks::None).delivery_rate);
        two.push(go(Hooks::TwoLive).delivery_rate);
        let r = go(Hooks::TwoDown);
        down.push(r.delivery_rate);
        fill.push(r.fill_rate);
        drain.push(r.drain_rate);
        with_hung.push(go(Hooks::LiveAndHung).delivery_rate);
    }
    let _ = sink.kill();
    let _ = sink.wait();
    let (none, two, down, with_hung) = (
        net::median(none),
        net::median(two),
        net::median(down),
        net::median(with_hung),
    );
    let (fill, drain) = (net::median(fill), net::median(drain));
    println!(
        "webhooks, delivery: {none:.0} msgs/s without webhooks; with 2 webhooks sending meanwhile {two:.0} (ratio {:.2}), with their endpoint down {down:.0} (ratio {:.2}), with one live and one hung {with_hung:.0} (ratio {:.2}); {n} messages, medians of {rounds}",
        two / none,
        down / none,
        with_hung / none
    );
    println!(
        "webhooks, records out: a backlog drained at {drain:.0} records/s over 2 webhooks to a local receiver, {:.1} x the {fill:.0} records/s the engine wrote while delivering",
        drain / fill
    );
}
