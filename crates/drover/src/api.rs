//! The HTTP API: injection, admin, `/metrics`, `/healthz`, `/readyz` (contract §3).

use crate::clock::now_ms;
use crate::engine::EngineError;
use crate::http_guard::Body;
use crate::request::{ExpandError, Refusal, Stage};
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
            "/api/admin/v1/drain",
            post(crate::drain_api::start)
                .get(crate::drain_api::status)
                .delete(crate::drain_api::cancel),
        )
        .route("/api/admin/v1/transfer", post(crate::drain_api::transfer))
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
        .route("/api/admin/xfer/v1", post(crate::kumo_admin::xfer))
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
    /// The stored request's id when it is expanded later (`deferred_generation`; Drover
    /// extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_id: Option<String>,
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

/// The answer to a spool that would not take the request.
fn refused_by_engine(e: EngineError) -> Response {
    match e {
        EngineError::Draining => unavailable("shutting down"),
        EngineError::Full(n) => {
            unavailable(format!("the queue is full ({n} messages); retry later"))
        }
        e => {
            tracing::error!(error = %e, "injection failed");
            unavailable(format!("the spool cannot accept messages now: {e}"))
        }
    }
}

async fn inject(
    State(state): State<AppState>,
    client: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    Body(body): Body,
) -> Response {
    if state.engine.is_draining() {
        return unavailable("shutting down");
    }
    let client = client.map(|c| c.0 .0.ip());
    let mut request = match crate::request::check(&body, state.engine.config(), Stage::Door) {
        Ok(r) => r,
        Err(Refusal::Invalid(why)) => return error(StatusCode::BAD_REQUEST, why),
        Err(Refusal::Unprocessable(why)) => return error(StatusCode::UNPROCESSABLE_ENTITY, why),
        Err(Refusal::TooLarge(why)) => return error(StatusCode::PAYLOAD_TOO_LARGE, why),
    };
    if request.deferred {
        return defer(&state, &request, &body, client).await;
    }
    let recipients = std::mem::take(&mut request.recipients);
    match state
        .engine
        .expand(&request, recipients, client, None)
        .await
    {
        Ok(expanded) if expanded.none_valid() => {
            no_valid_recipient(expanded.failed_recipients, expanded.errors)
        }
        Ok(expanded) => Json(InjectReply {
            success_count: expanded.ids.len(),
            fail_count: expanded.failed_recipients.len(),
            failed_recipients: expanded.failed_recipients,
            errors: expanded.errors,
            ids: expanded.ids,
            generation_id: None,
        })
        .into_response(),
        // Should the list be unreadable, nothing is queued: mail to an address that asked for
        // none is worse than a retry.
        Err(ExpandError::Suppression(e)) => {
            tracing::error!(error = %e, "cannot read the suppression list");
            unavailable("the suppression list cannot be read now")
        }
        Err(ExpandError::Accept(e)) => refused_by_engine(e),
    }
}

/// KumoMTA's `deferred_generation`: the request is stored (synced) and expanded later by the
/// generator; the answer counts no success (as KumoMTA's), only the recipients refused at
/// once for their address.
async fn defer(
    state: &AppState,
    request: &crate::request::Checked,
    body: &[u8],
    client: Option<std::net::IpAddr>,
) -> Response {
    let mut failed_recipients = Vec::new();
    let mut errors = Vec::new();
    for r in &request.recipients {
        if let Err(why) = crate::message::envelope_address(&r.email) {
            errors.push(format!("{}: {why}", r.email));
            failed_recipients.push(r.email.clone());
        }
    }
    if failed_recipients.len() == request.recipients.len() {
        return no_valid_recipient(failed_recipients, errors);
    }
    match state.engine.defer(body, client).await {
        Ok(id) => Json(InjectReply {
            success_count: 0,
            fail_count: failed_recipients.len(),
            failed_recipients,
            errors,
            ids: Vec::new(),
            generation_id: Some(id.to_string()),
        })
        .into_response(),
        Err(e) => refused_by_engine(e),
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
    if state.engine.is_draining() || state.leaving.load(std::sync::atomic::Ordering::SeqCst) {
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
