//! KumoMTA's admin endpoints that operators script against, mapped onto Drover's own:
//! `/api/admin/suspend/v1` (POST to hold, GET to list, DELETE by id to lift) and
//! `/api/admin/bounce/v1` (a purge: every matching queued message ends with an
//! `AdminBounce` record), `/api/admin/xfer/v1` (a drain of the matching messages to another
//! instance, see `drain`). Request and reply shapes are KumoMTA's.
//!
//! A Drover hold is keyed by its domain or campaign, so its id is derived from that key: the
//! same hold always has the same id, and a DELETE finds it without a table of ids.

use crate::api_state::{error, AppState};
use crate::clock::now_ms;
use crate::http_guard::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use queue::Selector;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

/// KumoMTA's `SuspendV1Request` and `BounceV1Request` (the fields Drover can act on).
#[derive(Debug, Deserialize)]
struct Request {
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    campaign: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    /// A humantime duration, e.g. `"2h"`.
    #[serde(default)]
    duration: Option<String>,
}

impl Request {
    /// The one domain or campaign it names. KumoMTA also matches by tenant and by
    /// combinations; Drover's holds and purges are by domain or by campaign.
    fn selector(&self) -> Result<Selector, Refusal> {
        if self.tenant.is_some() {
            return Err(
                "tenant: Drover suspends and bounces by domain or by campaign, not by tenant"
                    .into(),
            );
        }
        crate::admin::selector(self.domain.as_deref(), self.campaign.as_deref())
    }

    fn duration(&self) -> Result<Option<std::time::Duration>, Refusal> {
        crate::admin::duration(self.duration.as_deref())
    }
}

/// Why a request is refused (400).
type Refusal = String;

fn parse(body: &[u8]) -> Result<Request, Refusal> {
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
}

fn bad(why: Refusal) -> Response {
    error(StatusCode::BAD_REQUEST, why)
}

/// The id of the hold of `selector` (a UUID made from its key).
fn hold_id(selector: &Selector) -> String {
    let key = match selector {
        Selector::Domain(d) => format!("domain:{d}"),
        Selector::Campaign(c) => format!("campaign:{c}"),
    };
    let digest = Sha256::digest(key.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// `POST /api/admin/suspend/v1` → `{"id"}`.
pub(crate) async fn suspend(State(state): State<AppState>, Body(body): Body) -> Response {
    let request = match parse(&body) {
        Ok(r) => r,
        Err(why) => return bad(why),
    };
    let (selector, duration) = match request
        .selector()
        .and_then(|s| Ok((s, request.duration()?)))
    {
        Ok(v) => v,
        Err(why) => return bad(why),
    };
    match state.engine.suspend(&selector, duration).await {
        Ok(_) => {
            tracing::info!(
                ?selector,
                reason = request.reason.as_deref().unwrap_or(""),
                "suspended through the KumoMTA admin API"
            );
            Json(json!({ "id": hold_id(&selector) })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `GET /api/admin/suspend/v1` → `[{"id", "domain", "campaign", "tenant", "reason", "duration"}]`.
pub(crate) async fn list(State(state): State<AppState>) -> Response {
    let now = now_ms();
    let entries: Vec<_> = state
        .engine
        .scheduler()
        .suspensions(now)
        .into_iter()
        .map(|(selector, until)| {
            let left = if until == u64::MAX {
                "until resumed".to_owned()
            } else {
                humantime::format_duration(std::time::Duration::from_secs(
                    until.saturating_sub(now) / 1000,
                ))
                .to_string()
            };
            let (domain, campaign) = match &selector {
                Selector::Domain(d) => (Some(d.clone()), None),
                Selector::Campaign(c) => (None, Some(c.clone())),
            };
            json!({
                "id": hold_id(&selector),
                "domain": domain,
                "campaign": campaign,
                "tenant": null,
                "reason": "",
                "duration": left,
            })
        })
        .collect();
    Json(entries).into_response()
}

#[derive(Debug, Deserialize)]
struct CancelRequest {
    id: String,
}

/// `DELETE /api/admin/suspend/v1` with `{"id"}`: 200 when lifted, 404 when no hold has it.
pub(crate) async fn cancel(State(state): State<AppState>, Body(body): Body) -> Response {
    let request: CancelRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid request body: {e}"),
            )
        }
    };
    let Ok(id) = uuid::Uuid::parse_str(request.id.trim()) else {
        return error(StatusCode::BAD_REQUEST, "id: not a UUID");
    };
    let id = id.hyphenated().to_string();
    let held = state.engine.scheduler().suspensions(now_ms());
    let Some((selector, _)) = held.into_iter().find(|(s, _)| hold_id(s) == id) else {
        return error(
            StatusCode::NOT_FOUND,
            "no suspension has this id (it expired, was lifted, or never existed)",
        );
    };
    match state.engine.resume(&selector).await {
        Ok(_) => Json(json!({ "id": id })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `POST /api/admin/bounce/v1` → `{"id", "bounced": {<domain or campaign>: n}, "total_bounced"}`.
pub(crate) async fn bounce(State(state): State<AppState>, Body(body): Body) -> Response {
    let request = match parse(&body) {
        Ok(r) => r,
        Err(why) => return bad(why),
    };
    if request.duration.is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "duration: Drover bounces what is queued now; a standing bounce rule is not supported",
        );
    }
    let selector = match request.selector() {
        Ok(s) => s,
        Err(why) => return bad(why),
    };
    match state.engine.purge(&selector).await {
        Ok(count) => {
            tracing::info!(
                ?selector,
                count,
                reason = request.reason.as_deref().unwrap_or(""),
                "bounced through the KumoMTA admin API"
            );
            Json(json!({
                "id": uuid::Uuid::now_v7().hyphenated().to_string(),
                "bounced": { selector_name(&selector): count },
                "total_bounced": count,
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// KumoMTA's `XferV1Request` (its `protocol` flattened: `target`).
#[derive(Debug, Deserialize)]
struct XferRequest {
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    campaign: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    routing_domain: Option<String>,
    reason: String,
    #[serde(default)]
    queue_names: Vec<String>,
    /// The peer's HTTP base URL.
    target: String,
}

/// `POST /api/admin/xfer/v1` → `{}`: the matching queued messages (every one when no
/// domain, campaign or tenant is given) move to `target`, each ending here with a `Transfer`
/// record (KumoMTA writes `AdminRebind`). The move runs in the background, as KumoMTA's does;
/// `GET /api/admin/v1/drain` shows it. The peer token is `[drain] peer_token_file`.
pub(crate) async fn xfer(State(state): State<AppState>, Body(body): Body) -> Response {
    let request: XferRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(format!("invalid request body: {e}")),
    };
    if request.routing_domain.is_some() {
        return bad("routing_domain: Drover queues by recipient domain; use domain".into());
    }
    if !request.queue_names.is_empty() {
        return bad("queue_names: select by domain, campaign and tenant".into());
    }
    let token = match crate::drain_api::configured_token(&state) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let spec = crate::drain::DrainSpec {
        to: request.target.trim().to_owned(),
        token,
        filter: crate::drain_api::filter(request.domain, request.campaign, request.tenant),
        reason: request.reason,
    };
    match crate::drain_api::start_detached(&state, spec).await {
        Ok(status) => {
            tracing::info!(to = ?status.to, filter = ?status.filter, "xfer through the KumoMTA admin API");
            Json(json!({})).into_response()
        }
        Err(e) => crate::drain_api::start_error(e),
    }
}

fn selector_name(selector: &Selector) -> String {
    match selector {
        Selector::Domain(d) => d.clone(),
        Selector::Campaign(c) => c.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_keeps_its_id_and_requests_name_one_selector() {
        // docs/openapi.yaml's DELETE example lifts the hold its POST example makes.
        assert_eq!(
            hold_id(&Selector::Domain("example.test".into())),
            "e054449b-d4e5-40ef-ab8b-01b193c3decf"
        );
        let a = hold_id(&Selector::Domain("example.com".into()));
        assert_eq!(a, hold_id(&Selector::Domain("example.com".into())));
        assert_ne!(a, hold_id(&Selector::Campaign("example.com".into())));
        let req = |v: serde_json::Value| parse(v.to_string().as_bytes()).unwrap();
        assert!(req(json!({"domain": "Example.COM", "reason": "x"}))
            .selector()
            .is_ok_and(|s| s == Selector::Domain("example.com".into())));
        assert!(req(json!({"tenant": "t", "reason": "x"}))
            .selector()
            .is_err());
        assert!(req(json!({"domain": "a", "campaign": "b"}))
            .selector()
            .is_err());
        assert!(req(json!({"reason": "x"})).selector().is_err());
        assert!(req(json!({"domain": "a", "duration": "soon"}))
            .duration()
            .is_err());
    }
}
