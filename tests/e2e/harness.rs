//! Shared helpers: start engines and sinks, inject, read accounting records.

use drover::serve::Running;
use drover::Config;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct TestEngine {
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
}

impl TestEngine {
    /// Starts an engine whose spool lives in a fresh temp dir; `extra` is appended TOML.
    pub async fn start(extra: &str) -> TestEngine {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, extra).await
    }

    pub async fn start_in(dir: tempfile::TempDir, extra: &str) -> TestEngine {
        let mut config = Config::parse(extra).unwrap();
        config.spool.path = dir.path().join("spool");
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        config.smtp_listener.listen = "127.0.0.1:0".parse().unwrap();
        config.delivery.ehlo_name = "drover.test".into();
        config.delivery.idle_timeout = drover::config::HumanDuration(Duration::from_secs(2));
        let running = drover::serve::start(config).await.unwrap();
        TestEngine {
            running: Some(running),
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.as_ref().unwrap().http_addr)
    }

    pub fn accounting_path(&self) -> PathBuf {
        self.dir.path().join("spool").join("accounting.jsonl")
    }

    /// GET a JSON document from the engine's HTTP API.
    pub async fn get_json(&self, path: &str) -> Value {
        reqwest::get(self.url(path))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The Prometheus exposition.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn inject(&self, body: &Value) -> (u16, Value) {
        post_json(&self.url("/api/inject/v1"), body, None).await
    }

    /// Stops the engine and returns its directory, to start again on the same spool.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(5)).await;
        }
        self.dir
    }
}

/// Waits until `/readyz` says ready (the start-up reload of the spool is done).
pub async fn wait_ready(engine: &TestEngine) {
    let start = std::time::Instant::now();
    while !reqwest::get(engine.url("/readyz"))
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(start.elapsed() < Duration::from_secs(30), "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn post_json(url: &str, body: &Value, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(url).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let value = resp.json().await.unwrap_or(Value::Null);
    (status, value)
}

/// The complete records of an accounting file. A line still being written (no newline yet)
/// is not a record yet; every complete line must parse.
/// Every record of the accounting log at `path`: its closed segments (`<path>.<n>`, or
/// `<path>.<n>.zst`) in order, then the current file.
pub fn records(path: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for segment in segment_files(path) {
        let bytes = if segment.extension().is_some_and(|e| e == "zst") {
            std::fs::File::open(&segment)
                .ok()
                .and_then(|f| zstd::decode_all(f).ok())
                .unwrap_or_default()
        } else {
            std::fs::read(&segment).unwrap_or_default()
        };
        let text = String::from_utf8_lossy(&bytes);
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        out.extend(
            complete.lines().map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad record {l:?}: {e}"))
            }),
        );
    }
    out
}

/// The files of the accounting log at `path`, oldest first.
pub fn segment_files(path: &Path) -> Vec<std::path::PathBuf> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut closed: Vec<(u64, std::path::PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(path.parent().unwrap()) {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = file.strip_prefix(&format!("{name}.")) else {
                continue;
            };
            let digits = rest.strip_suffix(".zst").unwrap_or(rest);
            if let Ok(n) = digits.parse::<u64>() {
                // A plain file and its compressed copy both present: the plain one is whole.
                if !closed.iter().any(|(m, _)| *m == n) || !rest.ends_with(".zst") {
                    closed.retain(|(m, _)| *m != n);
                    closed.push((n, entry.path()));
                }
            }
        }
    }
    closed.sort();
    let mut files: Vec<_> = closed.into_iter().map(|(_, p)| p).collect();
    files.push(path.to_owned());
    files
}

pub fn count_type(records: &[Value], kind: &str) -> usize {
    records.iter().filter(|r| r["type"] == kind).count()
}

/// Waits until the accounting file satisfies `done`, or panics after `limit`.
pub async fn wait_records(
    path: &Path,
    limit: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let start = std::time::Instant::now();
    loop {
        let recs = records(path);
        if done(&recs) {
            return recs;
        }
        if start.elapsed() > limit {
            panic!(
                "condition not met after {limit:?}; records: {}",
                serde_json::to_string_pretty(&recs).unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A sink on a free port that keeps every message it accepts.
pub async fn capturing_sink() -> sink::SinkHandle {
    start_sink(sink::SinkConfig {
        capture: true,
        ..Default::default()
    })
    .await
}

pub async fn start_sink(config: sink::SinkConfig) -> sink::SinkHandle {
    sink::Sink::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

/// A sink that keeps what it receives, on a chosen address (one a test first left unanswered).
pub async fn capturing_sink_at(addr: std::net::SocketAddr) -> sink::SinkHandle {
    sink::Sink::bind(
        addr,
        sink::SinkConfig {
            capture: true,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

pub fn routes(domains: &[&str], sink: std::net::SocketAddr) -> String {
    domains
        .iter()
        .map(|d| format!("[[route]]\ndomain = \"{d}\"\nhosts = [\"{sink}\"]\n"))
        .collect()
}

pub fn message_for(recipients: &[String]) -> Value {
    serde_json::json!({
        "envelope_sender": "bounces@news.example.com",
        "content": "From: News <news@example.com>\r\nSubject: Hello {{ name }}\r\n\r\nHi {{ name }}, your plan is {{ plan }}.\r\n",
        "recipients": recipients.iter().map(|r| serde_json::json!({"email": r, "name": "N", "substitutions": {"plan": "gold"}})).collect::<Vec<_>>(),
        "substitutions": {"plan": "silver"},
        "campaign": "nov-2026",
        "tenant": "acme",
    })
}

/// This crate's directory, as cargo gives it to the running test: a compile-time path can
/// name another checkout when a target directory is shared between clones.
pub fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Runs `drover <command> <file>` to completion.
pub fn drover_command(command: &str, file: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .arg(command)
        .arg(file)
        .output()
        .unwrap()
}

/// Asserts that a finished command exited 0, showing its stderr otherwise.
pub fn assert_success(out: &std::process::Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `count` messages straight into a spool (closed afterwards), spread over 1 000
/// domains `d<N>.example.test`, due `due_in_ms` from now, in `campaign`.
pub async fn fill_spool(path: &Path, count: usize, due_in_ms: u64, campaign: Option<&str>) {
    use queue::{MessageId, MessageMeta, Spool, SpoolOptions};
    let spool = Spool::open(path, SpoolOptions::default()).unwrap();
    let now = drover::clock::now_ms();
    let mut written = 0;
    while written < count {
        let batch = (written..count.min(written + 10_000))
            .map(|i| {
                let domain = format!("d{}.example.test", i % 1000);
                let meta = MessageMeta {
                    id: MessageId::generate(),
                    sender: "bounces@example.com".into(),
                    recipient: format!("u{i}@{domain}"),
                    domain,
                    campaign: campaign.map(str::to_owned),
                    tenant: None,
                    received_ms: now,
                    due_ms: now + due_in_ms,
                    attempts: 0,
                    headers: Default::default(),
                    last_source: None,
                    priority: Default::default(),
                    metadata: None,
                    arrived_ms: None,
                    size: 20,
                };
                (meta, b"Subject: x\r\n\r\nhi\r\n".to_vec())
            })
            .collect::<Vec<_>>();
        written += batch.len();
        spool.insert(batch).await.unwrap();
    }
    spool.close().unwrap();
}

/// The value of one series in a Prometheus text page (0 when absent). Counters are
/// process-wide and tests share the process: compare with `>=`, never `==`.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).filter(|rest| rest.starts_with(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// One SMTP transaction to the engine's listener (plaintext, EHLO `helo`): the replies to
/// MAIL, each RCPT and the final dot.
pub async fn smtp_transaction(
    engine: &TestEngine,
    helo: &str,
    sender: &str,
    recipients: &[&str],
    data: &[u8],
) -> connection_pool::TransactionResult {
    let addr = engine.running.as_ref().unwrap().smtp_addr.unwrap();
    let mut client = connection_pool::SmtpClient::connect_with(connection_pool::ConnectOptions {
        tls: connection_pool::TlsMode::Disabled,
        tls_failures: connection_pool::TlsFailureMemory::default(),
        ..connection_pool::ConnectOptions::new("localhost", addr, helo)
    })
    .await
    .unwrap();
    let envelope = connection_pool::Envelope {
        sender: sender.to_owned(),
        recipients: recipients.iter().map(|r| (*r).to_owned()).collect(),
        ..Default::default()
    };
    client.send(&envelope, data).await.unwrap()
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `drover serve --config <config>` as a child process (stderr discarded).
pub fn spawn_drover(config: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["serve", "--config"])
        .arg(config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the process listening on `port` answers `/readyz` with 200.
pub async fn wait_port_ready(port: u16) {
    for _ in 0..400 {
        if reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("drover never became ready");
}

/// The `ids` of an inject reply.
pub fn ids_of(reply: &Value) -> Vec<String> {
    reply["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}
