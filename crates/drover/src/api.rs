//! The HTTP API: injection, admin, `/metrics`, `/healthz`, `/readyz` (contract §3).

use crate::clock::now_ms;
use crate::engine::{EngineError, Unsignable};
use crate::http_guard::Body;
use crate::message::{prepare, InjectRequest, Origin, Prepared, Renderer};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use queue::{Selector, Suppression, SuppressionKey};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;

pub use crate::api_state::AppState;
use crate::api_state::{error, unavailable};

/// The router with every route.
pub fn router(state: AppState) -> Router {
    let limit = state.engine.config().http.max_body_size;
    Router::new()
        .route("/api/inject/v1", post(inject))
        .route("/api/admin/v1/queues", get(queues))
        .route("/api/admin/v1/suspensions", get(suspensions))
        .route("/api/admin/v1/webhooks", get(webhooks))
        .route("/api/admin/v1/suspend", post(suspend))
        .route("/api/admin/v1/resume", post(resume))
        .route("/api/admin/v1/retry", post(retry))
        .route("/api/admin/v1/purge", post(purge))
        .route(
            "/api/admin/v1/suppressions",
            get(list_suppressions).post(add_suppressions),
        )
        .route(
            "/api/admin/v1/suppressions/remove",
            post(remove_suppressions),
        )
        .route("/metrics", get(metrics))
        .route("/", get(crate::status_page::serve))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/openapi.json", get(crate::openapi::serve))
        // KumoMTA's admin endpoints, for scripts written against it.
        .route(
            "/api/admin/suspend/v1",
            post(crate::kumo_admin::suspend)
                .get(crate::kumo_admin::list)
                .delete(crate::kumo_admin::cancel),
        )
        .route("/api/admin/bounce/v1", post(crate::kumo_admin::bounce))
        // Before any body is read: an unauthenticated client gets 401, not a buffered upload.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::http_guard::require_token,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

#[derive(Serialize)]
struct InjectReply {
    success_count: usize,
    fail_count: usize,
    failed_recipients: Vec<String>,
    errors: Vec<String>,
    /// Queued message ids, in the order of the accepted recipients (Drover extension).
    ids: Vec<String>,
}

fn no_valid_recipient(failed_recipients: Vec<String>, errors: Vec<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({
            "error": "no valid recipient",
            "fail_count": failed_recipients.len(),
            "failed_recipients": failed_recipients,
            "errors": errors,
        })),
    )
        .into_response()
}

async fn inject(
    State(state): State<AppState>,
    client: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    Body(body): Body,
) -> Response {
    if state.engine.is_draining() {
        return unavailable("shutting down");
    }
    let request: InjectRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid request body: {e}"),
            )
        }
    };
    let sender = match crate::message::ascii_domain(request.envelope_sender.trim()) {
        Ok(sender) => sender.into_owned(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("envelope_sender: {e}")),
    };
    if !sender.is_empty() {
        if let Err(e) = smtp_proto::validate_mailbox(&sender) {
            return error(StatusCode::BAD_REQUEST, format!("envelope_sender: {e}"));
        }
    }
    if request.recipients.is_empty() {
        return error(StatusCode::BAD_REQUEST, "recipients: no recipient given");
    }
    let max_recipients = state.engine.config().http.max_recipients;
    if request.recipients.len() > max_recipients {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "recipients: {} given, at most {max_recipients} per request (http.max_recipients)",
                request.recipients.len()
            ),
        );
    }
    let sender_domain = sender
        .rsplit_once('@')
        .map(|(_, d)| d.to_owned())
        .unwrap_or_else(|| "drover.invalid".to_owned());
    let max_size = state.engine.config().smtp_listener.max_message_size;
    let InjectRequest {
        content,
        mut recipients,
        substitutions,
        campaign,
        tenant,
        priority,
        template_dialect,
        trace_headers,
        ..
    } = request;
    let renderer = match Renderer::with_dialect(
        content,
        usize::try_from(max_size).unwrap_or(usize::MAX),
        template_dialect,
    ) {
        Ok(r) => r,
        // As KumoMTA: a template that does not compile is 422, a bad field 400.
        Err(e) if e.syntax => {
            return error(StatusCode::UNPROCESSABLE_ENTITY, format!("content: {e}"))
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("content: {e}")),
    };
    // Domains in Unicode become A-labels first, so the suppression list and the records see
    // the address that goes on the envelope (an invalid one is refused by `prepare`).
    for r in &mut recipients {
        if let Ok(std::borrow::Cow::Owned(ascii)) = crate::message::ascii_domain(r.email.trim()) {
            r.email = ascii;
        }
    }
    // Suppressed recipients are refused before anything is rendered for them. Should the
    // list be unreadable, nothing is queued: mail to an address that asked for none is worse
    // than a retry.
    let (recipients, suppressed) = match state
        .engine
        .split_suppressed(tenant.as_deref(), recipients, |r| r.email.as_str())
        .await
    {
        Ok(split) => split,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the suppression list");
            return unavailable("the suppression list cannot be read now");
        }
    };
    if !suppressed.is_empty() {
        metrics::counter!(crate::telemetry::SUPPRESSED, "via" => "http")
            .increment(suppressed.len() as u64);
    }
    let suppressed_count = suppressed.len();
    let (suppressed_recipients, suppressed_errors): (Vec<String>, Vec<String>) = suppressed
        .into_iter()
        .map(|(r, entry)| {
            let why = format!("{}: suppressed ({})", r.email, entry.source);
            (r.email, why)
        })
        .unzip();
    if recipients.is_empty() {
        // Every recipient is suppressed: a valid request that queues nothing.
        return Json(InjectReply {
            success_count: 0,
            fail_count: suppressed_count,
            failed_recipients: suppressed_recipients,
            errors: suppressed_errors,
            ids: Vec::new(),
        })
        .into_response();
    }
    let origin = Origin {
        sender,
        campaign,
        tenant,
        received_ms: now_ms(),
        priority,
        // KumoMTA's per-request switch: no Received header at all when asked.
        door: trace_headers.received_header.then(|| {
            Arc::new(crate::prepare::Door::Http {
                client: client.map(|c| c.0 .0.ip()),
            })
        }),
    };
    // Rendering a large batch takes a while: the runtime moves its other tasks off this
    // thread meanwhile. Not a blocking-pool task: the bodies are allocated on a thread that
    // keeps allocating (a worker), so their memory is reused instead of stranded in the heaps
    // of idle pool threads (measured at 100 KB: +20 % CPU and +200 MB RSS that way).
    let prepared = crate::blocking::off_the_runtime(|| {
        prepare(
            &renderer,
            &substitutions,
            &recipients,
            &origin,
            &sender_domain,
            max_size,
        )
    });
    let Prepared {
        mut messages,
        mut failed_recipients,
        mut errors,
    } = prepared;
    failed_recipients.extend(suppressed_recipients);
    errors.extend(suppressed_errors);
    if messages.is_empty() {
        return no_valid_recipient(failed_recipients, errors);
    }
    // A message that cannot be DKIM-signed fails its recipient only; the others are
    // accepted (signing outcomes do not change on a second try, so this loops at most twice).
    let result = loop {
        let ids: Vec<String> = messages.iter().map(|m| m.meta.id.to_string()).collect();
        match state.engine.accept(messages, "http").await {
            Err(EngineError::Unsignable(unsignable)) => {
                let Unsignable {
                    failures,
                    messages: batch,
                } = *unsignable;
                let mut refused = vec![false; batch.len()];
                for (i, e) in failures {
                    if let Some(m) = batch.get(i) {
                        refused[i] = true;
                        failed_recipients.push(m.meta.recipient.clone());
                        errors.push(format!("{}: DKIM signing failed: {e}", m.meta.recipient));
                    }
                }
                messages = batch
                    .into_iter()
                    .zip(refused)
                    .filter_map(|(m, refused)| (!refused).then_some(m))
                    .collect();
                if messages.is_empty() {
                    return no_valid_recipient(failed_recipients, errors);
                }
            }
            other => break other.map(|()| ids),
        }
    };
    match result {
        Ok(ids) => Json(InjectReply {
            success_count: ids.len(),
            fail_count: failed_recipients.len(),
            failed_recipients,
            errors,
            ids,
        })
        .into_response(),
        Err(EngineError::Draining) => unavailable("shutting down"),
        Err(EngineError::Full(n)) => {
            unavailable(format!("the queue is full ({n} messages); retry later"))
        }
        Err(e) => {
            tracing::error!(error = %e, "injection failed");
            unavailable(format!("the spool cannot accept messages now: {e}"))
        }
    }
}

#[derive(serde::Deserialize)]
struct QueuesQuery {
    /// Also list each destination's ready mail by tenant, campaign and priority.
    #[serde(default)]
    groups: bool,
}

async fn queues(State(state): State<AppState>, Query(q): Query<QueuesQuery>) -> Response {
    let now = now_ms();
    let scheduler = state.engine.scheduler();
    let destinations: Vec<_> = scheduler
        .destinations(now)
        .into_iter()
        .map(|(name, c)| {
            let mut d = json!({
                "destination": name.to_string(),
                "ready": c.ready,
                "scheduled": c.scheduled,
                "in_flight": c.in_flight,
                "parked": c.parked,
                "oldest_age_seconds": c.oldest_received_ms.map(|r| now.saturating_sub(r) / 1000),
                "suspended_until": c.suspended_until_ms.map(rfc3339),
            });
            if q.groups && c.ready > 0 {
                d["groups"] = json!(scheduler.groups(&name));
            }
            d
        })
        .collect();
    let totals = scheduler.totals();
    let [high, normal, low] = scheduler.ready_by_priority();
    Json(json!({
        "destinations": destinations,
        "totals": {"ready": totals.ready, "scheduled": totals.scheduled, "in_flight": totals.in_flight, "parked": totals.parked},
        "ready_by_priority": {"high": high, "normal": normal, "low": low},
        "webhooks": state.engine.webhook_statuses(),
    }))
    .into_response()
}

/// `GET /api/admin/v1/webhooks`: each `[[webhook]]`'s cursor, lag and last error.
async fn webhooks(State(state): State<AppState>) -> Response {
    Json(json!({ "webhooks": state.engine.webhook_statuses() })).into_response()
}

/// `None` for "until resumed".
fn rfc3339(ms: u64) -> Option<String> {
    if ms == u64::MAX {
        return None;
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
}

/// Body of the admin actions: exactly one of `domain` and `campaign`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminTarget {
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    campaign: Option<String>,
    /// For suspend: how long (`"2h"`); absent = until resumed.
    #[serde(default)]
    duration: Option<String>,
}

fn bad(status: StatusCode, message: impl Into<String>) -> Box<Response> {
    Box::new(error(status, message))
}

/// The JSON body of an admin call (its token was checked before it was read): 400 when the
/// body is not what the call takes.
fn admin_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        bad(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

fn admin_target(body: &Bytes) -> Result<(Selector, Option<std::time::Duration>), Box<Response>> {
    let target: AdminTarget = admin_body(body)?;
    let selector = crate::admin::selector(target.domain.as_deref(), target.campaign.as_deref())
        .map_err(|why| bad(StatusCode::BAD_REQUEST, why))?;
    let duration = crate::admin::duration(target.duration.as_deref())
        .map_err(|why| bad(StatusCode::BAD_REQUEST, why))?;
    Ok((selector, duration))
}

fn selector_json(selector: &Selector) -> serde_json::Value {
    match selector {
        Selector::Domain(d) => json!({"domain": d}),
        Selector::Campaign(c) => json!({"campaign": c}),
    }
}

async fn suspend(State(state): State<AppState>, Body(body): Body) -> Response {
    let (selector, duration) = match admin_target(&body) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match state.engine.suspend(&selector, duration).await {
        Ok(until) => {
            let mut reply = selector_json(&selector);
            reply["suspended_until"] = json!(rfc3339(until));
            Json(reply).into_response()
        }
        Err(e) => unavailable(e.to_string()),
    }
}

async fn resume(State(state): State<AppState>, Body(body): Body) -> Response {
    let (selector, _) = match admin_target(&body) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match state.engine.resume(&selector).await {
        Ok(was) => {
            let mut reply = selector_json(&selector);
            reply["was_suspended"] = json!(was);
            Json(reply).into_response()
        }
        Err(e) => unavailable(e.to_string()),
    }
}

async fn retry(State(state): State<AppState>, Body(body): Body) -> Response {
    let (selector, _) = match admin_target(&body) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let count = state.engine.retry_now(&selector);
    let mut reply = selector_json(&selector);
    reply["rescheduled"] = json!(count);
    Json(reply).into_response()
}

async fn purge(State(state): State<AppState>, Body(body): Body) -> Response {
    let (selector, _) = match admin_target(&body) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match state.engine.purge(&selector).await {
        Ok(count) => {
            let mut reply = selector_json(&selector);
            reply["purged"] = json!(count);
            Json(reply).into_response()
        }
        Err(e) => unavailable(e.to_string()),
    }
}

async fn suspensions(State(state): State<AppState>) -> Response {
    let list: Vec<_> = state
        .engine
        .scheduler()
        .suspensions(now_ms())
        .into_iter()
        .map(|(selector, until)| {
            let mut v = selector_json(&selector);
            v["suspended_until"] = json!(rfc3339(until));
            v
        })
        .collect();
    Json(json!({ "suspensions": list, "backoff": state.engine.backing_off() })).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    state.engine.refresh_scrape_gauges();
    let mut text = state.metrics.render();
    // Listing the queues for the per-site depths is blocking work.
    crate::blocking::off_the_runtime(|| state.engine.site_metrics.render(&state.engine, &mut text));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.engine.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if state.engine.is_reloading() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "reloading the spool (delivering meanwhile)\n",
        )
            .into_response()
    } else if !state.engine.spool_writable() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "spool read-only after a storage error (disk full?)\n",
        )
            .into_response()
    } else {
        "ready\n".into_response()
    }
}

/// Most entries one listing page returns.
const MAX_SUPPRESSION_PAGE: usize = 10_000;

#[derive(serde::Deserialize)]
struct SuppressionQuery {
    /// The tenant whose list to show; unset: the list of mail without a tenant.
    tenant: Option<String>,
    /// Every tenant's entries.
    #[serde(default)]
    all: bool,
    /// Resume after this entry: the `next` of the previous page.
    after: Option<String>,
    limit: Option<usize>,
}

#[derive(serde::Deserialize)]
struct SuppressionEntry {
    tenant: Option<String>,
    address: String,
    #[serde(default)]
    reason: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SuppressionBatch {
    entries: Vec<SuppressionEntry>,
}

fn suppression_json(key: &SuppressionKey, entry: &Suppression) -> serde_json::Value {
    json!({
        "tenant": key.tenant,
        "address": key.address,
        "source": entry.source,
        "reason": entry.reason,
        "at": rfc3339(entry.at_ms),
        "message_id": entry.message_id,
    })
}

/// `tenant`, `0`, `address` as one cursor string (the `next` of a page).
fn page_cursor(key: &SuppressionKey) -> String {
    format!(
        "{}\u{1f}{}",
        key.tenant.as_deref().unwrap_or(""),
        key.address
    )
}

async fn list_suppressions(
    State(state): State<AppState>,
    Query(q): Query<SuppressionQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(1_000).clamp(1, MAX_SUPPRESSION_PAGE);
    let after = q.after.as_deref().map(|c| match c.split_once('\u{1f}') {
        Some((tenant, address)) => SuppressionKey::new(Some(tenant), address),
        None => SuppressionKey::new(q.tenant.as_deref(), c),
    });
    let engine = Arc::clone(&state.engine);
    let tenant = q.tenant.clone();
    let page = tokio::task::spawn_blocking(move || {
        engine.suppressions(tenant.as_deref(), q.all, after.as_ref(), limit)
    })
    .await;
    match page {
        Ok(Ok(entries)) => {
            let next = (entries.len() == limit)
                .then(|| entries.last().map(|(k, _)| page_cursor(k)))
                .flatten();
            Json(json!({
                "entries": entries.iter().map(|(k, e)| suppression_json(k, e)).collect::<Vec<_>>(),
                "next": next,
            }))
            .into_response()
        }
        Ok(Err(e)) => unavailable(e.to_string()),
        Err(e) => unavailable(e.to_string()),
    }
}

/// The entries of a suppression request, checked: every address a mailbox, no tenant with
/// a control character.
fn suppression_batch(body: &Bytes) -> Result<Vec<(SuppressionKey, String)>, Box<Response>> {
    let batch: SuppressionBatch = admin_body(body)?;
    if batch.entries.is_empty() {
        return Err(bad(StatusCode::BAD_REQUEST, "entries: none given"));
    }
    batch
        .entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let address = e.address.trim();
            smtp_proto::validate_mailbox(address).map_err(|err| {
                bad(
                    StatusCode::BAD_REQUEST,
                    format!("entries[{i}].address: {err}"),
                )
            })?;
            if e.tenant
                .as_deref()
                .is_some_and(|t| t.chars().any(char::is_control))
            {
                return Err(bad(
                    StatusCode::BAD_REQUEST,
                    format!("entries[{i}].tenant: control characters"),
                ));
            }
            Ok((SuppressionKey::new(e.tenant.as_deref(), address), e.reason))
        })
        .collect()
}

async fn add_suppressions(State(state): State<AppState>, Body(body): Body) -> Response {
    let batch = match suppression_batch(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let now = now_ms();
    let count = batch.len();
    let entries = batch
        .into_iter()
        .map(|(key, reason)| {
            (
                key,
                Suppression {
                    source: "admin".into(),
                    reason,
                    at_ms: now,
                    message_id: None,
                },
            )
        })
        .collect();
    match state.engine.suppress(entries).await {
        Ok(()) => Json(json!({ "added": count })).into_response(),
        Err(e) => unavailable(e.to_string()),
    }
}

async fn remove_suppressions(State(state): State<AppState>, Body(body): Body) -> Response {
    let batch = match suppression_batch(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let keys: Vec<SuppressionKey> = batch.into_iter().map(|(k, _)| k).collect();
    // How many were on the list, per tenant one batched read.
    let mut by_tenant: std::collections::BTreeMap<Option<String>, Vec<String>> =
        std::collections::BTreeMap::new();
    for k in &keys {
        by_tenant
            .entry(k.tenant.clone())
            .or_default()
            .push(k.address.clone());
    }
    let mut removed = 0;
    for (tenant, addresses) in &by_tenant {
        match state.engine.suppressed(tenant.as_deref(), addresses).await {
            Ok(found) => removed += found.iter().filter(|f| f.is_some()).count(),
            Err(e) => return unavailable(e.to_string()),
        }
    }
    match state.engine.unsuppress(keys).await {
        Ok(()) => Json(json!({ "removed": removed })).into_response(),
        Err(e) => unavailable(e.to_string()),
    }
}
