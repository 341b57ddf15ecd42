//! The suppression list (contract §3, issue 11): hard bounces suppress their recipient for
//! the message's tenant; injection refuses suppressed recipients through both doors; the
//! admin API and `drover suppression` manage the list.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;

fn request(recipients: &[&str], tenant: Option<&str>) -> Value {
    json!({
        "envelope_sender": "news@sender.example.com",
        "content": "From: news@sender.example.com\r\nSubject: s\r\n\r\nbody\r\n",
        "recipients": recipients.iter().map(|r| json!({"email": r})).collect::<Vec<_>>(),
        "tenant": tenant,
    })
}

async fn smtp_send(
    engine: &TestEngine,
    recipients: &[&str],
    data: &str,
) -> (Option<u16>, String, Vec<u16>) {
    let sent = smtp_transaction(
        engine,
        "client.test",
        "news@sender.example.com",
        recipients,
        data.as_bytes(),
    )
    .await;
    let rcpt_codes = sent.rcpts.iter().map(|r| r.code).collect();
    let text = sent
        .data
        .as_ref()
        .map(|r| r.lines.join(" "))
        .unwrap_or_default();
    (sent.data.map(|r| r.code), text, rcpt_codes)
}

fn cli(engine: &TestEngine, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .arg("suppression")
        .arg("--api")
        .arg(engine.url(""))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_bounces_suppress_and_both_doors_refuse_suppressed_recipients() {
    let accept = start_sink(sink::SinkConfig::default()).await;
    let reject = start_sink(sink::SinkConfig {
        reject_percent: 100,
        ..Default::default()
    })
    .await;
    let engine = TestEngine::start(&format!(
        "{}{}",
        routes(&["example.test"], accept.local_addr()),
        routes(&["reject.test"], reject.local_addr())
    ))
    .await;
    // A hard bounce (550 5.1.1: bad-mailbox) puts the recipient on acme's list.
    let (status, body) = engine
        .inject(&request(&["gone@reject.test"], Some("acme")))
        .await;
    assert_eq!(status, 200, "{body}");
    wait_records(&engine.accounting_path(), Duration::from_secs(20), |r| {
        count_type(r, "Bounce") == 1
    })
    .await;
    let list = engine
        .get_json("/api/admin/v1/suppressions?tenant=acme")
        .await;
    let entries = list["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{list}");
    assert_eq!(entries[0]["address"], "gone@reject.test");
    assert_eq!(entries[0]["source"], "bounce");
    assert_eq!(entries[0]["reason"], "bad-mailbox");
    assert!(entries[0]["message_id"].is_string());

    // HTTP: refused for acme (any case), counted in fail_count; another tenant may still mail it.
    let (status, body) = engine
        .inject(&request(
            &["GONE@reject.test", "ok@example.test"],
            Some("acme"),
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success_count"], 1, "{body}");
    assert_eq!(body["fail_count"], 1);
    assert_eq!(body["failed_recipients"], json!(["GONE@reject.test"]));
    assert!(
        body["errors"][0].as_str().unwrap().contains("suppressed"),
        "{body}"
    );
    let (status, body) = engine
        .inject(&request(&["gone@reject.test"], Some("beta")))
        .await;
    assert_eq!(
        (status, body["success_count"].clone()),
        (200, json!(1)),
        "{body}"
    );

    // Every recipient suppressed: a valid request that queues nothing.
    let (status, body) = engine
        .inject(&request(&["gone@reject.test"], Some("acme")))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["success_count"].clone(), body["fail_count"].clone()),
        (json!(0), json!(1))
    );

    // The admin API adds to the list of mail without a tenant: refused at RCPT over SMTP.
    let (status, body) = post_json(
        &engine.url("/api/admin/v1/suppressions"),
        &json!({"entries": [{"address": "Blocked@Example.test", "reason": "asked by phone"}]}),
        None,
    )
    .await;
    assert_eq!((status, body["added"].clone()), (200, json!(1)), "{body}");
    let message = "From: news@sender.example.com\r\nSubject: s\r\n\r\nbody\r\n";
    let (data, _, rcpts) = smtp_send(
        &engine,
        &["blocked@example.test", "fine@example.test"],
        message,
    )
    .await;
    assert_eq!(rcpts, vec![550, 250]);
    assert_eq!(data, Some(250));
    // With X-Tenant, the tenant's list: its suppressed recipients are left out and named.
    let tenant_message = format!("X-Tenant: acme\r\n{message}");
    let (data, text, _) = smtp_send(
        &engine,
        &["gone@reject.test", "fine2@example.test"],
        &tenant_message,
    )
    .await;
    assert_eq!(data, Some(250));
    assert!(
        text.contains("not queued (suppressed): gone@reject.test"),
        "{text}"
    );
    let (data, _, _) = smtp_send(&engine, &["gone@reject.test"], &tenant_message).await;
    assert_eq!(data, Some(550));
    // Bad admin input is refused whole.
    for bad in [
        json!({"entries": []}),
        json!({"entries": [{"address": "no-at-sign"}]}),
        json!({"nope": 1}),
    ] {
        let (status, _) = post_json(&engine.url("/api/admin/v1/suppressions"), &bad, None).await;
        assert_eq!(status, 400, "{bad}");
    }

    // The command line: import, export, remove.
    let out = cli(
        &engine,
        &["import", "-"],
        Some("tenant,address,reason\nacme,a1@example.test,list clean\n,a2@example.test,\n"),
    );
    assert_success(&out);
    let out = cli(&engine, &["export", "--all"], None);
    assert_success(&out);
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(
        csv.starts_with("tenant,address,source,reason,at,message_id\n"),
        "{csv}"
    );
    for line in [
        "acme,a1@example.test,admin,list clean,",
        ",a2@example.test,admin,,",
        ",blocked@example.test,admin,asked by phone,",
        "acme,gone@reject.test,bounce,bad-mailbox,",
    ] {
        assert!(csv.contains(line), "{line} in {csv}");
    }
    let out = cli(
        &engine,
        &[
            "remove",
            "--tenant",
            "acme",
            "gone@reject.test",
            "never@example.test",
        ],
        None,
    );
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"removed\":1"));
    let (_, body) = engine
        .inject(&request(&["gone@reject.test"], Some("acme")))
        .await;
    assert_eq!(body["success_count"], 1, "{body}");
    let metrics = engine.metrics().await;
    assert!(
        metric_value(&metrics, "drover_recipients_suppressed_total{via=\"http\"}") >= 2.0,
        "{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "drover_suppressions_added_total{source=\"bounce\"}"
        ) >= 1.0
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_pages_and_survives_a_restart() {
    let engine = TestEngine::start("").await;
    let entries: Vec<Value> = (0..2_500)
        .map(|i| json!({"tenant": "acme", "address": format!("u{i:05}@example.test")}))
        .collect();
    let (status, _) = post_json(
        &engine.url("/api/admin/v1/suppressions"),
        &json!({"entries": entries}),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let dir = engine.stop().await;
    let engine = TestEngine::start_in(dir, "").await;
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = "/api/admin/v1/suppressions?tenant=acme&limit=1000".to_owned();
        if let Some(a) = &after {
            path.push_str(&format!("&after={}", urlencode(a)));
        }
        let page = engine.get_json(&path).await;
        for e in page["entries"].as_array().unwrap() {
            seen.push(e["address"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 2_500);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");
    engine.stop().await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
