//! `GET /`: the status page, one server-rendered HTML document (no script; the chart is
//! inline SVG) that reloads itself every [`REFRESH_SECONDS`]: messages per second over the
//! last ten minutes, the queues by destination with their state, the last hour's bounces
//! and complaints, and the spool's disk. Every text from outside (destination names,
//! categories, paths) is HTML-escaped.
//!
//! It sits behind the API token like the rest of the API; a browser gives the token as
//! `?token=` (see `http_guard::page_token_ok`), which the reload keeps.

use crate::activity::{Slot, SLOT_MS};
use crate::api_state::AppState;
use crate::clock::now_ms;
use crate::engine::Engine;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;

/// Seconds between the page's reloads.
pub(crate) const REFRESH_SECONDS: u32 = 10;
/// Slots of the chart: ten minutes.
const CHART_SLOTS: usize = 60;
/// Destinations listed at most (the fullest first).
const MAX_ROWS: usize = 200;

/// What the page shows of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueRow {
    /// The destination as the queue listing names it (domain, or `domain|source`).
    pub(crate) destination: String,
    /// Ready, scheduled (and parked), in flight.
    pub(crate) counts: [usize; 3],
    /// `flowing`, `backoff`, `suspended` or `greylisted`.
    pub(crate) state: &'static str,
}

/// What the page shows of the spool's disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DiskState {
    /// The spool directory.
    pub(crate) path: String,
    /// Bytes free for unprivileged users on its file system, if known.
    pub(crate) free_bytes: Option<u64>,
    /// Bytes of the spool directory's files.
    pub(crate) spool_bytes: u64,
    /// Messages in the spool (as the scheduler knows them).
    pub(crate) messages: usize,
    /// Whether the spool accepts writes.
    pub(crate) writable: bool,
}

/// Everything the page shows, gathered first and rendered by [`render`].
#[derive(Debug, Clone, Default)]
pub(crate) struct PageData {
    /// The chart's slots, oldest first.
    pub(crate) recent: Vec<Slot>,
    /// The last hour's sums.
    pub(crate) hour: Slot,
    /// The fullest queues.
    pub(crate) queues: Vec<QueueRow>,
    /// Queues not listed.
    pub(crate) more_queues: usize,
    /// The disk.
    pub(crate) disk: DiskState,
}

/// The handler.
pub(crate) async fn serve(State(state): State<AppState>) -> Response {
    let engine = std::sync::Arc::clone(&state.engine);
    // Walking the spool directory and listing the queues are blocking work.
    let data = crate::blocking::off_the_runtime(|| gather(&engine));
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        render(&data),
    )
        .into_response()
}

/// Reads the engine's state for the page.
fn gather(engine: &Engine) -> PageData {
    let now = now_ms();
    let (recent, hour) = engine.with_activity(|a| (a.recent(CHART_SLOTS, now), a.last_hour(now)));
    let backing_off: HashSet<String> = engine
        .backing_off()
        .into_iter()
        .map(|key| key.split('|').next().unwrap_or_default().to_owned())
        .collect();
    let mut destinations = engine.scheduler.destination_counts(now);
    destinations
        .sort_by_key(|(_, c)| std::cmp::Reverse(c.ready + c.scheduled + c.parked + c.in_flight));
    let more_queues = destinations.len().saturating_sub(MAX_ROWS);
    let queues = engine.with_activity(|activity| {
        destinations
            .iter()
            .take(MAX_ROWS)
            .map(|(queue, c)| {
                let domain = queue.name();
                let site = match engine.outbound.resolver.peek(domain) {
                    Some(Ok(dest)) => Some(dest.site.clone()),
                    _ => None,
                };
                let state = state_of(
                    c.suspended_until_ms.is_some_and(|until| until > now),
                    site.is_some_and(|s| backing_off.contains(&s)),
                    activity.is_greylisted(domain, now),
                );
                QueueRow {
                    destination: queue.to_string(),
                    counts: [c.ready, c.scheduled + c.parked, c.in_flight],
                    state,
                }
            })
            .collect()
    });
    let path = &engine.config.spool.path;
    PageData {
        recent,
        hour,
        queues,
        more_queues,
        disk: DiskState {
            path: path.display().to_string(),
            free_bytes: queue::free_bytes(path),
            spool_bytes: dir_bytes(path),
            messages: engine.scheduler.len(),
            writable: engine.spool.is_writable(),
        },
    }
}

/// A queue's state as the page names it; a hold outranks a backoff, which outranks
/// greylisting (the first says why nothing is sent at all, the last only why some waits).
fn state_of(suspended: bool, backing_off: bool, greylisted: bool) -> &'static str {
    if suspended {
        "suspended"
    } else if backing_off {
        "backoff"
    } else if greylisted {
        "greylisted"
    } else {
        "flowing"
    }
}

/// Bytes of the files under `dir` (the spool's database and logs; one level of
/// subdirectories is enough for RocksDB's layout, and symlinks are not followed).
fn dir_bytes(dir: &Path) -> u64 {
    fn walk(dir: &Path, depth: u32) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .filter_map(|e| Some((e.path(), e.metadata().ok()?)))
            .map(|(path, meta)| {
                if meta.is_dir() && depth < 3 {
                    walk(&path, depth + 1)
                } else if meta.is_file() {
                    meta.len()
                } else {
                    0
                }
            })
            .sum()
    }
    walk(dir, 0)
}

/// Text made safe for HTML element content and quoted attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}\
table{border-collapse:collapse}td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}\
td.n{text-align:right;font-variant-numeric:tabular-nums}\
.flowing{color:#176f2c}.backoff{color:#a05a00}.suspended{color:#b00020}.greylisted{color:#555}";

/// The page.
pub(crate) fn render(data: &PageData) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>Drover status</title><style>{STYLE}</style></head><body>\n\
         <h1>Drover status</h1>\n"
    );
    render_chart(&mut out, &data.recent);
    render_queues(&mut out, data);
    render_hour(&mut out, &data.hour);
    let d = &data.disk;
    let _ = write!(
        out,
        "<h2>Spool</h2>\n<table id=\"spool\">\
         <tr><th>path</th><td>{}</td></tr>\
         <tr><th>messages</th><td class=\"n\">{}</td></tr>\
         <tr><th>size on disk</th><td class=\"n\">{}</td></tr>\
         <tr><th>free disk</th><td class=\"n\">{}</td></tr>\
         <tr><th>writable</th><td>{}</td></tr></table>\n",
        escape(&d.path),
        d.messages,
        human_bytes(d.spool_bytes),
        d.free_bytes
            .map_or_else(|| "unknown".to_owned(), human_bytes),
        if d.writable {
            "yes"
        } else {
            "no (read-only after a storage error)"
        },
    );
    out.push_str("</body></html>\n");
    out
}

fn render_chart(out: &mut String, recent: &[Slot]) {
    const W: f64 = 600.0;
    const H: f64 = 150.0;
    let per_second = |n: u64| n as f64 / (SLOT_MS as f64 / 1000.0);
    let delivered: Vec<f64> = recent.iter().map(|s| per_second(s.delivered)).collect();
    let received: Vec<f64> = recent.iter().map(|s| per_second(s.received)).collect();
    let top = delivered
        .iter()
        .chain(&received)
        .fold(1.0f64, |m, v| m.max(*v));
    let points = |values: &[f64]| {
        let step = W / (values.len().max(2) - 1) as f64;
        values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * step, H - v / top * (H - 10.0)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let now_rate = delivered.last().copied().unwrap_or(0.0);
    let _ = write!(
        out,
        "<h2>Messages per second, last {} minutes</h2>\n\
         <p>Now: <span id=\"rate\">{now_rate:.1}</span>/s delivered \
         (<span style=\"color:#176f2c\">delivered</span>, \
         <span style=\"color:#1f5fbf\">received</span>; peak {top:.1}/s)</p>\n\
         <svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"messages per second\">\
         <rect width=\"{W}\" height=\"{H}\" fill=\"#f7f7f7\"/>\
         <polyline fill=\"none\" stroke=\"#1f5fbf\" stroke-width=\"1.5\" points=\"{}\"/>\
         <polyline fill=\"none\" stroke=\"#176f2c\" stroke-width=\"2\" points=\"{}\"/>\
         <text x=\"4\" y=\"12\" font-size=\"11\" fill=\"#666\">{top:.1}/s</text>\
         <text x=\"4\" y=\"{label_y}\" font-size=\"11\" fill=\"#666\">-{0} min</text>\
         <text x=\"{now_x}\" y=\"{label_y}\" font-size=\"11\" fill=\"#666\">now</text>\
         </svg>\n",
        recent.len() as u64 * SLOT_MS / 60_000,
        points(&received),
        points(&delivered),
        label_y = H - 4.0,
        now_x = W - 28.0,
    );
}

fn render_queues(out: &mut String, data: &PageData) {
    out.push_str(
        "<h2>Queues by destination</h2>\n<table id=\"queues\"><tr><th>destination</th>\
         <th>state</th><th>ready</th><th>scheduled</th><th>in flight</th></tr>\n",
    );
    if data.queues.is_empty() {
        out.push_str("<tr><td colspan=\"5\">No queued mail.</td></tr>\n");
    }
    for q in &data.queues {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"{state}\">{state}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            escape(&q.destination),
            q.counts[0],
            q.counts[1],
            q.counts[2],
            state = q.state,
        );
    }
    out.push_str("</table>\n");
    if data.more_queues > 0 {
        let _ = writeln!(out, "<p>and {} more destinations.</p>", data.more_queues);
    }
}

fn render_hour(out: &mut String, hour: &Slot) {
    let _ = write!(
        out,
        "<h2>Last hour</h2>\n<p>Received {}, delivered {}, deferred {}.</p>\n\
         <table id=\"bounces\"><tr><th>bounce category</th><th>count</th></tr>\n",
        hour.received, hour.delivered, hour.deferred
    );
    if hour.bounced.is_empty() {
        out.push_str("<tr><td colspan=\"2\">No bounces.</td></tr>\n");
    }
    for (category, n) in &hour.bounced {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{n}</td></tr>",
            escape(category)
        );
    }
    out.push_str(
        "</table>\n<table id=\"complaints\"><tr><th>complaint type</th><th>count</th></tr>\n",
    );
    if hour.complaints.is_empty() {
        out.push_str("<tr><td colspan=\"2\">No complaints.</td></tr>\n");
    }
    for (kind, n) in &hour.complaints {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{n}</td></tr>",
            escape(kind)
        );
    }
    out.push_str("</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_outside_is_escaped() {
        let data = PageData {
            queues: vec![QueueRow {
                destination: "<script>alert('x')</script>&.example".into(),
                counts: [1, 2, 3],
                state: "backoff",
            }],
            disk: DiskState {
                path: "/var/\"spool\"".into(),
                ..DiskState::default()
            },
            ..PageData::default()
        };
        let page = render(&data);
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;.example"));
        assert!(page.contains("/var/&quot;spool&quot;"));
        assert!(page.contains("class=\"backoff\">backoff<"));
        assert!(page.contains("http-equiv=\"refresh\""));
    }

    #[test]
    fn the_chart_has_a_point_per_slot_and_the_hour_its_counts() {
        let mut hour = Slot::default();
        hour.bounced.insert("bad-mailbox".into(), 7);
        hour.complaints.insert("abuse".into(), 2);
        let recent = (0..CHART_SLOTS as u64)
            .map(|i| Slot {
                start_ms: i * SLOT_MS,
                delivered: i,
                ..Slot::default()
            })
            .collect();
        let page = render(&PageData {
            recent,
            hour,
            ..PageData::default()
        });
        let chart = page.split("<svg").nth(1).unwrap();
        let delivered = chart.split("points=\"").nth(2).unwrap();
        let points = delivered.split('"').next().unwrap().split(' ').count();
        assert_eq!(points, CHART_SLOTS);
        assert!(page.contains("<td>bad-mailbox</td><td class=\"n\">7</td>"));
        assert!(page.contains("<td>abuse</td><td class=\"n\">2</td>"));
        assert!(page.contains("No queued mail."));
    }

    #[test]
    fn the_state_that_explains_most_wins() {
        assert_eq!(state_of(false, false, false), "flowing");
        assert_eq!(state_of(false, false, true), "greylisted");
        assert_eq!(state_of(false, true, true), "backoff");
        assert_eq!(state_of(true, true, true), "suspended");
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), [0u8; 100]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b"), [0u8; 50]).unwrap();
        assert_eq!(dir_bytes(dir.path()), 150);
        assert!(queue::free_bytes(dir.path()).is_some_and(|n| n > 0));
    }
}
