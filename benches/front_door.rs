//! The front door (issue 13): how fast recipients are accepted.
//!
//! 1. HTTP: one `POST /api/inject/v1` of 10 000 recipients with per-recipient substitutions
//!    in a templated message, against the same request with a static message (the baseline:
//!    the cost of the request, the spool and the records without templating). The destination
//!    is suspended, so nothing else runs. Three alternating runs each, medians, ratio.
//!    The same templated request with `deferred_generation: true`: the time to its answer,
//!    and the rate from the request until every recipient is queued, as ratios to the
//!    immediate request.
//! 2. SMTP: single-recipient transactions, pipelined (MAIL, RCPT and DATA sent together, as a
//!    PIPELINING client does), over 8 connections into Drover's listener, against the same
//!    client into Postfix's `smtp-sink` (the baseline: what the client and loopback allow;
//!    `drover sink` when Postfix is not installed). Medians of three, ratio.
//!
//! `cargo bench -p drover --bench front_door` (`DROVER_BENCH_QUICK=1`: one run of each).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "support/net.rs"]
mod net;

use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RECIPIENTS: usize = 10_000;
const CONNECTIONS: usize = 8;

/// A `drover serve` with the bench destination suspended.
struct Engine {
    child: Child,
    http: u16,
    smtp: u16,
    _dir: tempfile::TempDir,
}

fn start_engine(drover: &Path, work: &Path) -> Engine {
    let dir = tempfile::Builder::new()
        .prefix("front-door-")
        .tempdir_in(work)
        .unwrap();
    let (http, smtp) = (net::free_port(), net::free_port());
    let config = format!(
        "[spool]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[smtp_listener]\nlisten = \"127.0.0.1:{smtp}\"\n\
         [[route]]\ndomain = \"bench.test\"\nhosts = [\"127.0.0.1:9\"]\n",
        dir.path().join("spool").display(),
    );
    let path = dir.path().join("drover.toml");
    std::fs::write(&path, config).unwrap();
    let child = net::spawn_serve(drover, &path, http);
    assert!(net::wait_for_port(smtp, Duration::from_secs(30)));
    let reply = net::http_post(
        http,
        "/api/admin/v1/suspend",
        &json!({"domain": "bench.test"}),
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    Engine {
        child,
        http,
        smtp,
        _dir: dir,
    }
}

/// One inject request of `RECIPIENTS`, templated or static.
fn request(templated: bool) -> serde_json::Value {
    let content = if templated {
        "From: News <news@sender.example.com>\r\nTo: {{ name }} <{{ email }}>\r\nSubject: {{ name }}, your {{ plan }} plan\r\n\r\nDear {{ name }},\r\n\r\nyour {{ plan }} plan renews on {{ renewal }}.\r\n{% for item in items %}- {{ item }}\r\n{% endfor %}\r\n"
    } else {
        "From: News <news@sender.example.com>\r\nTo: subscribers:;\r\nSubject: Your plan\r\n\r\nDear subscriber,\r\n\r\nyour plan renews soon.\r\n- one\r\n- two\r\n- three\r\n"
    };
    let recipients: Vec<_> = (0..RECIPIENTS)
        .map(|i| {
            json!({
                "email": format!("r{i}@bench.test"),
                "name": format!("Reader {i}"),
                "substitutions": {"plan": if i % 2 == 0 { "gold" } else { "silver" }, "renewal": format!("2027-01-{:02}", 1 + i % 28), "items": ["one", "two", "three"]},
            })
        })
        .collect();
    json!({
        "envelope_sender": "bounces@sender.example.com",
        "content": content,
        "recipients": recipients,
    })
}

/// Recipients accepted per second for one request of 10 000.
fn http_run(engine: &Engine, templated: bool) -> f64 {
    let body = request(templated);
    let start = Instant::now();
    let reply = net::http_post(engine.http, "/api/inject/v1", &body);
    let secs = start.elapsed().as_secs_f64();
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "{}",
        &reply[..reply.len().min(300)]
    );
    assert!(reply.contains(&format!("\"success_count\":{RECIPIENTS}")));
    RECIPIENTS as f64 / secs
}

/// The same templated request with `deferred_generation: true`: seconds to the answer, and
/// recipients per second from the request until the last one is queued. `None` from a
/// binary that expands the request before answering (an older build, `DROVER_BENCH_BINARY`).
fn deferred_run(engine: &Engine) -> Option<(f64, f64)> {
    const GENERATED: &str = "drover_deferred_generation_recipients_total";
    let before = net::metric(&net::http_get(engine.http, "/metrics"), GENERATED);
    let mut body = request(true);
    body["deferred_generation"] = json!(true);
    let start = Instant::now();
    let reply = net::http_post(engine.http, "/api/inject/v1", &body);
    let answered = start.elapsed().as_secs_f64();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    if !reply.contains("generation_id") {
        return None;
    }
    assert!(reply.contains("\"success_count\":0"), "{reply}");
    assert!(net::wait_until(Duration::from_secs(300), || {
        let scrape = net::http_get(engine.http, "/metrics");
        net::metric(&scrape, GENERATED) >= before + RECIPIENTS as f64
            && net::metric(&scrape, "drover_deferred_generation_pending") == 0.0
    }));
    Some((answered, RECIPIENTS as f64 / start.elapsed().as_secs_f64()))
}

fn read_reply(reader: &mut BufReader<TcpStream>) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("connection closed; got {all:?}");
        }
        all.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return all;
        }
    }
}

/// `n` single-recipient transactions on one connection, MAIL/RCPT/DATA pipelined.
fn smtp_connection(port: u16, conn: usize, n: usize, body: &str) {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    read_reply(&mut reader);
    writer.write_all(b"EHLO bench.client\r\n").unwrap();
    let ehlo = read_reply(&mut reader);
    assert!(ehlo.contains("PIPELINING"), "{ehlo}");
    for i in 0..n {
        write!(
            writer,
            "MAIL FROM:<s@sender.example.com>\r\nRCPT TO:<c{conn}m{i}@bench.test>\r\nDATA\r\n"
        )
        .unwrap();
        for expect in ["250", "250", "354"] {
            let reply = read_reply(&mut reader);
            assert!(reply.starts_with(expect), "{reply}");
        }
        writer.write_all(body.as_bytes()).unwrap();
        writer.write_all(b".\r\n").unwrap();
        let reply = read_reply(&mut reader);
        assert!(reply.starts_with("250"), "{reply}");
    }
    writer.write_all(b"QUIT\r\n").unwrap();
}

/// Transactions per second over `CONNECTIONS` connections.
fn smtp_run(port: u16, total: usize) -> f64 {
    let mut body = String::from(
        "From: News <news@sender.example.com>\r\nTo: reader@bench.test\r\nSubject: one of many\r\n\r\n",
    );
    while body.len() < 2048 {
        body.push_str(
            "A line of a newsletter of about two kilobytes, sent one recipient at a time.\r\n",
        );
    }
    let per = total / CONNECTIONS;
    let start = Instant::now();
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let body = body.clone();
            std::thread::spawn(move || smtp_connection(port, c, per, &body))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    (per * CONNECTIONS) as f64 / start.elapsed().as_secs_f64()
}

/// Postfix's `smtp-sink` on a free port (advertises PIPELINING), or `drover sink`.
fn start_baseline_sink(drover: &Path) -> (Child, u16, &'static str) {
    let port = net::free_port();
    let smtp_sink = ["/usr/sbin/smtp-sink", "/usr/bin/smtp-sink"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let (child, name) = match smtp_sink {
        Some(bin) => (
            Command::new(bin)
                .args(["-u", "nobody", &format!("127.0.0.1:{port}"), "1024"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
            "smtp-sink",
        ),
        None => (
            Command::new(drover)
                .args(["sink", "--listen", &format!("127.0.0.1:{port}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
            "drover sink",
        ),
    };
    assert!(net::wait_for_port(port, Duration::from_secs(30)));
    (child, port, name)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("front_door: run with `cargo bench -p drover --bench front_door`; skipped");
        return;
    }
    let quick = std::env::var("DROVER_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
    let runs = if quick { 1 } else { 3 };
    let drover = net::drover_binary(env!("CARGO_BIN_EXE_drover"));
    let work = net::bench_dir(env!("CARGO_MANIFEST_DIR"));

    let mut engine = start_engine(&drover, &work);
    let (mut templated, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        templated.push(http_run(&engine, true));
        plain.push(http_run(&engine, false));
    }
    let (mut answers, mut expanded) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        if let Some((answer, rate)) = deferred_run(&engine) {
            answers.push(answer);
            expanded.push(rate);
        }
    }
    let (templated, plain) = (net::median(templated), net::median(plain));
    println!(
        "front door, HTTP: {templated:.0} recipients/s in one templated request of {RECIPIENTS}, {plain:.0} with a static message (ratio {:.2}); medians of {runs}",
        templated / plain
    );
    if answers.is_empty() {
        println!("front door, deferred generation: not in this binary (the request was expanded before the answer)");
    } else {
        let (answer, expanded) = (net::median(answers), net::median(expanded));
        println!(
        "front door, deferred generation: the same templated request answered in {:.0} ms ({:.3} of the immediate request's time), all {RECIPIENTS} queued at {expanded:.0} recipients/s ({:.2} of the immediate request); medians of {runs}",
        answer * 1000.0,
        answer / (RECIPIENTS as f64 / templated),
        expanded / templated
        );
    }

    let (mut sink, sink_port, sink_name) = start_baseline_sink(&drover);
    let (mut into_drover, mut into_sink) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        into_drover.push(smtp_run(engine.smtp, RECIPIENTS));
        into_sink.push(smtp_run(sink_port, RECIPIENTS));
    }
    let _ = sink.kill();
    let _ = sink.wait();
    net::terminate(&mut engine.child);
    let (into_drover, into_sink) = (net::median(into_drover), net::median(into_sink));
    println!(
        "front door, SMTP: {into_drover:.0} single-recipient 2 KB transactions/s pipelined over {CONNECTIONS} connections into Drover (each synced to the spool), {into_sink:.0} into {sink_name} (ratio {:.2}); medians of {runs}",
        into_drover / into_sink
    );
}
