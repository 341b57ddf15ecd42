//! The status page (`GET /`) as a browser sees it: headless Chromium loads it with the token
//! in its query, and the DOM it built shows the destinations with their states; a screenshot
//! of it is a real picture.

use crate::harness::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const TOKEN: &str = "status-token";

/// The Chromium binary on PATH, if any.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|p| p.is_file())
}

/// Runs headless Chromium on `url` with `extra` arguments; its stdout.
async fn headless(browser: &Path, profile: &Path, url: &str, extra: &[String]) -> String {
    let mut command = Command::new(browser);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url);
    let run = tokio::task::spawn_blocking(move || command.output());
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("chromium took over two minutes")
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The row of `destination` in the page's queue table: its cells' text.
fn row_of(dom: &str, destination: &str) -> Vec<String> {
    let table = dom
        .split("<table id=\"queues\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or_else(|| panic!("no queue table in {dom}"));
    let row = table
        .split("<tr>")
        .find(|r| r.contains(&format!("<td>{destination}</td>")))
        .unwrap_or_else(|| panic!("no row for {destination} in {table}"));
    row.split("<td")
        .skip(1)
        .map(|cell| {
            let text = cell.split_once('>').map_or("", |(_, t)| t);
            text.split('<').next().unwrap_or_default().to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_sees_the_destinations_and_their_states() {
    let Some(browser) = chromium() else {
        if std::env::var_os("CI").is_some() {
            panic!("chromium is not installed (scripts/install-deps.sh installs it)");
        }
        eprintln!("skipping: chromium is not installed (scripts/install-deps.sh installs it)");
        return;
    };
    // slow.test: each reply takes half a minute, so its mail is still queued or in flight when
    // the page is read, however slow the machine (a timeout only defers it).
    let slow = start_sink(sink::SinkConfig {
        latency: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    // grey.test greylists for an hour: every attempt is deferred as greylisting.
    let grey = start_sink(sink::SinkConfig {
        greylist: Some(Duration::from_secs(3600)),
        ..Default::default()
    })
    .await;
    let held = capturing_sink().await;
    let engine = TestEngine::start(&format!(
        "{}{}{}[http]\napi_tokens = [\"{TOKEN}\"]\n",
        routes(&["slow.test"], slow.local_addr()),
        routes(&["grey.test"], grey.local_addr()),
        routes(&["held.test"], held.local_addr()),
    ))
    .await;
    wait_ready(&engine).await;
    let (status, reply) = post_json(
        &engine.url("/api/admin/v1/suspend"),
        &json!({"domain": "held.test"}),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    for domain in ["grey.test", "held.test", "slow.test"] {
        let recipients: Vec<String> = (0..3).map(|i| format!("u{i}@{domain}")).collect();
        let (status, reply) = post_json(
            &engine.url("/api/inject/v1"),
            &message_for(&recipients),
            Some(TOKEN),
        )
        .await;
        assert_eq!(status, 200, "{reply}");
    }
    wait_records(&engine.accounting_path(), Duration::from_secs(20), |r| {
        count_type(r, "TransientFailure") >= 3
    })
    .await;

    // Behind the token: none or a wrong one is refused, the query or the header let in.
    let client = reqwest::Client::new();
    for url in [engine.url("/"), engine.url("/?token=wrong")] {
        assert_eq!(
            client.get(&url).send().await.unwrap().status(),
            401,
            "{url}"
        );
    }
    let with_header = client
        .get(engine.url("/"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(with_header.status(), 200);
    assert!(with_header.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));

    let profile = tempfile::tempdir().unwrap();
    let url = engine.url(&format!("/?token={TOKEN}"));
    let dom = headless(&browser, profile.path(), &url, &["--dump-dom".to_owned()]).await;
    assert!(dom.contains("Drover status"), "{dom}");
    let grey_row = row_of(&dom, "grey.test");
    assert_eq!(grey_row[1], "greylisted", "{grey_row:?}");
    let queued =
        |row: &[String]| -> usize { row[2..].iter().map(|c| c.parse::<usize>().unwrap()).sum() };
    let held_row = row_of(&dom, "held.test");
    assert_eq!(held_row[1], "suspended", "{held_row:?}");
    assert_eq!(queued(&held_row), 3, "held: {held_row:?}");
    let slow_row = row_of(&dom, "slow.test");
    assert_eq!(slow_row[1], "flowing", "{slow_row:?}");
    assert_eq!(
        queued(&slow_row),
        3,
        "still queued or in flight: {slow_row:?}"
    );
    // The last hour counts what came in, and the spool's disk is shown.
    assert!(dom.contains("Received 9,"), "{dom}");
    assert!(dom.contains(&engine.dir.path().join("spool").display().to_string()));
    assert!(dom.contains("<svg id=\"chart\""));

    let shot = profile.path().join("page.png");
    headless(
        &browser,
        profile.path(),
        &url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,900".to_owned(),
        ],
    )
    .await;
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 10_000, "a blank page? {} bytes", png.len());
    if let Some(keep) = std::env::var_os("DROVER_STATUS_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
}
