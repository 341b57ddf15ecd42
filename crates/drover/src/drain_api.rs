//! The admin API of drains: `POST|GET|DELETE /api/admin/v1/drain` (start, watch, cancel a
//! drain of this engine to a peer) and `POST /api/admin/v1/transfer` (the peer's side: the
//! messages a drain moves here). See `drain` for what they do.

use crate::api_state::{error, unavailable, AppState};
use crate::drain::{DrainSpec, TransferRequest};
use crate::engine::EngineError;
use crate::http_guard::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use queue::Filter;
use serde::Deserialize;
use serde_json::json;

/// `POST /api/admin/v1/drain`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    /// The peer's base URL.
    to: String,
    /// The peer's API token; absent: `[drain] peer_token_file`, if set.
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    campaign: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// A filter from an operator's request: empty names count as absent, domains are lower-case.
pub(crate) fn filter(
    domain: Option<String>,
    campaign: Option<String>,
    tenant: Option<String>,
) -> Filter {
    let given = |v: Option<String>| v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    Filter {
        domain: given(domain).map(|d| d.to_ascii_lowercase()),
        campaign: given(campaign),
        tenant: given(tenant),
    }
}

/// The peer token when the request has none: `[drain] peer_token_file`.
pub(crate) fn configured_token(state: &AppState) -> Result<Option<String>, Box<Response>> {
    state
        .engine
        .config()
        .drain
        .peer_token()
        .map_err(|e| Box::new(unavailable(e.to_string())))
}

/// A drain's start, answered in the shape of the admin API.
pub(crate) fn start_error(e: EngineError) -> Response {
    match e {
        EngineError::Refused(why) => error(StatusCode::BAD_REQUEST, why),
        EngineError::Busy(why) => error(StatusCode::CONFLICT, why),
        other => unavailable(other.to_string()),
    }
}

/// `POST /api/admin/v1/drain` → the drain's status.
pub(crate) async fn start(State(state): State<AppState>, Body(body): Body) -> Response {
    let request: DrainRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid request body: {e}"),
            )
        }
    };
    let token = match request.token {
        Some(t) => Some(t),
        None => match configured_token(&state) {
            Ok(t) => t,
            Err(r) => return *r,
        },
    };
    let spec = DrainSpec {
        to: request.to.trim().to_owned(),
        token,
        filter: filter(request.domain, request.campaign, request.tenant),
        reason: request.reason.unwrap_or_default(),
    };
    match start_detached(&state, spec).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => start_error(e),
    }
}

/// Starts a drain in a task of its own, so a client that goes away cannot stop it between
/// storing the drain and running it.
pub(crate) async fn start_detached(
    state: &AppState,
    spec: DrainSpec,
) -> Result<crate::drain::DrainStatus, EngineError> {
    let engine = std::sync::Arc::clone(&state.engine);
    tokio::spawn(async move { engine.start_drain(spec).await })
        .await
        .unwrap_or_else(|e| Err(EngineError::Config(format!("drain task failed: {e}"))))
}

/// `GET /api/admin/v1/drain` → the drain's status.
pub(crate) async fn status(State(state): State<AppState>) -> Response {
    Json(state.engine.drain_status()).into_response()
}

/// `DELETE /api/admin/v1/drain` → `{"cancelled": bool}`.
pub(crate) async fn cancel(State(state): State<AppState>) -> Response {
    match state.engine.cancel_drain().await {
        Ok(was) => Json(json!({ "cancelled": was })).into_response(),
        Err(e) => unavailable(e.to_string()),
    }
}

/// `POST /api/admin/v1/transfer` → `{"received", "already"}`.
pub(crate) async fn transfer(State(state): State<AppState>, Body(body): Body) -> Response {
    let request: TransferRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid request body: {e}"),
            )
        }
    };
    // In a task of its own: the server drops a handler whose client goes away (a sender
    // killed mid-request), and stopping between the spool write and the queueing would leave
    // messages stored here but neither queued nor recorded until the next start.
    let engine = std::sync::Arc::clone(&state.engine);
    let taken = tokio::spawn(async move { engine.take_transfer(request).await })
        .await
        .unwrap_or_else(|e| Err(EngineError::Config(format!("transfer task failed: {e}"))));
    match taken {
        Ok(reply) => Json(reply).into_response(),
        Err(EngineError::Refused(why)) => error(StatusCode::BAD_REQUEST, why),
        Err(EngineError::Draining) => unavailable("draining: this engine takes no messages"),
        Err(EngineError::Full(n)) => {
            unavailable(format!("the queue is full ({n} messages); retry later"))
        }
        Err(e) => {
            tracing::error!(error = %e, "transfer in failed");
            unavailable(format!("the spool cannot accept messages now: {e}"))
        }
    }
}
