//! The one-click unsubscribe door (RFC 8058, contract §3): the `https:` URL stamped into
//! `List-Unsubscribe` lands here. Meant to face the internet, so it serves nothing else and
//! needs no API token; its URLs carry a keyed tag, and a forged or unknown one is a 404 with
//! nothing recorded. A `GET` (a person clicking, or a link scanner) only shows a page with a
//! button; only the `POST` unsubscribes.

use crate::engine::Engine;
use crate::inbound::UnsubscribeError;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

/// The router: any path whose last segment is a token (the stamped URL's base is the
/// operator's choice).
pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/{*path}", get(page).post(unsubscribe))
        // A one-click body is 26 bytes; a form with a few fields is well under this.
        .layer(DefaultBodyLimit::max(16 * 1024))
        .with_state(engine)
}

fn token(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or("")
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "unknown link\n").into_response()
}

fn escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '&' => "&amp;".into(),
            '"' => "&quot;".into(),
            '\'' => "&#39;".into(),
            c => c.to_string(),
        })
        .collect()
}

async fn page(State(engine): State<Arc<Engine>>, Path(path): Path<String>) -> Response {
    let Some(u) = engine.unsubscribe_token(token(&path)) else {
        return not_found();
    };
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Unsubscribe</title></head>\
         <body><h1>Unsubscribe</h1><p>Stop sending mail to <b>{}</b>?</p>\
         <form method=\"post\"><input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
         <button type=\"submit\">Unsubscribe</button></form></body></html>\n",
        escape(&u.recipient)
    );
    ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
}

/// Whether a POST body says `List-Unsubscribe=One-Click` (RFC 8058 §3.1: as a URL-encoded
/// form or multipart/form-data, which receivers both send).
fn is_one_click(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    let form = text.split('&').any(|pair| {
        pair.trim()
            .eq_ignore_ascii_case("List-Unsubscribe=One-Click")
    });
    let multipart = text.contains("name=\"List-Unsubscribe\"")
        && text
            .split("name=\"List-Unsubscribe\"")
            .nth(1)
            .is_some_and(|rest| {
                rest.split("\r\n\r\n")
                    .nth(1)
                    .is_some_and(|v| v.trim_start().starts_with("One-Click"))
            });
    form || multipart
}

async fn unsubscribe(
    State(engine): State<Arc<Engine>>,
    Path(path): Path<String>,
    body: Bytes,
) -> Response {
    if !is_one_click(&body) {
        // Checked after the token would leak which tokens are valid to anyone who probes
        // with a wrong body; before, a wrong body simply never unsubscribes.
        return (
            StatusCode::BAD_REQUEST,
            "expected List-Unsubscribe=One-Click\n",
        )
            .into_response();
    }
    match engine.one_click_unsubscribe(token(&path)).await {
        Ok(u) => (
            [(header::CACHE_CONTROL, "no-store")],
            Html(format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>Unsubscribed</title></head>\
                 <body><p><b>{}</b> will get no more mail from this sender.</p></body></html>\n",
                escape(&u.recipient)
            )),
        )
            .into_response(),
        Err(UnsubscribeError::UnknownLink) => not_found(),
        Err(UnsubscribeError::Engine(e)) => {
            tracing::error!(error = %e, "could not record a one-click unsubscribe");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "30")],
                "try again later\n",
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_click_bodies_in_both_encodings() {
        assert!(is_one_click(b"List-Unsubscribe=One-Click"));
        assert!(is_one_click(b"a=b&List-Unsubscribe=One-Click"));
        let multipart = b"--x\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--x--\r\n";
        assert!(is_one_click(multipart));
        assert!(!is_one_click(b""));
        assert!(!is_one_click(b"List-Unsubscribe=Maybe"));
        assert_eq!(token("u/abc.def"), "abc.def");
        assert_eq!(escape("<a&\"b'>"), "&lt;a&amp;&quot;b&#39;&gt;");
    }
}
