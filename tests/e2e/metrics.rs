//! `/metrics` against its documentation (docs/metrics.md) and against the work done: a
//! `drover serve` process of its own (the metrics recorder is process-wide, so counters in
//! this test process add up every test's engines), mail to two sinks, one refusing all.

use crate::harness::*;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// One family of a scrape.
#[derive(Debug, Default)]
struct Family {
    kind: Option<String>,
    /// Label names over its samples (`le` and `quantile` left out: they belong to the kind).
    labels: BTreeSet<String>,
    /// (sample name, labels, value).
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

/// Parses the Prometheus text format (0.0.4), strictly: any line it does not understand fails
/// the test, and every sample must belong to a family with a `# TYPE`.
fn parse_exposition(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            let family = families.entry(name.to_owned()).or_default();
            assert!(family.kind.is_none(), "two TYPE lines for {name}");
            family.kind = Some(kind.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = parse_sample(line);
        let value = match rest.split_whitespace().next().unwrap() {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|e| panic!("{line}: {e}")),
        };
        let family_name = families
            .get(&name)
            .filter(|f| f.kind.is_some())
            .map(|_| name.clone())
            .or_else(|| {
                ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
                    let base = name.strip_suffix(suffix)?;
                    let kind = families.get(base)?.kind.as_deref()?;
                    matches!(kind, "histogram" | "summary").then(|| base.to_owned())
                })
            })
            .unwrap_or_else(|| panic!("sample without a TYPE: {line}"));
        let family = families.get_mut(&family_name).unwrap();
        family.labels.extend(
            labels
                .keys()
                .filter(|k| *k != "le" && *k != "quantile")
                .cloned(),
        );
        family.samples.push((name, labels, value));
    }
    families
}

/// `name{labels} rest` → (name, labels, rest), label values unescaped.
fn parse_sample(line: &str) -> (String, BTreeMap<String, String>, &str) {
    let end = line.find(['{', ' ']).unwrap_or_else(|| panic!("{line}"));
    let name = &line[..end];
    assert!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "bad metric name in {line}"
    );
    let mut labels = BTreeMap::new();
    let mut rest = &line[end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            let (start, c) = chars.next().unwrap_or_else(|| panic!("{line}"));
            if c == '}' {
                rest = &inner[start + 1..];
                break;
            }
            if c == ',' {
                continue;
            }
            let eq = inner[start..].find('=').unwrap() + start;
            let key = inner[start..eq].to_owned();
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
            let mut value = String::new();
            loop {
                match chars.next().unwrap_or_else(|| panic!("{line}")).1 {
                    '\\' => match chars.next().unwrap().1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            assert!(labels.insert(key, value).is_none(), "label twice: {line}");
        }
    }
    assert!(rest.starts_with(' '), "{line}");
    (name.to_owned(), labels, rest.trim_start())
}

/// A row of the table in docs/metrics.md.
#[derive(Debug)]
struct Row {
    kind: String,
    labels: BTreeSet<String>,
    appears: String,
}

fn documented() -> BTreeMap<String, Row> {
    let text = std::fs::read_to_string(manifest_dir().join("../../docs/metrics.md")).unwrap();
    let mut rows = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "", name, kind, labels, appears, meaning, ""
        assert!(cells.len() >= 7, "{line}");
        let name = cells[1].trim_matches('`').to_owned();
        let labels = cells[3]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        let row = Row {
            kind: cells[2].to_owned(),
            labels,
            appears: cells[4].to_owned(),
        };
        assert!(rows.insert(name.clone(), row).is_none(), "{name} twice");
    }
    assert!(rows.len() >= 40, "only {} rows", rows.len());
    rows
}

fn value(families: &BTreeMap<String, Family>, sample: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    families
        .values()
        .flat_map(|f| &f.samples)
        .filter(|(name, l, _)| name == sample && *l == want)
        .map(|(_, _, v)| *v)
        .next()
        .unwrap_or_else(|| panic!("no sample {sample}{labels:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_is_what_metrics_serves() {
    let good = capturing_sink().await;
    let refusing = start_sink(sink::SinkConfig {
        reject_percent: 100,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // A webhook whose endpoint refuses connections: its families are served and checked too.
    let hook = free_port();
    let config = dir.path().join("drover.toml");
    std::fs::write(
        &config,
        format!(
            "[spool]\npath = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             [smtp_listener]\nlisten = \"127.0.0.1:0\"\n{}{}\
             [[webhook]]\nname = \"platform\"\nurl = \"http://127.0.0.1:{hook}/h\"\ntimeout = \"1s\"\n",
            dir.path().join("data"),
            routes(&["ok.test"], good.local_addr()),
            routes(&["bad.test"], refusing.local_addr()),
        ),
    )
    .unwrap();
    let _child = KillOnDrop(spawn_drover(&config));
    wait_port_ready(port).await;
    let ready = std::time::Instant::now();
    let base = format!("http://127.0.0.1:{port}");
    let scrape = || async {
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };

    // Before any work: the families marked `start` are there already.
    let rows = documented();
    let first = parse_exposition(&scrape().await);
    for (name, row) in &rows {
        if row.appears == "start" {
            assert!(first.contains_key(name), "{name} is not served at start");
        }
    }

    let ok: Vec<String> = (0..100).map(|i| format!("u{i}@ok.test")).collect();
    let bad: Vec<String> = (0..10).map(|i| format!("u{i}@bad.test")).collect();
    for recipients in [&ok, &bad] {
        let (status, reply) = post_json(
            &format!("{base}/api/inject/v1"),
            &message_for(recipients),
            None,
        )
        .await;
        assert_eq!(status, 200, "{reply}");
    }
    let accounting = dir.path().join("data/accounting.jsonl");
    wait_records(&accounting, Duration::from_secs(60), |r| {
        count_type(r, "Delivery") + count_type(r, "Bounce") == 110
    })
    .await;
    // The counters move as the records are written; give the scrape a moment to see both.
    let mut families = parse_exposition(&scrape().await);
    for _ in 0..100 {
        if value(&families, "drover_messages_delivered_total", &[]) == 100.0
            && value(
                &families,
                "drover_messages_bounced_total",
                &[("category", "bad-mailbox")],
            ) == 10.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        families = parse_exposition(&scrape().await);
    }

    // The housekeeping round (every 5 s at most) has run at least once.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(ready.elapsed())).await;
    families = parse_exposition(&scrape().await);

    // Every served family is documented with its kind and labels, and every documented one
    // that this work produces is served.
    for (name, family) in &families {
        let row = rows
            .get(name)
            .unwrap_or_else(|| panic!("{name} is served but not in docs/metrics.md"));
        assert_eq!(
            family.kind.as_deref(),
            Some(row.kind.as_str()),
            "kind of {name}"
        );
        assert_eq!(family.labels, row.labels, "labels of {name}");
    }
    for (name, row) in &rows {
        if ["start", "tick", "injection", "delivery", "webhook"].contains(&row.appears.as_str()) {
            assert!(families.contains_key(name), "{name} is not served");
        }
    }

    // The counters match the work.
    assert_eq!(
        value(&families, "drover_messages_delivered_total", &[]),
        100.0
    );
    let bounced = &families["drover_messages_bounced_total"].samples;
    for (_, labels, v) in bounced {
        let want = if labels["category"] == "bad-mailbox" {
            10.0
        } else {
            0.0
        };
        assert_eq!(*v, want, "bounced {labels:?}");
    }
    assert_eq!(
        value(
            &families,
            "drover_messages_received_total",
            &[("via", "http")]
        ),
        110.0
    );
    assert_eq!(
        value(&families, "drover_messages_transient_failures_total", &[]),
        0.0
    );
    assert_eq!(
        value(&families, "drover_delivery_duration_seconds_count", &[]),
        110.0
    );
    let site = |site: &str, result: &str| {
        value(
            &families,
            "drover_site_messages_total",
            &[("site", site), ("result", result)],
        )
    };
    assert_eq!(site("route:ok.test", "delivered"), 100.0);
    assert_eq!(site("route:bad.test", "bounced"), 10.0);
    assert_eq!(site("other", "delivered"), 0.0);
    assert_eq!(
        value(
            &families,
            "drover_injection_duration_seconds_count",
            &[("via", "http")]
        ),
        2.0
    );
    assert!(value(&families, "drover_spool_fsync_duration_seconds_count", &[]) >= 2.0);
    assert!(value(&families, "drover_spool_write_duration_seconds_count", &[]) >= 2.0);
    // Everything is delivered: nothing queued, per site or in all.
    for state in ["ready", "scheduled", "in_flight"] {
        assert_eq!(
            value(&families, "drover_queue_messages", &[("state", state)]),
            0.0
        );
    }
    assert_eq!(good.stats().transactions, 100);
    assert_eq!(
        reqwest::get(format!("{base}/api/admin/v1/queues"))
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()["totals"]["ready"],
        json!(0)
    );
}

/// The engine process, killed when the test ends, passed or failed.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_parser_reads_escapes_histograms_and_refuses_untyped_samples() {
    let text =
        "# HELP a_total x\n# TYPE a_total counter\na_total{l=\"q\\\"u\\\\o\\nte\",m=\"\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";
    let families = parse_exposition(text);
    let a = &families["a_total"];
    assert_eq!(a.samples[0].1["l"], "q\"u\\o\nte");
    assert_eq!(a.labels, BTreeSet::from(["l".to_owned(), "m".to_owned()]));
    assert_eq!(families["h"].samples.len(), 3);
    assert!(families["h"].labels.is_empty());
    let untyped = std::panic::catch_unwind(|| parse_exposition("x 1\n"));
    assert!(untyped.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_top_sites_get_their_own_label() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&format!(
        "{}[metrics]\ntop_sites = 1\n",
        routes(&["first.test", "second.test"], sink.local_addr())
    ))
    .await;
    wait_ready(&engine).await;
    let batches = [("first.test", 10), ("second.test", 3)];
    let mut sent = 0;
    for (domain, n) in batches {
        let recipients: Vec<String> = (0..n).map(|i| format!("u{i}@{domain}")).collect();
        let (status, reply) = engine.inject(&message_for(&recipients)).await;
        assert_eq!(status, 200, "{reply}");
        sent += n;
        wait_records(&engine.accounting_path(), Duration::from_secs(20), |r| {
            count_type(r, "Delivery") == sent
        })
        .await;
    }
    // The site series are the engine's own (not the process-wide recorder's): exact counts.
    let families = parse_exposition(&engine.metrics().await);
    let sites: BTreeSet<&str> = families["drover_site_messages_total"]
        .samples
        .iter()
        .map(|(_, l, _)| l["site"].as_str())
        .collect();
    assert_eq!(sites, BTreeSet::from(["route:first.test", "other"]));
    let delivered = |site: &str| {
        value(
            &families,
            "drover_site_messages_total",
            &[("site", site), ("result", "delivered")],
        )
    };
    assert_eq!(delivered("route:first.test"), 10.0);
    assert_eq!(delivered("other"), 3.0);
    let connection_sites: BTreeSet<&str> = families["drover_site_connections"]
        .samples
        .iter()
        .map(|(_, l, _)| l["site"].as_str())
        .collect();
    assert!(connection_sites.is_subset(&BTreeSet::from(["route:first.test", "other"])));
}
