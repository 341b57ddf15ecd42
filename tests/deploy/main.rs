//! The deployment and monitoring files under `deploy/`: Prometheus configuration and alert rules
//! (with their unit tests), the Grafana dashboard, docker compose, the Dockerfile and the
//! Kubernetes manifests. Outside tools (`promtool` from Debian's `prometheus`, PyPI's
//! `kubernetes-validate` and `jsonschema`) check what they know; a test whose tool is missing
//! is skipped with a message, and fails under CI (`CI` set), where scripts/install-deps.sh
//! installs them. What fits together across files (ports, paths, names) is checked here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .canonicalize()
        .unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether the command runs (its probe exits 0). Missing: skipped with a message, or a
/// failure when `CI` is set.
fn have(tool: &str, probe: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
        assert!(
            !ci,
            "`{tool} {}` fails under CI: scripts/install-deps.sh installs it",
            probe.join(" ")
        );
        eprintln!(
            "`{tool} {}` fails; skipping (scripts/install-deps.sh installs it)",
            probe.join(" ")
        );
    }
    ok
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"))
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every YAML document of a file, as JSON values.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(path: &Path) -> Value {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{}: one document expected", path.display());
    docs.remove(0)
}

/// `drover check-config` on `text`, written to a temporary file.
fn check_config(text: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.toml");
    std::fs::write(&path, text).unwrap();
    run(Command::new(env!("CARGO_BIN_EXE_drover"))
        .arg("check-config")
        .arg(&path))
}

fn str_of<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
}

// ---- Prometheus ----

#[test]
fn prometheus_config_alert_rules_and_their_unit_tests_pass() {
    let dir = deploy_dir().join("prometheus");
    let rules = yaml(&dir.join("alerts.yml"));
    let alerts: BTreeSet<&str> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for required in [
        "DroverInstanceDown",
        "DroverSpoolReadOnly",
        "DroverQueueGrowing",
        "DroverBounceRateHigh",
        "DroverWebhookLagging",
    ] {
        assert!(alerts.contains(required), "{required} missing: {alerts:?}");
    }
    // The unit tests exercise several alerts, each firing at least once.
    let tests = yaml(&dir.join("alerts_test.yml"));
    let firing: BTreeSet<&str> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .map(|c| c["alertname"].as_str().unwrap())
        .collect();
    assert!(firing.len() >= 4, "{firing:?}");
    assert!(firing.iter().all(|a| alerts.contains(a)), "{firing:?}");
    if !have("promtool", &["--version"]) {
        return;
    }
    let promtool = |args: &[&str]| {
        let out = run(Command::new("promtool").args(args).current_dir(&dir));
        assert_ok(&out, &format!("promtool {}", args.join(" ")));
    };
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts_test.yml"]);
}

/// `drover_…` names that the sources declare (each metric name is a `const` in some crate).
fn declared_metrics() -> BTreeSet<String> {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let name = regex::Regex::new(r#""(drover_[a-z0-9_]+)""#).unwrap();
    let mut out = BTreeSet::new();
    let mut stack: Vec<PathBuf> = std::fs::read_dir(&crates)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("src"))
        .filter(|p| p.is_dir())
        .collect();
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(
                std::fs::read_dir(&path)
                    .unwrap()
                    .flatten()
                    .map(|e| e.path()),
            );
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.extend(name.captures_iter(&read(&path)).map(|c| c[1].to_owned()));
        }
    }
    out
}

#[test]
fn every_metric_the_alerts_and_the_dashboard_use_is_exported() {
    let declared = declared_metrics();
    assert!(declared.contains("drover_messages_delivered_total"));
    // The per-site series come with the status page work; until the sources declare them,
    // their panels stay empty and are not held against this check.
    let sites_exported = declared.iter().any(|n| n.starts_with("drover_site_"));
    let used = regex::Regex::new(r"\bdrover_[a-z0-9_]+").unwrap();
    for file in [
        deploy_dir().join("prometheus/alerts.yml"),
        deploy_dir().join("grafana/dashboards/drover.json"),
    ] {
        let text = read(&file);
        for m in used.find_iter(&text) {
            let name = m.as_str();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| declared.contains(*b)))
                .unwrap_or(name);
            if !sites_exported && base.starts_with("drover_site_") {
                continue;
            }
            assert!(
                declared.contains(base),
                "{}: {name} is not a metric Drover exports",
                file.display()
            );
        }
    }
}

// ---- Grafana ----

/// Every `expr` in a dashboard, wherever it sits.
fn expressions(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, x) in map {
                match (k.as_str(), x) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => expressions(x, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|x| expressions(x, out)),
        _ => {}
    }
}

/// Grafana's variables replaced by what they stand for, so Prometheus can parse the query.
fn grafana_to_promql(expr: &str) -> String {
    let e = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "6h")
        .replace("$instance", ".*");
    assert!(!e.contains('$'), "unknown dashboard variable in {expr}");
    e
}

/// Runs `promtool check rules` on the expressions as recording rules.
fn promtool_parses(exprs: &[String]) -> Output {
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| serde_json::json!({"record": format!("dashboard:expr_{i}"), "expr": e}))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard_rules.json");
    let doc = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&path, doc.to_string()).unwrap();
    run(Command::new("promtool").args(["check", "rules"]).arg(&path))
}

#[test]
fn grafana_dashboard_is_valid_and_every_expression_parses() {
    let grafana = deploy_dir().join("grafana");
    let dashboard: Value =
        serde_json::from_str(&read(&grafana.join("dashboards/drover.json"))).unwrap();
    let datasource = yaml(&grafana.join("provisioning/datasources/prometheus.yml"));
    let uid = str_of(&datasource, "/datasources/0/uid");
    assert_eq!(str_of(&datasource, "/datasources/0/type"), "prometheus");
    assert_eq!(
        str_of(&datasource, "/datasources/0/url"),
        "http://prometheus:9090"
    );
    assert!(!str_of(&dashboard, "/uid").is_empty());
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id: {p}");
        let grid = &p["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24, "panel wider than the grid: {}", p["title"]);
        if p["type"] != "row" {
            assert_eq!(str_of(p, "/datasource/uid"), uid, "{}", p["title"]);
            for t in p["targets"].as_array().unwrap() {
                assert_eq!(str_of(t, "/datasource/uid"), uid);
            }
            titles.push(p["title"].as_str().unwrap().to_lowercase());
        }
    }
    for topic in [
        "received",
        "outcomes",
        "bounces by category",
        "queue depth",
        "top destinations",
        "duration",
        "spool",
        "webhook lag",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(topic)),
            "no panel on {topic}: {titles:?}"
        );
    }
    // The provider loads the folder compose mounts the dashboards into.
    let provider = yaml(&grafana.join("provisioning/dashboards/drover.yml"));
    let folder = str_of(&provider, "/providers/0/options/path");
    let compose = yaml(&deploy_dir().join("docker-compose.yml"));
    let mounts: Vec<&str> = compose["services"]["grafana"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        mounts.contains(&format!("./grafana/dashboards:{folder}:ro").as_str()),
        "{mounts:?}"
    );

    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "{exprs:?}");
    let exprs: Vec<String> = exprs.iter().map(|e| grafana_to_promql(e)).collect();
    if !have("promtool", &["--version"]) {
        return;
    }
    assert_ok(
        &promtool_parses(&exprs),
        "promtool on the dashboard's queries",
    );
    // The check does catch a query that does not parse.
    let broken = vec!["sum(rate(drover_messages_delivered_total[5m])".to_owned()];
    assert!(!promtool_parses(&broken).status.success());
}

// ---- docker compose and the image ----

/// The compose secrets as (the path a container sees, the file on the host).
fn compose_secrets(compose: &Value) -> Vec<(String, PathBuf)> {
    compose["secrets"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, s)| {
            (
                format!("/run/secrets/{name}"),
                deploy_dir().join(str_of(s, "/file")),
            )
        })
        .collect()
}

#[test]
fn compose_file_is_valid_and_every_file_it_names_exists() {
    let deploy = deploy_dir();
    let compose = yaml(&deploy.join("docker-compose.yml"));
    let services = compose["services"].as_object().unwrap();
    for s in ["drover", "sink", "prometheus", "grafana", "redis"] {
        assert!(services.contains_key(s), "service {s} missing");
    }
    for (name, service) in services {
        if let Some(build) = service.get("build") {
            let context = deploy.join(str_of(build, "/context"));
            assert!(
                context.join(str_of(build, "/dockerfile")).is_file(),
                "{name}: no Dockerfile"
            );
        }
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(deploy.join(source).exists(), "{name}: {source} missing");
            } else {
                let named = compose["volumes"].as_object().unwrap();
                assert!(
                    named.contains_key(source),
                    "{name}: volume {source} undeclared"
                );
            }
        }
        for secret in service["secrets"].as_array().into_iter().flatten() {
            assert!(compose["secrets"].get(secret.as_str().unwrap()).is_some());
        }
    }
    for (_, file) in compose_secrets(&compose) {
        assert!(file.is_file(), "{}", file.display());
    }

    // Drover's compose config: mounted over the image's, and it relays to the sink.
    let mounted = services["drover"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .find_map(|v| v.strip_suffix(":/etc/drover/drover.toml:ro"))
        .expect("drover's config is mounted");
    let text = read(&deploy.join(mounted));
    let config: toml::Value = toml::from_str(&text).unwrap();
    let sink_ip = str_of(&services["sink"], "/networks/drover/ipv4_address");
    let sink_listen = services["sink"]["command"]
        .as_array()
        .unwrap()
        .windows(2)
        .find(|w| w[0] == "--listen")
        .map(|w| w[1].as_str().unwrap().to_owned())
        .unwrap();
    let port = sink_listen.rsplit(':').next().unwrap();
    let route = &config["route"][0];
    assert_eq!(route["domain"].as_str(), Some("*"));
    assert_eq!(
        route["hosts"][0].as_str(),
        Some(format!("{sink_ip}:{port}").as_str())
    );
    // Prometheus scrapes drover where it listens, and every rule file it names is mounted.
    let prometheus = yaml(&deploy.join("prometheus/prometheus.yml"));
    let http_port = config["http"]["listen"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap();
    assert_eq!(
        str_of(&prometheus, "/scrape_configs/0/static_configs/0/targets/0"),
        format!("drover:{http_port}")
    );
    let prometheus_mounts = services["prometheus"]["volumes"].to_string();
    for rules in prometheus["rule_files"].as_array().unwrap() {
        let rules = rules.as_str().unwrap();
        assert!(deploy.join("prometheus").join(rules).is_file());
        assert!(
            prometheus_mounts.contains(&format!("/etc/prometheus/{rules}")),
            "{rules} not mounted"
        );
    }
    // The config validates with the secret where the container finds it.
    let mut local = text.clone();
    for (target, file) in compose_secrets(&compose) {
        local = local.replace(&target, file.to_str().unwrap());
    }
    assert_ok(&check_config(&local), "check-config of the compose config");
}

#[test]
fn dockerfile_runs_unprivileged_on_a_volume_with_a_baked_config() {
    let deploy = deploy_dir();
    let dockerfile = read(&deploy.join("Dockerfile"));
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    let instruction = |name: &str| -> Vec<&str> {
        runtime
            .lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter_map(|rest| rest.strip_prefix(' '))
            .collect()
    };
    let user = instruction("USER");
    assert_eq!(user.len(), 1, "{user:?}");
    let uid = user[0].split(':').next().unwrap();
    assert!(uid.parse::<u32>().is_ok_and(|u| u > 0), "USER {uid}");
    let volume = instruction("VOLUME");
    assert!(
        volume.iter().any(|v| v.contains("\"/var/lib/drover\"")),
        "{volume:?}"
    );
    let copy = instruction("COPY");
    assert!(copy.contains(&"deploy/drover.docker.toml /etc/drover/drover.toml"));
    assert!(instruction("CMD")[0].contains("\"/etc/drover/drover.toml\""));
    let root = deploy.join("..");
    for c in copy.iter().filter(|c| !c.starts_with("--from")) {
        let source = c.split_whitespace().next().unwrap();
        assert!(root.join(source).exists(), "COPY {source}: missing");
    }

    // The baked config keeps its spool on the volume, and needs the mounted tokens file.
    let text = read(&deploy.join("drover.docker.toml"));
    let config: toml::Value = toml::from_str(&text).unwrap();
    assert!(config["spool"]["path"]
        .as_str()
        .unwrap()
        .starts_with("/var/lib/drover/"));
    let tokens_path = config["http"]["api_tokens_file"].as_str().unwrap();
    let out = check_config(&text.replace(tokens_path, "/nonexistent/api_tokens"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http.api_tokens_file"));
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("api_tokens");
    std::fs::write(&tokens, "a-token\n").unwrap();
    let out = check_config(&text.replace(tokens_path, tokens.to_str().unwrap()));
    assert_ok(&out, "check-config of the image's config");
}

// ---- Kubernetes ----

fn by_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn kubernetes_manifests_fit_together() {
    let dir = deploy_dir().join("kubernetes");
    let docs = yaml_docs(&dir.join("drover.yaml"));
    let set = by_kind(&docs, "StatefulSet")[0];
    let services = by_kind(&docs, "Service");
    let pod = &set["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];

    // serviceName is a headless Service; a client Service has the HTTP and SMTP ports.
    let headless = services
        .iter()
        .find(|s| s["metadata"]["name"] == set["spec"]["serviceName"])
        .expect("serviceName names a Service");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    let client = services
        .iter()
        .find(|s| s["spec"]["clusterIP"].is_null())
        .expect("a client Service");
    let ports: HashMap<&str, u64> = client["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["port"].as_u64().unwrap()))
        .collect();
    assert_eq!(ports.get("http"), Some(&8025));
    assert_eq!(ports.get("smtp"), Some(&2025));
    for s in &services {
        assert!(labels_match(&s["spec"]["selector"], pod_labels));
    }

    // Probes, resources, unprivileged, long enough to drain.
    let container = &pod["spec"]["containers"][0];
    assert_eq!(str_of(container, "/readinessProbe/httpGet/path"), "/readyz");
    assert_eq!(str_of(container, "/livenessProbe/httpGet/path"), "/healthz");
    for kind in ["requests", "limits"] {
        assert!(container["resources"][kind]["memory"].is_string(), "{kind}");
        assert!(container["resources"][kind]["cpu"].is_string(), "{kind}");
    }
    let security = &pod["spec"]["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    let dockerfile = read(&deploy_dir().join("Dockerfile"));
    let uid = security["runAsUser"].as_u64().unwrap();
    assert!(
        dockerfile.contains(&format!("\nUSER {uid}:")),
        "runAsUser {uid} is not the image's user"
    );
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(grace >= 600, "terminationGracePeriodSeconds {grace}");

    // The PodDisruptionBudget and the ServiceMonitor select these pods / the headless Service.
    let pdb = by_kind(&docs, "PodDisruptionBudget")[0];
    assert!(labels_match(
        &pdb["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    let monitor = yaml(&dir.join("servicemonitor.yaml"));
    assert!(labels_match(
        &monitor["spec"]["selector"]["matchLabels"],
        &headless["metadata"]["labels"]
    ));
    // The operator's rules are the alerts promtool checks.
    let rule = yaml(&dir.join("prometheusrule.yaml"));
    assert_eq!(rule["kind"], "PrometheusRule");
    let alerts = yaml(&deploy_dir().join("prometheus/alerts.yml"));
    assert!(
        rule["spec"]["groups"] == alerts["groups"],
        "prometheusrule.yaml differs from deploy/prometheus/alerts.yml"
    );
    let port = str_of(&monitor, "/spec/endpoints/0/port");
    assert!(headless["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == port));

    // The config comes from the ConfigMap, secrets from the Secret, mounted as files; the
    // config validates with the Secret's files where the pod sees them.
    let mounts: HashMap<&str, &str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap(),
                m["mountPath"].as_str().unwrap(),
            )
        })
        .collect();
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == name).unwrap();
    let config_map = by_kind(&docs, "ConfigMap")[0];
    let config_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == config_map["metadata"]["name"])
        .expect("the ConfigMap is mounted");
    let config_dir = mounts[config_volume["name"].as_str().unwrap()];
    let args = container["args"].to_string();
    assert!(
        args.contains(&format!("{config_dir}/drover.toml")),
        "{args}"
    );
    let secret = by_kind(&docs, "Secret")[0];
    let secret_volume = volumes
        .iter()
        .find(|v| v["secret"]["secretName"] == secret["metadata"]["name"])
        .expect("the Secret is mounted");
    let secret_dir = mounts[secret_volume["name"].as_str().unwrap()];
    let spool_dir = mounts["spool"];
    assert_eq!(
        str_of(set, "/spec/volumeClaimTemplates/0/metadata/name"),
        "spool"
    );
    assert!(volume("tmp")["emptyDir"].is_object());
    let text = str_of(config_map, "/data/drover.toml");
    assert!(
        !text.contains("api_tokens ="),
        "tokens belong in the Secret"
    );
    let config: toml::Value = toml::from_str(text).unwrap();
    assert!(config["spool"]["path"]
        .as_str()
        .unwrap()
        .starts_with(spool_dir));
    let files = tempfile::tempdir().unwrap();
    for (key, value) in secret["stringData"].as_object().unwrap() {
        std::fs::write(files.path().join(key), value.as_str().unwrap()).unwrap();
    }
    for key in ["api_tokens_file", "auth_users_file"] {
        let section = if key == "api_tokens_file" {
            "http"
        } else {
            "smtp_listener"
        };
        let path = config[section][key].as_str().unwrap();
        let name = path
            .strip_prefix(&format!("{secret_dir}/"))
            .unwrap_or_else(|| panic!("{section}.{key} is not in the Secret"));
        assert!(secret["stringData"].get(name).is_some(), "{name}");
    }
    let local = text.replace(secret_dir, files.path().to_str().unwrap());
    assert_ok(&check_config(&local), "check-config of the ConfigMap");
    // The shutdown grace fits well inside the pod's termination grace.
    let shutdown = config["http"]["shutdown_grace"].as_str().unwrap();
    let shutdown = humantime::parse_duration(shutdown).unwrap().as_secs();
    assert!(shutdown > 0 && shutdown * 10 < grace);
}

#[test]
fn kubernetes_manifests_validate_against_their_schemas() {
    let dir = deploy_dir().join("kubernetes");
    if !have("kubernetes-validate", &["--version"]) {
        return;
    }
    let out = run(Command::new("kubernetes-validate")
        .args(["--strict"])
        .arg(dir.join("drover.yaml")));
    assert_ok(&out, "kubernetes-validate");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!said.contains("Couldn't find schema"), "{said}");
    // Strict validation catches a misspelt field.
    let misspelt = read(&dir.join("drover.yaml")).replace(
        "terminationGracePeriodSeconds:",
        "terminationGracePeriodSecond:",
    );
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, misspelt).unwrap();
    let out = run(Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&bad));
    assert!(!out.status.success(), "a misspelt field passed");

    // The ServiceMonitor is a CRD: checked against the part of its schema it uses.
    if !have("python3", &["-c", "import jsonschema, yaml"]) {
        return;
    }
    let schema =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/deploy/servicemonitor.schema.json");
    let script = "import json, sys, yaml, jsonschema\n\
                  schema = json.load(open(sys.argv[1]))\n\
                  for doc in yaml.safe_load_all(open(sys.argv[2])):\n\
                  \x20   jsonschema.validate(doc, schema)\n";
    let validate = |file: &Path| {
        run(Command::new("python3")
            .args(["-c", script])
            .arg(&schema)
            .arg(file))
    };
    assert_ok(
        &validate(&dir.join("servicemonitor.yaml")),
        "the ServiceMonitor against its schema",
    );
    let bad = tmp.path().join("bad-monitor.yaml");
    std::fs::write(
        &bad,
        read(&dir.join("servicemonitor.yaml")).replace("interval: 15s", "interval: often"),
    )
    .unwrap();
    assert!(!validate(&bad).status.success(), "a bad interval passed");
}
