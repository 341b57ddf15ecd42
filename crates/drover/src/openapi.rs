//! `GET /api/openapi.json`: the OpenAPI 3.1 description of the HTTP API. `docs/openapi.yaml`
//! is its one source: it is built into the binary and converted to JSON once, on first use,
//! so the served document cannot drift from the file.

use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::sync::OnceLock;

/// `docs/openapi.yaml` as it was at build time.
pub const SOURCE: &str = include_str!("../../../docs/openapi.yaml");

/// The description as a JSON value, or why `docs/openapi.yaml` does not parse (a build
/// that ships such a file fails its unit tests first).
pub fn document() -> Result<&'static Value, &'static str> {
    static DOCUMENT: OnceLock<Result<Value, String>> = OnceLock::new();
    DOCUMENT
        .get_or_init(|| {
            serde_yaml_ng::from_str(SOURCE).map_err(|e| format!("docs/openapi.yaml: {e}"))
        })
        .as_ref()
        .map_err(String::as_str)
}

/// The description serialised once: each request clones a reference-counted buffer.
fn document_json() -> &'static Result<Bytes, String> {
    static JSON: OnceLock<Result<Bytes, String>> = OnceLock::new();
    JSON.get_or_init(|| {
        let doc = document().map_err(str::to_owned)?;
        serde_json::to_vec(doc)
            .map(Bytes::from)
            .map_err(|e| format!("the OpenAPI description cannot be serialised: {e}"))
    })
}

/// `GET /api/openapi.json` (no token needed, like `/healthz`).
pub async fn serve() -> Response {
    match document_json() {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the OpenAPI description");
            (StatusCode::INTERNAL_SERVER_ERROR, e.clone()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    //! The description against the routers: every route is described and every described
    //! operation is routed, method by method. The routes are read from the routers' source
    //! (`.route("PATH", get(h).post(h2))` calls), so a route added without its description
    //! fails here.

    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// The API listener's router, and the unsubscribe door's.
    const API_SOURCE: &str = include_str!("api.rs");
    const UNSUBSCRIBE_SOURCE: &str = include_str!("unsubscribe_http.rs");

    const METHODS: &[&str] = &[
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    #[derive(Debug, Clone, PartialEq)]
    enum Token {
        Ident(String),
        Str(String),
        Punct(char),
    }

    /// Rust source as identifiers, string literals and punctuation; comments, numbers,
    /// lifetimes and char literals dropped. Enough to find router calls, not a Rust lexer.
    fn tokens(source: &str) -> Vec<Token> {
        let chars: Vec<char> = source.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            if c.is_whitespace() {
                i += 1;
            } else if c == '/' && next == Some('/') {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            } else if c == '/' && next == Some('*') {
                i += 2;
                while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                    i += 1;
                }
                i += 2;
            } else if c == 'r' && matches!(next, Some('"' | '#')) {
                // A raw string: r"..." or r#"..."#.
                let mut j = i + 1;
                let mut hashes = 0;
                while chars.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                if chars.get(j) != Some(&'"') {
                    out.push(Token::Ident("r".into()));
                    i += 1;
                    continue;
                }
                let start = j + 1;
                let mut k = start;
                loop {
                    assert!(k < chars.len(), "unterminated raw string");
                    if chars[k] == '"' && (0..hashes).all(|h| chars.get(k + 1 + h) == Some(&'#')) {
                        break;
                    }
                    k += 1;
                }
                out.push(Token::Str(chars[start..k].iter().collect()));
                i = k + 1 + hashes;
            } else if c == '"' {
                let mut s = String::new();
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    if let Some(&ch) = chars.get(i) {
                        s.push(ch);
                    }
                    i += 1;
                }
                out.push(Token::Str(s));
                i += 1;
            } else if c == '\'' {
                // A char literal ('x', '\n', '\u{1f}') or a lifetime ('static).
                if next == Some('\\') {
                    i += 2;
                    while i < chars.len() && chars[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                } else if chars.get(i + 2) == Some(&'\'') {
                    i += 3;
                } else {
                    i += 1;
                    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
            } else if c.is_alphanumeric() || c == '_' {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                if !c.is_ascii_digit() {
                    out.push(Token::Ident(word));
                }
            } else {
                out.push(Token::Punct(c));
                i += 1;
            }
        }
        out
    }

    /// `(method, path)` of every `.route(PATH, METHOD(..).METHOD(..))` in a router's source
    /// (its tests left out). A routing call this cannot read (`nest`, `merge`, a service)
    /// fails the test, so a new way of routing cannot slip past it.
    fn routes_in(source: &str) -> BTreeSet<(String, String)> {
        let source = source.split("#[cfg(test)]").next().unwrap_or(source);
        let toks = tokens(source);
        let mut routes = BTreeSet::new();
        let mut i = 0;
        while i + 1 < toks.len() {
            let is_call = |name: &str| {
                toks[i] == Token::Punct('.') && toks[i + 1] == Token::Ident(name.into())
            };
            for unread in ["nest", "nest_service", "merge", "route_service"] {
                assert!(
                    !is_call(unread),
                    "the router uses `.{unread}(...)`: teach this test to read it"
                );
            }
            if !is_call("route") {
                i += 1;
                continue;
            }
            let (Some(Token::Punct('(')), Some(Token::Str(path)), Some(Token::Punct(','))) =
                (toks.get(i + 2), toks.get(i + 3), toks.get(i + 4))
            else {
                panic!(
                    "a .route( call without a literal path: {:?}",
                    &toks[i..i + 5]
                );
            };
            // The method router: depth 1 is the `.route(` call's own parentheses; a method
            // at that depth routes (`get(h)`, `.post(h)`), anything deeper is a handler.
            let mut depth = 1;
            let mut j = i + 5;
            let mut methods = Vec::new();
            while depth > 0 {
                match &toks[j] {
                    Token::Punct('(' | '[' | '{') => depth += 1,
                    Token::Punct(')' | ']' | '}') => depth -= 1,
                    Token::Ident(name)
                        if depth == 1 && toks.get(j + 1) == Some(&Token::Punct('(')) =>
                    {
                        assert!(
                            METHODS.contains(&name.as_str()),
                            "route {path}: `{name}(...)` is not a method this test knows"
                        );
                        methods.push(name.clone());
                    }
                    _ => {}
                }
                j += 1;
            }
            assert!(!methods.is_empty(), "route {path} without a method");
            for m in methods {
                routes.insert((m, path.clone()));
            }
            i = j;
        }
        routes
    }

    /// `(method, path)` of every operation of the description, by listener
    /// (`x-drover-listener`, default `api`); a path item's `x-drover-route` names the router
    /// pattern it describes when the two differ.
    fn described() -> BTreeMap<String, BTreeSet<(String, String)>> {
        let doc = document().expect("docs/openapi.yaml parses");
        let paths = doc["paths"].as_object().expect("paths is an object");
        let mut out: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
        for (path, item) in paths {
            let listener = item["x-drover-listener"].as_str().unwrap_or("api");
            let route = item["x-drover-route"].as_str().unwrap_or(path);
            for key in item.as_object().expect("a path item is an object").keys() {
                if METHODS.contains(&key.as_str()) {
                    out.entry(listener.to_owned())
                        .or_default()
                        .insert((key.clone(), route.to_owned()));
                }
            }
        }
        out
    }

    fn assert_same(listener: &str, routed: &BTreeSet<(String, String)>) {
        let described = described().remove(listener).unwrap_or_default();
        let undescribed: Vec<_> = routed.difference(&described).collect();
        let unrouted: Vec<_> = described.difference(routed).collect();
        assert!(
            undescribed.is_empty() && unrouted.is_empty(),
            "{listener} listener: routed but not in docs/openapi.yaml: {undescribed:?}; \
             in docs/openapi.yaml but not routed: {unrouted:?}"
        );
    }

    #[test]
    fn every_route_is_described_and_every_description_routed() {
        let api = routes_in(API_SOURCE);
        // The reader finds what is there (a sample of routes of each shape).
        for route in [
            ("post", "/api/inject/v1"),
            ("get", "/api/admin/v1/suppressions"),
            ("post", "/api/admin/v1/suppressions"),
            ("get", "/healthz"),
            ("get", "/api/openapi.json"),
        ] {
            assert!(
                api.contains(&(route.0.to_owned(), route.1.to_owned())),
                "{route:?} not read from api.rs: {api:?}"
            );
        }
        assert_same("api", &api);
        let unsubscribe = routes_in(UNSUBSCRIBE_SOURCE);
        assert_eq!(unsubscribe.len(), 2, "{unsubscribe:?}");
        assert_same("unsubscribe", &unsubscribe);
        let listeners: Vec<String> = described().into_keys().collect();
        assert_eq!(listeners, ["api", "unsubscribe"]);
    }

    #[test]
    fn the_route_reader_reads_chains_and_skips_handlers_comments_and_tests() {
        let source = r#"
            // .route("/commented", get(x))
            Router::new()
                .route("/a", get(|| async { "ok\n" }))
                .route("/b/{id}", axum::routing::post(h).delete(post_handler))
                .route(
                    "/c",
                    get(list).put(move |s: State<S>| async move { s.get('x', "}") }),
                )
                .layer(DefaultBodyLimit::max(limit));
            #[cfg(test)]
            mod tests { fn t() { Router::new().route("/test-only", get(h)); } }
        "#;
        let want: BTreeSet<(String, String)> = [
            ("get", "/a"),
            ("delete", "/b/{id}"),
            ("post", "/b/{id}"),
            ("get", "/c"),
            ("put", "/c"),
        ]
        .map(|(m, p)| (m.to_owned(), p.to_owned()))
        .into();
        assert_eq!(routes_in(source), want);
    }

    #[test]
    #[should_panic(expected = "teach this test")]
    fn the_route_reader_refuses_routing_it_cannot_read() {
        routes_in(r#"Router::new().route("/a", get(h)).merge(other)"#);
    }

    /// The JSON value a local `$ref` (`#/a/b`) points at.
    fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
        let pointer = reference.strip_prefix('#')?;
        doc.pointer(pointer)
    }

    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn the_description_is_well_formed_openapi_3_1() {
        let doc = document().expect("docs/openapi.yaml parses");
        let version = doc["openapi"].as_str().unwrap_or_default();
        assert!(version.starts_with("3.1."), "openapi: {version:?}");
        assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());

        let mut all = Vec::new();
        refs(doc, &mut all);
        assert!(all.len() > 50, "{} $refs", all.len());
        for r in &all {
            assert!(resolve(doc, r).is_some(), "$ref {r} does not resolve");
        }

        let schemes = doc["components"]["securitySchemes"]
            .as_object()
            .expect("security schemes");
        let mut operation_ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            assert!(path.starts_with('/'), "{path}");
            let templated: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            let path_params = |params: &Value| -> Vec<String> {
                params
                    .as_array()
                    .map(|a| a.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|p| match p.get("$ref").and_then(Value::as_str) {
                        Some(r) => resolve(doc, r).expect("parameter $ref").clone(),
                        None => p.clone(),
                    })
                    .filter(|p| p["in"] == "path")
                    .map(|p| {
                        assert_eq!(p["required"], true, "{path}: path parameters are required");
                        p["name"].as_str().unwrap_or_default().to_owned()
                    })
                    .collect()
            };
            let common = path_params(&item["parameters"]);
            for (method, op) in item.as_object().expect("path item") {
                if !METHODS.contains(&method.as_str()) {
                    continue;
                }
                let id = op["operationId"]
                    .as_str()
                    .expect("every operation has an id");
                assert!(
                    operation_ids.insert(id.to_owned()),
                    "operationId {id} twice"
                );
                let mut declared: Vec<String> = common.clone();
                declared.extend(path_params(&op["parameters"]));
                let declared: BTreeSet<&str> = declared.iter().map(String::as_str).collect();
                assert_eq!(declared, templated, "{method} {path}: path parameters");
                let responses = op["responses"].as_object().expect("responses");
                assert!(!responses.is_empty(), "{method} {path}: no responses");
                for (status, response) in responses {
                    assert!(
                        status.len() == 3 && status.parse::<u16>().is_ok(),
                        "{method} {path}: status {status}"
                    );
                    let response = match response.get("$ref").and_then(Value::as_str) {
                        Some(r) => resolve(doc, r).expect("response $ref"),
                        None => response,
                    };
                    assert!(
                        response["description"].is_string(),
                        "{method} {path} {status}"
                    );
                }
                let security = op.get("security").unwrap_or(&doc["security"]);
                for requirement in security.as_array().expect("security is a list") {
                    for scheme in requirement.as_object().expect("requirement").keys() {
                        assert!(schemes.contains_key(scheme), "unknown scheme {scheme}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_probes_and_the_description_need_no_token_and_the_api_does() {
        let doc = document().expect("docs/openapi.yaml parses");
        let mut public = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                if METHODS.contains(&method.as_str())
                    && op
                        .get("security")
                        .is_some_and(|s| s == &Value::Array(vec![]))
                {
                    public.insert(format!("{method} {path}"));
                }
            }
        }
        // What the token check lets through, and the one-click door (no token by design).
        let mut want: BTreeSet<String> = crate::http_guard::PUBLIC
            .iter()
            .map(|path| format!("get {path}"))
            .collect();
        want.extend(["get /{token}".to_owned(), "post /{token}".to_owned()]);
        assert_eq!(want.len(), 6);
        assert_eq!(public, want);
        assert_eq!(doc["security"], serde_json::json!([{"bearerAuth": []}]));
    }

    #[tokio::test]
    async fn served_as_json_equal_to_the_yaml() {
        let response = serve().await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        let served: Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(&served, document().expect("parses"));
        // Status codes stay strings (YAML would read an unquoted 200 as a number).
        assert!(served["paths"]["/healthz"]["get"]["responses"]["200"].is_object());
    }
}
