//! The OpenAPI description (docs/openapi.yaml) against a running engine: it is served without a
//! token, and every documented operation, called with each of its documented examples (and
//! without a token, and with a body or query it must refuse), answers a documented status with
//! a documented content type and a body that fits the documented schema (checked by
//! jsonschema through scripts/check-openapi.py, which also validates the document with
//! openapi-spec-validator; skipped when those Python modules are missing).

use crate::dkim::wait_messages;
use crate::harness::*;
use reqwest::Method;
use serde_json::{json, Value};

const TOKEN: &str = "openapi-e2e-token";
const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// A reply, and where the document says what it looks like.
struct Observed {
    what: String,
    status: u16,
    schema: Option<String>,
    value: Value,
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Follows a local `$ref`; returns the node and the pointer it was found at (if it moved).
fn resolve<'a>(doc: &'a Value, node: &'a Value) -> (&'a Value, Option<String>) {
    let mut node = node;
    let mut at = None;
    while let Some(r) = node.get("$ref").and_then(Value::as_str) {
        let pointer = r.trim_start_matches('#');
        node = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("$ref {r} unresolved"));
        at = Some(pointer.to_owned());
    }
    (node, at)
}

/// The request body examples of an operation (media type application/json).
fn body_examples(doc: &Value, op: &Value) -> Vec<(String, Value)> {
    let Some(body) = op.get("requestBody") else {
        return Vec::new();
    };
    let (body, _) = resolve(doc, body);
    let media = &body["content"]["application/json"];
    let mut out = Vec::new();
    if let Some(example) = media.get("example") {
        out.push(("example".to_owned(), example.clone()));
    }
    for (name, example) in media
        .get("examples")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        out.push((name.clone(), resolve(doc, example).0["value"].clone()));
    }
    assert!(!out.is_empty(), "a request body without an example");
    out
}

/// The query parameters of an operation: (name, schema type, example).
fn query_parameters(doc: &Value, op: &Value) -> Vec<(String, String, Option<Value>)> {
    op.get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| resolve(doc, p).0)
        .filter(|p| p["in"] == "query")
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["schema"]["type"].as_str().unwrap_or_default().to_owned(),
                p.get("example").cloned(),
            )
        })
        .collect()
}

fn query_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Calls one operation and checks the reply against its documented responses.
struct Caller<'a> {
    doc: &'a Value,
    client: reqwest::Client,
    observed: Vec<Observed>,
}

impl Caller<'_> {
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &mut self,
        base: &str,
        path: &str,
        url_path: &str,
        method: &str,
        token: bool,
        query: &[(String, String)],
        body: Option<RequestBody>,
        what: &str,
    ) -> (u16, String) {
        let m = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
        let mut req = self
            .client
            .request(m, format!("{base}{url_path}"))
            .query(query);
        if token {
            req = req.bearer_auth(TOKEN);
        }
        req = match body {
            Some(RequestBody::Json(v)) => req.json(&v),
            Some(RequestBody::Form(text)) => req
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(text),
            None => req,
        };
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        let text = resp.text().await.unwrap();
        let what = format!("{} {path} ({what}) -> {status}", method.to_uppercase());

        let op = &self.doc["paths"][path][method];
        let documented = op["responses"].get(status.to_string());
        let Some(response) = documented else {
            panic!("{what}: status not documented; body: {text}");
        };
        let (response, moved) = resolve(self.doc, response);
        let at =
            moved.unwrap_or_else(|| format!("/paths/{}/{method}/responses/{status}", escape(path)));
        if let Some(content) = response.get("content").and_then(Value::as_object) {
            assert!(
                content.contains_key(&content_type),
                "{what}: content type {content_type:?} not documented ({:?}); body: {text}",
                content.keys().collect::<Vec<_>>()
            );
            let value = if content_type.ends_with("json") {
                serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
            } else {
                Value::String(text.clone())
            };
            let schema = content[&content_type]
                .get("schema")
                .map(|_| format!("{at}/content/{}/schema", escape(&content_type)));
            self.observed.push(Observed {
                what: what.clone(),
                status,
                schema,
                value,
            });
        }
        (status, text)
    }
}

enum RequestBody {
    Json(Value),
    Form(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_answers_as_documented() {
    let sink = capturing_sink().await;
    // A webhook whose endpoint refuses connections: its status has an error to show.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = closed.local_addr().unwrap();
    drop(closed);
    let engine = TestEngine::start(&format!(
        "{}\n[http]\napi_tokens = [\"{TOKEN}\"]\n\
         [stamping]\nlist_unsubscribe_url = \"https://unsub.example.net/u\"\n\
         [unsubscribe]\nlisten = \"127.0.0.1:0\"\n\
         [[webhook]]\nname = \"platform\"\nurl = \"http://{hook}/hook\"\ntimeout = \"1s\"\n",
        routes(&["example.test", "held.test"], sink.local_addr())
    ))
    .await;
    wait_ready(&engine).await;
    let api = engine.url("");
    let door = format!(
        "http://{}/u",
        engine.running.as_ref().unwrap().unsubscribe_addr.unwrap()
    );

    // Served without a token, as JSON, equal to the file.
    let served = reqwest::get(engine.url("/api/openapi.json")).await.unwrap();
    assert_eq!(served.status(), 200);
    let doc: Value = served.json().await.unwrap();
    assert_eq!(&doc, drover::openapi::document().unwrap());
    let from_file: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(manifest_dir().join("../../docs/openapi.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(doc, from_file, "the binary's description is the file's");

    let mut caller = Caller {
        doc: &doc,
        client: reqwest::Client::new(),
        observed: Vec::new(),
    };
    let paths = doc["paths"].as_object().unwrap();
    // Injection first: the mail it queues gives the unsubscribe door a real link, and the
    // admin calls something to act on.
    let mut order: Vec<&String> = paths.keys().collect();
    order.sort_by_key(|p| (p.as_str() != "/api/inject/v1", p.contains("{")));
    let mut prepared = false;
    for path in order {
        let item = &paths[path];
        let unsubscribe = item["x-drover-listener"] == "unsubscribe";
        let base = if unsubscribe { &door } else { &api };
        if path != "/api/inject/v1" && !prepared {
            prepare_listings(&api).await;
            wait_messages(&sink, 1).await;
            prepared = true;
        }
        // What a path's POST creates, its GET lists and its DELETE removes: in that order.
        let mut methods: Vec<(&String, &Value)> = item
            .as_object()
            .unwrap()
            .iter()
            .filter(|(m, _)| METHODS.contains(&m.as_str()))
            .collect();
        methods.sort_by_key(|(m, _)| match m.as_str() {
            "post" | "put" => 0,
            "delete" => 2,
            _ => 1,
        });
        for (method, op) in methods {
            let public = op.get("security") == Some(&json!([]));
            if unsubscribe {
                unsubscribe_calls(&mut caller, &sink, base, path, method).await;
                continue;
            }
            let examples = body_examples(&doc, op);
            let query = query_parameters(&doc, op);
            if !public {
                let body = examples.first().map(|(_, v)| RequestBody::Json(v.clone()));
                let (status, _) = caller
                    .call(base, path, path, method, false, &[], body, "no token")
                    .await;
                assert_eq!(status, 401, "{method} {path} without a token");
            }
            if examples.is_empty() {
                let (status, text) = caller
                    .call(base, path, path, method, !public, &[], None, "plain")
                    .await;
                assert_eq!(status, 200, "{method} {path}: {text}");
            }
            for (name, example) in examples {
                let (status, text) = caller
                    .call(
                        base,
                        path,
                        path,
                        method,
                        true,
                        &[],
                        Some(RequestBody::Json(example)),
                        &format!("example {name}"),
                    )
                    .await;
                assert_eq!(status, 200, "{method} {path} example {name}: {text}");
                if path == "/api/inject/v1" {
                    let reply: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(reply["fail_count"], 0, "example {name}: {reply}");
                }
            }
            if op.get("requestBody").is_some() {
                let (status, _) = caller
                    .call(
                        base,
                        path,
                        path,
                        method,
                        true,
                        &[],
                        Some(RequestBody::Json(json!({}))),
                        "empty object",
                    )
                    .await;
                assert_eq!(status, 400, "{method} {path} with {{}}");
            }
            let with_examples: Vec<(String, String)> = query
                .iter()
                .filter_map(|(n, _, e)| Some((n.clone(), query_value(e.as_ref()?))))
                .collect();
            if !with_examples.is_empty() {
                let (status, text) = caller
                    .call(
                        base,
                        path,
                        path,
                        method,
                        true,
                        &with_examples,
                        None,
                        "query",
                    )
                    .await;
                assert_eq!(status, 200, "{method} {path}?{with_examples:?}: {text}");
            }
            for (name, kind, _) in &query {
                if kind == "boolean" || kind == "integer" {
                    let bad = [(name.clone(), "not-a-value".to_owned())];
                    let (status, _) = caller
                        .call(base, path, path, method, true, &bad, None, "bad query")
                        .await;
                    assert_eq!(status, 400, "{method} {path}?{name}=not-a-value");
                }
            }
        }
    }
    assert!(prepared);
    // The replies checked against the schemas had something in them.
    let reply = |what: &str| {
        caller
            .observed
            .iter()
            .find(|o| o.what.starts_with(what))
            .map(|o| &o.value)
            .unwrap_or_else(|| panic!("no reply for {what}"))
    };
    let queues = reply("GET /api/admin/v1/queues (query) -> 200");
    assert!(
        queues["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["groups"].is_array() && d["suspended_until"].is_null()),
        "{queues}"
    );
    assert!(
        reply("GET /api/admin/v1/webhooks (plain) -> 200")["webhooks"][0]["last_error"].is_string()
    );
    assert!(
        !reply("GET /api/admin/v1/suspensions (plain) -> 200")["suspensions"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let listed = reply("GET /api/admin/v1/suppressions (query) -> 200");
    assert!(
        !listed["entries"].as_array().unwrap().is_empty(),
        "{listed}"
    );
    let statuses: std::collections::BTreeSet<u16> =
        caller.observed.iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        [200, 400, 401, 404].into(),
        "the statuses this test can provoke"
    );
    check_with_python(&doc, &caller.observed);
    engine.stop().await;
}

/// Something for every listing to show: a held destination with a ready message (queues with
/// groups, holds), a suppressed address, and a webhook that has failed (its error).
async fn prepare_listings(api: &str) {
    let (status, reply) = post_json(
        &format!("{api}/api/admin/v1/suspend"),
        &json!({"domain": "held.test"}),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    // Its own campaign: the examples purge and hold `nov-2026`.
    let mut held = message_for(&["x@held.test".into()]);
    held["campaign"] = json!("held");
    let (status, reply) = post_json(&format!("{api}/api/inject/v1"), &held, Some(TOKEN)).await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = post_json(
        &format!("{api}/api/admin/v1/suppressions"),
        &json!({"entries": [{"tenant": "acme", "address": "zed@example.test", "reason": "test"}]}),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let start = std::time::Instant::now();
    loop {
        let status: Value = reqwest::Client::new()
            .get(format!("{api}/api/admin/v1/webhooks"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["webhooks"][0]["last_error"].is_string() {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "the webhook never failed: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The one-click door: a real link (from a delivered message's `List-Unsubscribe`) shows its
/// page and unsubscribes; an unknown link and a wrong body are refused.
async fn unsubscribe_calls(
    caller: &mut Caller<'_>,
    sink: &sink::SinkHandle,
    base: &str,
    path: &str,
    method: &str,
) {
    let message = &sink.messages()[0];
    let head = String::from_utf8_lossy(&message.data);
    let link = head
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .replace("\r\n ", " ")
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("List-Unsubscribe")
                .then(|| value.to_owned())
        })
        .expect("a stamped List-Unsubscribe");
    let token = link
        .split("https://unsub.example.net/u/")
        .nth(1)
        .and_then(|rest| rest.split('>').next())
        .expect("the one-click URL")
        .to_owned();
    let one_click = || Some(RequestBody::Form("List-Unsubscribe=One-Click".into()));
    let calls: Vec<(String, Option<RequestBody>, u16)> = match method {
        "get" => vec![
            (token.clone(), None, 200),
            ("unknown-token".into(), None, 404),
        ],
        "post" => vec![
            (
                token.clone(),
                Some(RequestBody::Form("List-Unsubscribe=Maybe".into())),
                400,
            ),
            ("unknown-token".into(), one_click(), 404),
            (token.clone(), one_click(), 200),
        ],
        other => panic!("no calls for {other} {path}"),
    };
    for (t, body, want) in calls {
        let (status, text) = caller
            .call(
                base,
                path,
                &format!("/{t}"),
                method,
                false,
                &[],
                body,
                "door",
            )
            .await;
        assert_eq!(status, want, "{method} {path} with {t}: {text}");
    }
}

/// Validates the document and the observed bodies with openapi-spec-validator and jsonschema.
fn check_with_python(doc: &Value, observed: &[Observed]) {
    let dir = tempfile::tempdir().unwrap();
    let doc_path = dir.path().join("openapi.json");
    std::fs::write(&doc_path, doc.to_string()).unwrap();
    let cases: Vec<Value> = observed
        .iter()
        .filter_map(|o| {
            Some(json!({"what": o.what, "schema": o.schema.as_ref()?, "value": o.value}))
        })
        .collect();
    assert!(cases.len() > 20, "{} replies with a schema", cases.len());
    let cases_path = dir.path().join("observed.json");
    std::fs::write(&cases_path, Value::Array(cases).to_string()).unwrap();
    let script = manifest_dir().join("../../scripts/check-openapi.py");
    let out = match std::process::Command::new("python3")
        .arg(&script)
        .arg(&doc_path)
        .arg(&cases_path)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("python3 cannot run ({e}); skipping the schema checks");
            return;
        }
    };
    if out.status.code() == Some(3) {
        eprintln!(
            "{}; skipping the schema checks (scripts/install-deps.sh installs them)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return;
    }
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success(),
        "scripts/check-openapi.py: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
