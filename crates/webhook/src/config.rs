//! `[[webhook]]`: one endpoint and what it receives.

use crate::WebhookError;
use accounting::RecordType;
use reqwest::header::HeaderValue;
use reqwest::Url;
use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// `[[webhook]]` (contract §2): where records go, which ones, and how hard to try.
///
/// Deserialises from TOML with every key but `url` optional and unknown keys refused; durations
/// are written like `"500ms"`, `"10s"` or `"5m"`. Call [`WebhookConfig::validate`] before use
/// ([`crate::spawn`] does).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Label in metrics, logs, status and the `X-Drover-Webhook` header, and the key of the
    /// stored cursor; empty = derived from the url (host, port when not the default, path).
    pub name: String,
    /// `http://` or `https://` endpoint the batches are POSTed to.
    pub url: String,
    /// HMAC-SHA256 key for `X-Drover-Signature`; empty = unsigned.
    pub secret: String,
    /// Record `type` values to send; empty = all.
    pub types: Vec<String>,
    /// Only records whose `tenant` is one of these; empty = all (records without a tenant too).
    pub tenants: Vec<String>,
    /// Records per request, at least 1.
    pub batch_size: usize,
    /// How long a partial batch waits for more records before it goes.
    #[serde(deserialize_with = "human_duration")]
    pub max_delay: Duration,
    /// Limit on one request, from connecting to the end of the response.
    #[serde(deserialize_with = "human_duration")]
    pub timeout: Duration,
    /// Ceiling of the retry delay, which starts at 1 s and doubles.
    #[serde(deserialize_with = "human_duration")]
    pub max_backoff: Duration,
    /// Whether the server's certificate is checked; `false` accepts any certificate.
    pub tls_verify: bool,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            name: String::new(),
            url: String::new(),
            secret: String::new(),
            types: Vec::new(),
            tenants: Vec::new(),
            batch_size: 100,
            max_delay: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
            tls_verify: true,
        }
    }
}

/// The secret is left out, so a configuration dump in a log leaks no key.
impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = if self.secret.is_empty() {
            ""
        } else {
            "<redacted>"
        };
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &self.display_url())
            .field("secret", &secret)
            .field("types", &self.types)
            .field("tenants", &self.tenants)
            .field("batch_size", &self.batch_size)
            .field("max_delay", &self.max_delay)
            .field("timeout", &self.timeout)
            .field("max_backoff", &self.max_backoff)
            .field("tls_verify", &self.tls_verify)
            .finish()
    }
}

fn human_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

fn invalid(key: &'static str, message: impl Into<String>) -> WebhookError {
    WebhookError::Invalid {
        key,
        message: message.into(),
    }
}

impl WebhookConfig {
    /// Checks every key: the url (http or https, with a host), the type names (those of
    /// contract §4), the batch size, the durations and the label (it travels in a header).
    pub fn validate(&self) -> Result<(), WebhookError> {
        self.parsed_url()?;
        for name in &self.types {
            if serde_json::from_value::<RecordType>(serde_json::Value::String(name.clone()))
                .is_err()
            {
                return Err(invalid(
                    "types",
                    format!(
                        "unknown record type {name:?} (one of Reception, Delivery, \
                         TransientFailure, Bounce, Expiration, AdminBounce, AsyncBounce, \
                         Complaint, Unsubscribe, Transfer)"
                    ),
                ));
            }
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size", "must be at least 1"));
        }
        if self.timeout.is_zero() {
            return Err(invalid("timeout", "must be more than 0"));
        }
        if self.max_backoff.is_zero() {
            return Err(invalid("max_backoff", "must be more than 0"));
        }
        let label = self.label();
        if label.trim().is_empty() || label.trim() != label {
            return Err(invalid(
                "name",
                "must not be blank or start or end with spaces",
            ));
        }
        if !label.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            || HeaderValue::from_str(&label).is_err()
        {
            return Err(invalid(
                "name",
                format!("{label:?} cannot travel in an HTTP header (use visible ASCII)"),
            ));
        }
        Ok(())
    }

    /// `name`, or when it is empty the url's host (with its port when not the default) and
    /// path without the trailing slash: `platform.example/drover-events`.
    pub fn label(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        match Url::parse(&self.url) {
            Ok(url) => {
                let mut label = url.host_str().unwrap_or_default().to_string();
                if let Some(port) = url.port() {
                    label.push_str(&format!(":{port}"));
                }
                label.push_str(url.path().trim_end_matches('/'));
                label
            }
            Err(_) => self.url.clone(),
        }
    }

    pub(crate) fn parsed_url(&self) -> Result<Url, WebhookError> {
        if self.url.is_empty() {
            return Err(invalid("url", "required"));
        }
        let url = Url::parse(&self.url).map_err(|e| invalid("url", format!("{e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("url", "must start with http:// or https://"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("url", "has no host"));
        }
        Ok(url)
    }

    /// The url for status pages: a password in it is replaced, so a status dump leaks no
    /// credential.
    pub(crate) fn display_url(&self) -> String {
        match Url::parse(&self.url) {
            Ok(mut url) if url.password().is_some() => {
                // Only fails for urls that cannot have credentials, which this one has.
                let _ = url.set_password(Some("redacted"));
                url.to_string()
            }
            _ => self.url.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> WebhookConfig {
        WebhookConfig {
            url: url.to_string(),
            ..WebhookConfig::default()
        }
    }

    #[test]
    fn toml_with_defaults_and_human_durations() {
        let c: WebhookConfig = toml::from_str(
            r#"
            url = "https://platform.example/drover-events"
            secret = "s3cret"
            types = ["Delivery", "Bounce"]
            max_delay = "500ms"
            max_backoff = "1m"
            "#,
        )
        .expect("parses");
        assert_eq!(c.max_delay, Duration::from_millis(500));
        assert_eq!(c.max_backoff, Duration::from_secs(60));
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.batch_size, 100);
        assert!(c.tls_verify);
        assert!(c.tenants.is_empty());
        c.validate().expect("valid");
        assert_eq!(c.label(), "platform.example/drover-events");
    }

    #[test]
    fn toml_refuses_unknown_keys_and_bad_durations() {
        let unknown = toml::from_str::<WebhookConfig>("url = \"http://a\"\nurls = 1");
        assert!(unknown.is_err());
        let bad = toml::from_str::<WebhookConfig>("url = \"http://a\"\ntimeout = \"soon\"");
        let message = bad.expect_err("refused").to_string();
        assert!(message.contains("invalid duration"), "{message}");
    }

    #[test]
    fn validate_names_the_key() {
        let key = |c: WebhookConfig| match c.validate() {
            Err(WebhookError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        };
        assert_eq!(key(config("")), "url");
        assert_eq!(key(config("ftp://platform.example/")), "url");
        assert_eq!(key(config("not a url")), "url");
        assert_eq!(
            key(WebhookConfig {
                types: vec!["Delivered".into()],
                ..config("http://a/")
            }),
            "types"
        );
        assert_eq!(
            key(WebhookConfig {
                batch_size: 0,
                ..config("http://a/")
            }),
            "batch_size"
        );
        assert_eq!(
            key(WebhookConfig {
                timeout: Duration::ZERO,
                ..config("http://a/")
            }),
            "timeout"
        );
        assert_eq!(
            key(WebhookConfig {
                max_backoff: Duration::ZERO,
                ..config("http://a/")
            }),
            "max_backoff"
        );
        assert_eq!(
            key(WebhookConfig {
                name: "caf\u{e9}".into(),
                ..config("http://a/")
            }),
            "name"
        );
        assert_eq!(
            key(WebhookConfig {
                name: " x".into(),
                ..config("http://a/")
            }),
            "name"
        );
        let every_type = WebhookConfig {
            types: [
                "Reception",
                "Delivery",
                "TransientFailure",
                "Bounce",
                "Expiration",
                "AdminBounce",
                "AsyncBounce",
                "Complaint",
                "Unsubscribe",
                "Transfer",
            ]
            .map(String::from)
            .to_vec(),
            ..config("http://a/")
        };
        every_type.validate().expect("every contract type is known");
    }

    #[test]
    fn label_is_the_name_or_host_port_and_path() {
        assert_eq!(config("https://h.example/").label(), "h.example");
        assert_eq!(
            config("https://h.example:8443/a/b/").label(),
            "h.example:8443/a/b"
        );
        assert_eq!(config("http://h.example:80/x").label(), "h.example/x");
        let named = WebhookConfig {
            name: "crm".into(),
            ..config("https://h.example/")
        };
        assert_eq!(named.label(), "crm");
    }

    #[test]
    fn debug_hides_the_secret_and_the_password() {
        let c = WebhookConfig {
            secret: "hunter2".into(),
            ..config("https://u:pw@h.example/x")
        };
        let text = format!("{c:?}");
        assert!(!text.contains("hunter2") && !text.contains("pw@"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }

    #[test]
    fn display_url_hides_a_password() {
        assert_eq!(
            config("https://u:pw@h.example/x").display_url(),
            "https://u:redacted@h.example/x"
        );
        assert_eq!(
            config("https://h.example/x").display_url(),
            "https://h.example/x"
        );
    }
}
