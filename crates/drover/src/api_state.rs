//! What the HTTP API's handlers share: the state they are given and the shape of an error
//! reply. Apart from `api` so that the modules around it (`http_guard`, `kumo_admin`) need
//! not import the router that imports them.

use crate::engine::Engine;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::sync::Arc;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Set on SIGTERM before the engine drains: `/readyz` answers 503 while work is still
    /// accepted, for `http.shutdown_grace`.
    pub leaving: Arc<std::sync::atomic::AtomicBool>,
}

/// An error reply: `{"error": message}` with `status`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// 503 with `Retry-After`: the engine cannot take the call now.
pub(crate) fn unavailable(message: impl Into<String>) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
    r
}
