//! The `drover` binary as an operator runs it.

use crate::harness::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const DROVER: &str = env!("CARGO_BIN_EXE_drover");

#[test]
fn check_config_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[delivery]\nsmtp_port = 2525\n").unwrap();
    let out = drover_command("check-config", &good);
    assert_eq!(out.status.code(), Some(0));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[delivery]\nsmtp_prot = 2525\n").unwrap();
    let out = drover_command("check-config", &bad);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("smtp_prot"));
    let example = manifest_dir().join("../../deploy/drover.example.toml");
    assert_success(&drover_command("check-config", &example));
    let out = Command::new(DROVER).args(["--version"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("drover "));
    let out = Command::new(DROVER)
        .args(["serve", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

async fn wait_http(url: &str) {
    for _ in 0..200 {
        if reqwest::get(url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_sink_binaries_deliver_and_stop_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (sink_port, sink_status, http_port) = (free_port(), free_port(), free_port());
    let mut sink = Command::new(DROVER)
        .args([
            "sink",
            "--listen",
            &format!("127.0.0.1:{sink_port}"),
            "--status",
            &format!("127.0.0.1:{sink_status}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let config = dir.path().join("drover.toml");
    std::fs::write(
        &config,
        format!(
            "[spool]\npath = {:?}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n[smtp_listener]\nlisten = \"127.0.0.1:0\"\n[[route]]\ndomain = \"example.test\"\nhosts = [\"127.0.0.1:{sink_port}\"]\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let mut serve = Command::new(DROVER)
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_http(&format!("http://127.0.0.1:{http_port}/healthz")).await;
    wait_http(&format!("http://127.0.0.1:{sink_status}/")).await;
    let (status, body) = post_json(
        &format!("http://127.0.0.1:{http_port}/api/inject/v1"),
        &message_for(&["ann@example.test".into(), "bob@example.test".into()]),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let accounting = dir.path().join("data/accounting.jsonl");
    wait_records(&accounting, Duration::from_secs(20), |r| {
        count_type(r, "Delivery") == 2
    })
    .await;
    let stats: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{sink_status}/"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["transactions"], 2);
    let queue = Command::new(DROVER)
        .args([
            "queue",
            "--api",
            &format!("http://127.0.0.1:{http_port}"),
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(queue.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&queue.stdout).contains("DESTINATION"));
    for child in [&mut serve, &mut sink] {
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    }
    let status = tokio::task::spawn_blocking(move || serve.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let out = tokio::task::spawn_blocking(move || sink.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["transactions"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_shaping_rules_and_keeps_running_on_a_bad_file() {
    let sink = start_sink(sink::SinkConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (http_port, smtp_port) = (free_port(), free_port());
    let config = dir.path().join("drover.toml");
    let base = format!(
        "[spool]\npath = {:?}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n[smtp_listener]\nlisten = \"127.0.0.1:{smtp_port}\"\n[retry]\nintervals = [\"1s\"]\n{}",
        dir.path().join("data"),
        routes(&["hup.test"], sink.local_addr())
    );
    // The sink offers no STARTTLS, so "required" defers everything.
    std::fs::write(
        &config,
        format!("{base}[[shaping]]\nmatch = \"hup.test\"\ntls = \"required\"\n"),
    )
    .unwrap();
    let mut serve = Command::new(DROVER)
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_http(&format!("http://127.0.0.1:{http_port}/readyz")).await;
    let url = format!("http://127.0.0.1:{http_port}/api/inject/v1");
    assert_eq!(
        post_json(&url, &message_for(&["a@hup.test".into()]), None)
            .await
            .0,
        200
    );
    let accounting = dir.path().join("data/accounting.jsonl");
    wait_records(&accounting, Duration::from_secs(10), |r| {
        count_type(r, "TransientFailure") >= 1
    })
    .await;
    let hup = |pid: u32| {
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
    };
    // A broken file is refused; the engine keeps its rules and keeps serving.
    std::fs::write(&config, "[shaping]\nbroken = true\n").unwrap();
    hup(serve.id());
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait_http(&format!("http://127.0.0.1:{http_port}/healthz")).await;
    assert_eq!(count_type(&records(&accounting), "Delivery"), 0);
    // The fixed file takes effect: the next retry goes out in plaintext.
    std::fs::write(
        &config,
        format!("{base}[[shaping]]\nmatch = \"hup.test\"\ntls = \"opportunistic\"\n"),
    )
    .unwrap();
    hup(serve.id());
    wait_records(&accounting, Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 1
    })
    .await;
    Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || serve.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn dkim_records_prints_the_txt_records_to_publish() {
    let fixtures = manifest_dir().join("../dkim/tests/fixtures");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("drover.toml");
    std::fs::write(
        &config,
        format!(
            "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = {:?}\n[[dkim]]\ndomain = \"example.com\"\nselector = \"ed\"\nkey_file = {:?}\n",
            fixtures.join("rsa2048.pem"),
            fixtures.join("ed25519.pem")
        ),
    )
    .unwrap();
    let out = drover_command("dkim-records", &config);
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let rsa_key = std::fs::read_to_string(fixtures.join("rsa2048.pub.b64")).unwrap();
    let rsa_line = text
        .lines()
        .find(|l| l.starts_with("s1._domainkey.example.com. IN TXT"))
        .unwrap();
    // Split into DNS strings of at most 255 bytes; joined they give the record back.
    let joined: String = rsa_line
        .split('"')
        .skip(1)
        .step_by(2)
        .inspect(|chunk| assert!(chunk.len() <= 255))
        .collect();
    assert_eq!(joined, format!("v=DKIM1; k=rsa; p={}", rsa_key.trim()));
    assert!(text.contains("ed._domainkey.example.com. IN TXT ( \"v=DKIM1; k=ed25519; p="));
    let missing = dir.path().join("bad.toml");
    std::fs::write(
        &missing,
        "[[dkim]]\ndomain = \"a.test\"\nselector = \"s\"\nkey_file = \"/nonexistent.pem\"\n",
    )
    .unwrap();
    let out = Command::new(DROVER)
        .arg("dkim-records")
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
