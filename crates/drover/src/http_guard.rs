//! The HTTP API's front: the bearer token checked before a byte of the body is read, and
//! request bodies read within `http.max_body_size`, gzip-decoded when the client sent them so
//! (the decoded size bounded by the same limit: a zip bomb gets 413, not the memory).

use crate::api_state::{error, AppState};
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::io::Read;
use subtle::{Choice, ConstantTimeEq};

/// Paths anyone may call: probes, the metrics scrape and the API's own description.
pub(crate) const PUBLIC: &[&str] = &["/healthz", "/readyz", "/metrics", "/api/openapi.json"];

/// Whether the request carries one of `tokens` (`Authorization: Bearer <token>`, the scheme
/// in any case). Every configured token is compared, each through its SHA-256 digest and in
/// constant time, so neither a token's length nor which one matched shows in the timing.
pub(crate) fn token_ok(tokens: &[String], headers: &HeaderMap) -> bool {
    if tokens.is_empty() {
        return true;
    }
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
    else {
        return false;
    };
    one_of(tokens, presented)
}

/// The status page (`GET /`) also takes the token as `?token=`, so that a browser, which
/// cannot send a bearer header from its address bar, can open it.
pub(crate) fn page_token_ok(tokens: &[String], uri: &axum::http::Uri) -> bool {
    uri.path() == "/"
        && axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(uri)
            .ok()
            .and_then(|q| q.0.get("token").cloned())
            .is_some_and(|presented| one_of(tokens, &presented))
}

fn one_of(tokens: &[String], presented: &str) -> bool {
    let presented = Sha256::digest(presented.as_bytes());
    let mut ok = Choice::from(0);
    for token in tokens {
        ok |= Sha256::digest(token.as_bytes()).ct_eq(&presented);
    }
    ok.into()
}

/// Middleware: 401 before the handler (and its body extractor) runs, unless the path is
/// public or the token is good.
pub(crate) async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let public = PUBLIC.contains(&request.uri().path());
    let tokens = &state.engine.config().http.api_tokens;
    if public || token_ok(tokens, request.headers()) || page_token_ok(tokens, request.uri()) {
        next.run(request).await
    } else {
        error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token")
    }
}

/// A request body as the handlers read it: within the size limit, gzip-decoded.
pub(crate) struct Body(pub(crate) Bytes);

impl FromRequest<AppState> for Body {
    type Rejection = Response;

    async fn from_request(request: Request, state: &AppState) -> Result<Body, Response> {
        let encoding = request
            .headers()
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase());
        let raw = Bytes::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let limit = state.engine.config().http.max_body_size;
        match encoding.as_deref() {
            None | Some("" | "identity") => Ok(Body(raw)),
            Some("gzip" | "x-gzip") => crate::blocking::off_the_runtime(|| gunzip(&raw, limit))
                .map(Body)
                .map_err(|(status, message)| error(status, message)),
            Some(other) => Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Encoding {other:?} is not supported (gzip is)"),
            )),
        }
    }
}

/// Decodes a gzip body, refusing it once the decoded bytes pass `limit`.
fn gunzip(compressed: &[u8], limit: usize) -> Result<Bytes, (StatusCode, String)> {
    let mut decoded = Vec::new();
    let mut reader = flate2::read::MultiGzDecoder::new(compressed).take(limit as u64 + 1);
    if let Err(e) = reader.read_to_end(&mut decoded) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("the gzip request body cannot be decoded: {e}"),
        ));
    }
    if decoded.len() > limit {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the decoded request body exceeds http.max_body_size ({limit} bytes)"),
        ));
    }
    Ok(Bytes::from(decoded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn only_the_status_page_takes_the_token_in_its_query() {
        let tokens = vec!["s3cret".to_owned()];
        let uri = |s: &str| s.parse::<axum::http::Uri>().unwrap();
        assert!(page_token_ok(&tokens, &uri("/?token=s3cret")));
        assert!(page_token_ok(&tokens, &uri("/?x=1&token=s%33cret")));
        assert!(!page_token_ok(&tokens, &uri("/?token=wrong")));
        assert!(!page_token_ok(&tokens, &uri("/")));
        assert!(!page_token_ok(
            &tokens,
            &uri("/api/admin/v1/queues?token=s3cret")
        ));
        assert!(
            !PUBLIC.contains(&"/"),
            "the status page is behind the token"
        );
    }

    #[test]
    fn bearer_tokens_in_any_case_and_only_configured_ones() {
        let tokens = vec!["s3cret".to_owned(), "other-token".to_owned()];
        assert!(token_ok(&tokens, &with_auth("Bearer s3cret")));
        assert!(token_ok(&tokens, &with_auth("bearer other-token")));
        assert!(token_ok(&tokens, &with_auth("BEARER  s3cret ")));
        assert!(!token_ok(&tokens, &with_auth("Bearer s3cre")));
        assert!(!token_ok(&tokens, &with_auth("Bearer s3crets")));
        assert!(!token_ok(&tokens, &with_auth("Basic s3cret")));
        assert!(!token_ok(&tokens, &with_auth("s3cret")));
        assert!(!token_ok(&tokens, &HeaderMap::new()));
        assert!(token_ok(&[], &HeaderMap::new()));
    }

    #[test]
    fn gzip_bodies_decode_within_the_limit_and_bombs_are_refused() {
        use flate2::write::GzEncoder;
        use std::io::Write;
        let gz = |data: &[u8]| {
            let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        };
        assert_eq!(&gunzip(&gz(b"{\"a\":1}"), 100).unwrap()[..], b"{\"a\":1}");
        // 64 MiB of zeros compress to about 64 KiB.
        let bomb = gz(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 1 << 20);
        let refused = gunzip(&bomb, 1 << 20).unwrap_err();
        assert_eq!(refused.0, StatusCode::PAYLOAD_TOO_LARGE);
        let corrupt = gunzip(b"not gzip at all", 100).unwrap_err();
        assert_eq!(corrupt.0, StatusCode::BAD_REQUEST);
    }
}
