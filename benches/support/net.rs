//! Loopback helpers shared by the process-level benches (relay, scale).
#![allow(dead_code)]

use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `done` until it holds or `limit` passes; whether it held.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, limit: Duration) -> bool {
    wait_until(limit, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
}

/// The `drover` binary a bench runs: `DROVER_BENCH_BINARY` (an older build, for a
/// before/after) or this build's (`built`, the bench's `CARGO_BIN_EXE_drover`).
pub fn drover_binary(built: &str) -> std::path::PathBuf {
    std::env::var_os("DROVER_BENCH_BINARY")
        .map_or_else(|| std::path::PathBuf::from(built), std::path::PathBuf::from)
}

/// Where benches write: `$CARGO_TARGET_DIR/bench` (default `target/bench` beside the
/// workspace, `manifest_dir` being the bench crate's), created.
pub fn bench_dir(manifest_dir: &str) -> std::path::PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(
        |_| std::path::Path::new(manifest_dir).join("../../target"),
        std::path::PathBuf::from,
    );
    let work = target.join("bench");
    std::fs::create_dir_all(&work).unwrap();
    work
}

/// POSTs a JSON body to the engine's HTTP API on 127.0.0.1:`port`; the whole raw reply.
pub fn http_post(port: u16, path: &str, body: &serde_json::Value) -> String {
    use std::io::{Read, Write};
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// GETs `path` from the engine's HTTP API on 127.0.0.1:`port`; the whole raw reply.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of the series `series` (name and labels as served) in a scrape, 0 when absent.
pub fn metric(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `drover sink` on a free port (`drover`: the binary), waited for until it listens.
pub fn spawn_sink(drover: &std::path::Path) -> (std::process::Child, u16) {
    let port = free_port();
    let child = std::process::Command::new(drover)
        .args(["sink", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for_port(port, Duration::from_secs(30)));
    (child, port)
}

/// SIGTERM (a clean stop, as an operator's), then waits for the process to end.
pub fn terminate(child: &mut std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// The median of some figures.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `drover serve --config <config>` (quiet), waited for until its HTTP API on `http` listens.
pub fn spawn_serve(
    drover: &std::path::Path,
    config: &std::path::Path,
    http: u16,
) -> std::process::Child {
    let child = std::process::Command::new(drover)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for_port(http, Duration::from_secs(30)));
    child
}
