//! The TOML configuration (contract §2). Every key is optional; unknown keys are errors.

use rate_limiter::{Limits, Matcher, Rate, Rule, Scope};
use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a value of the wrong type.
    #[error("{0}")]
    Parse(String),
    /// A value that parsed but makes no sense.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, e.g. `shaping[2].max_message_rate`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// A duration written like `"90s"`, `"5m"` or `"4d12h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
}

/// A size written like `"64MiB"`, `"1GiB"`, `"500MB"` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"<number>[unit]"`; units B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB (the
    /// short and `iB` forms are powers of 1024, `KB`, `MB`... of 1000).
    pub fn parse(text: &str) -> Option<ByteSize> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let n: u64 = digits.parse().ok()?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "kb" => 1_000,
            "m" | "mib" => 1 << 20,
            "mb" => 1_000_000,
            "g" | "gib" => 1 << 30,
            "gb" => 1_000_000_000,
            "t" | "tib" => 1 << 40,
            "tb" => 1_000_000_000_000,
            _ => return None,
        };
        n.checked_mul(factor).map(ByteSize)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t).ok_or_else(|| {
                serde::de::Error::custom(format!("invalid size {t:?} (e.g. \"64MiB\", \"1GiB\")"))
            }),
        }
    }
}

/// An optional duration: `""` (or absent, where the default is none) means none.
fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HumanDuration>, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim().is_empty() {
        return Ok(None);
    }
    humantime::parse_duration(&s)
        .map(|d| Some(HumanDuration(d)))
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

/// An optional size: `""` means none.
fn optional_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ByteSize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Empty(EmptyString),
        Size(ByteSize),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::Empty(_) => None,
        Raw::Size(size) => Some(size),
    })
}

/// Only `""` (or blanks).
struct EmptyString;

impl<'de> Deserialize<'de> for EmptyString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            Ok(EmptyString)
        } else {
            Err(serde::de::Error::custom("not empty"))
        }
    }
}

fn secs(n: u64) -> HumanDuration {
    HumanDuration(Duration::from_secs(n))
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[spool]`
    pub spool: SpoolConfig,
    /// `[http]`
    pub http: HttpConfig,
    /// `[smtp_listener]`
    pub smtp_listener: SmtpListenerConfig,
    /// `[dns]`
    pub dns: DnsConfig,
    /// `[delivery]`
    pub delivery: DeliveryConfig,
    /// `[retry]`
    pub retry: RetryConfig,
    /// `[[route]]`
    pub route: Vec<RouteConfig>,
    /// `[accounting]`
    pub accounting: AccountingConfig,
    /// `[[webhook]]`: accounting records POSTed to HTTP endpoints.
    pub webhook: Vec<webhook::WebhookConfig>,
    /// `[[shaping]]`
    pub shaping: Vec<ShapingConfig>,
    /// `[[automation]]`
    pub automation: Vec<AutomationConfig>,
    /// `[[dkim]]`
    pub dkim: Vec<DkimConfig>,
    /// `[bounce_processing]`
    pub bounce_processing: BounceProcessingConfig,
    /// `[[egress_source]]`: source addresses with their EHLO names (extension).
    pub egress_source: Vec<EgressSourceConfig>,
    /// `[[egress_pool]]`: weighted groups of sources (extension).
    pub egress_pool: Vec<EgressPoolConfig>,
    /// `[[egress_rule]]`: which pool a message uses, first match wins (extension).
    pub egress_rule: Vec<EgressRuleConfig>,
    /// `[[rate_limit]]`: message rates per tenant or campaign (extension).
    pub rate_limit: Vec<RateLimitConfig>,
    /// `[stamping]`: complaint and unsubscribe headers (extension).
    pub stamping: StampingConfig,
    /// `[suppression]` (extension).
    pub suppression: SuppressionConfig,
    /// `[unsubscribe]`: the one-click unsubscribe listener (extension).
    pub unsubscribe: UnsubscribeConfig,
    /// `[[tenant]]`: per-tenant settings (extension).
    pub tenant: Vec<TenantConfig>,
    /// `[cluster]`: limits shared with other instances through Redis (extension).
    pub cluster: Option<ClusterConfig>,
    /// `[metrics]` (extension).
    pub metrics: MetricsConfig,
    /// `[drain]`: moving the queue to a peer at shutdown (extension).
    pub drain: DrainConfig,
}

/// `[cluster]`: the Redis that holds the limits of `scope = "cluster"` shaping rules.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://host:port/db`.
    pub redis_url: String,
    /// This instance's name in its lease ids (default: the host name, a pod's name).
    #[serde(default)]
    pub instance_id: String,
    /// How long a lease outlives its instance's last heartbeat (a crashed instance's
    /// sessions stop counting after it).
    #[serde(default = "thirty_seconds")]
    pub lease_ttl: HumanDuration,
    /// The fraction of a cluster limit this instance uses alone while Redis is unreachable.
    #[serde(default = "default_local_share")]
    pub local_share: f64,
    /// Prefix of every Redis key.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How long a Redis call may take before the limits fall back to the local share.
    #[serde(default = "default_redis_timeout")]
    pub timeout: HumanDuration,
}

fn thirty_seconds() -> HumanDuration {
    secs(30)
}

fn default_local_share() -> f64 {
    0.2
}

fn default_key_prefix() -> String {
    "drover:".to_owned()
}

fn default_redis_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(200))
}

impl ClusterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        cluster_limits::check_url(&self.redis_url).map_err(|e| invalid("cluster.redis_url", e))?;
        if self.lease_ttl.0 < Duration::from_secs(1) {
            return Err(invalid("cluster.lease_ttl", "must be at least 1s"));
        }
        if !(self.local_share > 0.0 && self.local_share <= 1.0) {
            return Err(invalid(
                "cluster.local_share",
                "must be above 0 and at most 1",
            ));
        }
        if self.timeout.0.is_zero() || self.timeout.0 > self.lease_ttl.0 / 3 {
            return Err(invalid(
                "cluster.timeout",
                "must be positive and at most a third of lease_ttl",
            ));
        }
        Ok(())
    }

    /// The settings of the cluster limits; `hostname` names the instance when
    /// `instance_id` is unset.
    pub fn settings(&self, hostname: &str) -> cluster_limits::Settings {
        cluster_limits::Settings {
            redis_url: self.redis_url.clone(),
            instance_id: if self.instance_id.is_empty() {
                hostname.to_owned()
            } else {
                self.instance_id.clone()
            },
            lease_ttl: self.lease_ttl.0,
            key_prefix: self.key_prefix.clone(),
            timeout: self.timeout.0,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// How many sites, the busiest by recent volume, get their own `site` label in the
    /// per-site series; the rest share `site="other"` (default 50; 0: all are `other`).
    pub top_sites: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { top_sites: 50 }
    }
}

/// `[drain]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// The base URL of a peer engine (`http://peer:8025`): when set, SIGTERM first moves
    /// every queued message there (as `drover drain --to` does), then stops.
    pub on_shutdown_to: Option<String>,
    /// A file whose first line is the peer's API token, for the shutdown drain and for
    /// KumoMTA's xfer call (which carries none).
    pub peer_token_file: Option<PathBuf>,
}

impl DrainConfig {
    /// The peer's token from `peer_token_file`, if one is configured.
    pub fn peer_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.peer_token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid(
                "drain.peer_token_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let token = text.lines().next().unwrap_or("").trim().to_owned();
        if token.is_empty() {
            return Err(invalid("drain.peer_token_file", "the file holds no token"));
        }
        Ok(Some(token))
    }
}

/// A peer engine's base URL (`drover drain --to`, `[drain] on_shutdown_to`): http or https
/// with a host, and nothing after the path.
pub fn peer_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text.trim()).map_err(|e| format!("{text:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{text:?}: not an http(s) URL with a host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{text:?}: a base URL takes no query or fragment"));
    }
    Ok(url)
}

/// `[[tenant]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant as injected.
    pub name: String,
    /// Its turn, in messages, when several tenants' mail waits for one destination (default
    /// 1 for every tenant: equal shares).
    #[serde(default = "one")]
    pub weight: u32,
}

/// `[unsubscribe]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnsubscribeConfig {
    /// Where the one-click URLs of `stamping.list_unsubscribe_url` are served (plain HTTP:
    /// put the TLS-terminating proxy that owns the https name in front). Unset: not served.
    pub listen: Option<SocketAddr>,
}

/// `[suppression]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SuppressionConfig {
    /// Bounce categories whose synchronous bounces suppress the recipient; unset:
    /// `bad-mailbox`, `bad-domain`, `inactive-mailbox`; `[]`: none.
    pub bounce_categories: Option<Vec<accounting::BounceCategory>>,
}

/// Declares a stamping table: its own fields, then the header fields `[stamping]` and each
/// `[[stamping.rule]]` share (one list, so the two tables cannot drift apart).
macro_rules! stamping_table {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            /// `X-Complaints-To`: where receivers send abuse complaints.
            pub x_complaints_to: Option<String>,
            /// `X-CSA-Complaints` (Certified Senders Alliance), e.g. `whitelist-complaints@eco.de`.
            pub x_csa_complaints: Option<String>,
            /// `Feedback-ID` template (`{{campaign}}`, `{{tenant}}`, `{{sender_id}}`, `{{id}}`), as
            /// Gmail's feedback loop reads it: `{{campaign}}:{{tenant}}:drover:{{sender_id}}`.
            pub feedback_id: Option<String>,
            /// `{{sender_id}}` of the `Feedback-ID` template.
            pub sender_id: Option<String>,
            /// A `mailto:` entry in `List-Unsubscribe`: a tagged address under the first bounce
            /// domain; mail to it unsubscribes the recipient.
            pub list_unsubscribe_mailto: Option<bool>,
            /// Base of the one-click (RFC 8058) `https:` entry in `List-Unsubscribe`; a tagged token
            /// is appended, and `List-Unsubscribe-Post: List-Unsubscribe=One-Click` is stamped.
            pub list_unsubscribe_url: Option<String>,
            /// What to do when the client already wrote one of these headers: `keep` (default) or
            /// `replace`.
            pub existing: Option<feedback::stamp::Existing>,
        }
    };
}

stamping_table!(
    /// `[stamping]`: the complaint and unsubscribe headers of all mail, and
    /// `[[stamping.rule]]`s for a tenant and/or campaign (the most specific matching rule
    /// wins, field by field; unset fields fall through).
    StampingConfig {
        /// Rules for a tenant, a campaign, or both.
        rule: Vec<StampRuleConfig>,
    }
);

stamping_table!(
    /// `[[stamping.rule]]`: the fields of `[stamping]` for a tenant, a campaign, or both.
    StampRuleConfig {
        /// Tenant as injected.
        tenant: Option<String>,
        /// Campaign as injected.
        campaign: Option<String>,
    }
);

/// `[[rate_limit]]`: exactly one of `tenant` and `campaign`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Tenant as injected.
    pub tenant: Option<String>,
    /// Campaign as injected.
    pub campaign: Option<String>,
    /// `N/s`, `N/m`, `N/h` across every destination.
    pub max_message_rate: String,
}

/// `[[egress_source]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressSourceConfig {
    /// Name used in pools, records and queue names.
    pub name: String,
    /// Local address to bind before connecting; unset = the OS's choice.
    pub source_address: Option<std::net::IpAddr>,
    /// EHLO name for sessions from this source; unset = `delivery.ehlo_name`.
    pub ehlo_name: Option<String>,
}

/// `[[egress_pool]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPoolConfig {
    /// Pool name; `default` is used by messages no rule matches.
    pub name: String,
    /// Members and their weights.
    pub sources: Vec<WeightedSource>,
}

/// A pool member.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedSource {
    /// An `[[egress_source]]` name.
    pub name: String,
    /// Relative share of messages (default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// `[[egress_rule]]`: every given field must match.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRuleConfig {
    /// Tenant as injected.
    pub tenant: Option<String>,
    /// Campaign as injected.
    pub campaign: Option<String>,
    /// Recipient domain.
    pub domain: Option<String>,
    /// The `[[egress_pool]]` to use.
    pub pool: String,
}

/// `[spool]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Directory of the RocksDB spool and state.
    pub path: PathBuf,
    /// Sync every accepted message to disk before answering (extension; default true).
    pub sync: bool,
    /// Most messages queued at once; injection beyond it gets 503 (extension; back-pressure).
    pub max_queued: usize,
    /// MiB of message bodies held in memory before they are flushed to blob files
    /// (extension): bodies delivered and deleted before the flush are never written twice.
    pub body_buffer_mb: usize,
    /// MiB RocksDB may hold in memory in all: memtables of every column family (the body
    /// buffer included) and the block cache (extension). It also bounds the write-ahead log,
    /// so a start replays at most this much.
    pub memory_budget_mb: usize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: PathBuf::from("./drover-data"),
            sync: true,
            max_queued: 10_000_000,
            body_buffer_mb: queue::DEFAULT_BODY_BUFFER_BYTES >> 20,
            memory_budget_mb: queue::DEFAULT_MEMORY_BUDGET_BYTES >> 20,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the inject/admin API, `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// Bearer tokens; when non-empty every `/api/` call needs one.
    pub api_tokens: Vec<String>,
    /// Largest accepted request body in bytes (extension; default 64 MiB). Larger: 413. A
    /// gzip body is held to it once decoded too.
    pub max_body_size: usize,
    /// Most recipients one inject request may carry (extension; default 10 000). More: 413.
    pub max_recipients: usize,
    /// A file of more API tokens, one per line (extension): kept out of the configuration,
    /// e.g. a mounted Kubernetes Secret. Read at start-up, added to `api_tokens`.
    pub api_tokens_file: Option<PathBuf>,
    /// On SIGTERM, how long `/readyz` answers 503 while everything is still accepted, before
    /// the listeners stop taking work (extension; default 0s): time for a load balancer to
    /// take the instance out of rotation.
    pub shutdown_grace: HumanDuration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8025)),
            api_tokens: Vec::new(),
            max_body_size: 64 * 1024 * 1024,
            max_recipients: 10_000,
            api_tokens_file: None,
            shutdown_grace: secs(0),
        }
    }
}

/// `[smtp_listener]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpListenerConfig {
    /// Address of the SMTP injection listener.
    pub listen: SocketAddr,
    /// Clients that may relay without AUTH (CIDR).
    pub relay_networks: Vec<String>,
    /// Largest accepted message (extension; default 50 MiB).
    pub max_message_size: u64,
    /// PEM certificate chain for STARTTLS (extension; with `tls_key_file`, else no STARTTLS).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for STARTTLS (extension).
    pub tls_key_file: Option<PathBuf>,
    /// Users that may AUTH (PLAIN, LOGIN) and then relay from anywhere (extension). AUTH is
    /// offered only over TLS, or to loopback clients.
    pub auth_users: Vec<AuthUser>,
    /// Failed AUTH attempts from one client address within `auth_failure_window` after which
    /// its further AUTH gets `421 4.7.0` and the connection closes (extension; 0: no limit).
    pub max_auth_failures: u32,
    /// The window `max_auth_failures` counts in (extension).
    pub auth_failure_window: HumanDuration,
    /// Connections open at once, all clients; more get `421 4.7.0` as banner (extension).
    pub max_connections: usize,
    /// Connections open at once from one client address (extension).
    pub max_connections_per_ip: usize,
    /// Longest wait for a command line (inside DATA: for more bytes) before the connection
    /// is closed (extension; RFC 5321 §4.5.3.2).
    pub idle_timeout: HumanDuration,
    /// Longest wait for a STARTTLS handshake (extension).
    pub tls_handshake_timeout: HumanDuration,
    /// Longest wait for a write of replies to a client that does not read (extension).
    pub write_timeout: HumanDuration,
    /// Recipients per message; more get `452 4.5.3` (extension).
    pub max_recipients: usize,
    /// A message with a bare CR or LF in its data: refused with `550 5.6.11` (`reject`) or
    /// converted to CRLF (`normalize`) (extension). Mail for the bounce domains alone is
    /// always normalised.
    pub bare_newlines: BareNewlines,
    /// A file of more `auth_users`, one `user:password_hash` per line (extension): kept out
    /// of the configuration, e.g. a mounted Kubernetes Secret. Read at start-up.
    pub auth_users_file: Option<PathBuf>,
}

/// `smtp_listener.bare_newlines`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareNewlines {
    /// Refuse the message with `550 5.6.11` (Postfix's `smtpd_forbid_bare_newline = reject`).
    #[default]
    Reject,
    /// Convert each bare CR and bare LF to CRLF and accept the message.
    Normalize,
}

/// One `[[smtp_listener.auth_users]]` entry: a user name and exactly one of `password` and
/// `password_hash`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthUser {
    /// User name.
    pub user: String,
    /// Password, in clear: protect the configuration file.
    #[serde(default)]
    pub password: Option<String>,
    /// Argon2 hash of the password as a PHC string (`$argon2id$v=19$m=...`), as printed by
    /// `drover hash-password`.
    #[serde(default)]
    pub password_hash: Option<String>,
}

impl std::fmt::Debug for AuthUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthUser")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Default for SmtpListenerConfig {
    fn default() -> Self {
        SmtpListenerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 2025)),
            relay_networks: vec!["127.0.0.0/8".into(), "::1/128".into()],
            max_message_size: 50 * 1024 * 1024,
            tls_cert_file: None,
            tls_key_file: None,
            auth_users: Vec::new(),
            max_auth_failures: 5,
            auth_failure_window: secs(300),
            max_connections: 1000,
            max_connections_per_ip: 50,
            idle_timeout: secs(300),
            tls_handshake_timeout: secs(30),
            write_timeout: secs(60),
            max_recipients: 1000,
            bare_newlines: BareNewlines::Reject,
            auth_users_file: None,
        }
    }
}

/// `[dns]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// `ip:port` name servers; empty = the system resolver configuration.
    pub nameservers: Vec<String>,
    /// Per-query timeout (extension).
    pub timeout: HumanDuration,
    /// Attempts per query (extension).
    pub attempts: usize,
    /// Most MX lookups sent to the name servers at once (extension): a burst of due domains
    /// waits its turn instead of flooding the resolver.
    pub max_in_flight: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: secs(5),
            attempts: 2,
            max_in_flight: 256,
        }
    }
}

/// `[delivery]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// EHLO name; empty = the machine's hostname.
    pub ehlo_name: String,
    /// Destination port for every MX.
    pub smtp_port: u16,
    /// Idle sessions are closed (QUIT) after this long (extension).
    pub idle_timeout: HumanDuration,
    /// TCP connect timeout (extension).
    pub connect_timeout: HumanDuration,
    /// Timeout for each reply before DATA (extension; RFC 5321 says 5 min).
    pub command_timeout: HumanDuration,
    /// Timeout for the reply to the final dot (extension; RFC 5321 says 10 min).
    pub data_timeout: HumanDuration,
    /// Outbound SMTP sessions open at once across every destination (extension): a burst of
    /// thousands of due domains opens sessions up to this, not one per domain at once.
    pub max_connections: usize,
    /// The greeting (extension; default `command_timeout`, RFC 5321: 5 min).
    pub banner_timeout: Option<HumanDuration>,
    /// EHLO/HELO, STARTTLS and the TLS handshake (extension; default `command_timeout`).
    pub ehlo_timeout: Option<HumanDuration>,
    /// MAIL FROM (extension; default `command_timeout`, RFC 5321: 5 min).
    pub mail_timeout: Option<HumanDuration>,
    /// Each RCPT TO (extension; default `command_timeout`, RFC 5321: 5 min).
    pub rcpt_timeout: Option<HumanDuration>,
    /// DATA's 354 (extension; default the lesser of `command_timeout` and RFC 5321's 2 min).
    pub data_start_timeout: Option<HumanDuration>,
    /// Each block of the message body (extension; default the lesser of `command_timeout`
    /// and RFC 5321's 3 min).
    pub data_block_timeout: Option<HumanDuration>,
    /// Delivery workers at once across every queue (extension). A worker serves one queue
    /// (a domain, or a domain and egress source) at a time; when all are busy, queues without
    /// a worker are served first and busy workers hand over after a turn, so a big domain
    /// never starves small ones.
    pub max_workers: usize,
    /// Most MX addresses one attempt to open a session tries, across all MX hosts
    /// (extension; Postfix's `smtp_mx_address_limit`).
    pub mx_address_limit: usize,
    /// Most time one attempt to open a session may take across all the addresses it tries,
    /// connect, banner, EHLO and STARTTLS included (extension).
    pub session_setup_timeout: HumanDuration,
}

impl DeliveryConfig {
    /// The per-stage timeouts of outbound sessions.
    pub fn timeouts(&self) -> connection_pool::Timeouts {
        let command = self.command_timeout.0;
        let or = |v: &Option<HumanDuration>, d: Duration| v.map_or(d, |v| v.0);
        connection_pool::Timeouts {
            connect: self.connect_timeout.0,
            banner: or(&self.banner_timeout, command),
            ehlo: or(&self.ehlo_timeout, command),
            mail: or(&self.mail_timeout, command),
            rcpt: or(&self.rcpt_timeout, command),
            data: or(
                &self.data_start_timeout,
                command.min(Duration::from_secs(120)),
            ),
            data_block: or(
                &self.data_block_timeout,
                command.min(Duration::from_secs(180)),
            ),
            final_dot: self.data_timeout.0,
            other: command.min(Duration::from_secs(120)),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            ehlo_name: String::new(),
            smtp_port: 25,
            idle_timeout: secs(30),
            connect_timeout: secs(30),
            command_timeout: secs(300),
            data_timeout: secs(600),
            max_connections: 1000,
            banner_timeout: None,
            ehlo_timeout: None,
            mail_timeout: None,
            rcpt_timeout: None,
            data_start_timeout: None,
            data_block_timeout: None,
            max_workers: 2000,
            mx_address_limit: 5,
            session_setup_timeout: secs(120),
        }
    }
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Delay before each retry; the last one repeats.
    pub intervals: Vec<HumanDuration>,
    /// Age at which a message expires.
    pub max_age: HumanDuration,
    /// First retry after a reply that looks like greylisting.
    pub greylist_retry: HumanDuration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let m = |n: u64| secs(60 * n);
        RetryConfig {
            intervals: vec![m(5), m(10), m(20), m(40), m(80), m(160)],
            max_age: secs(4 * 86_400),
            greylist_retry: m(5),
        }
    }
}

/// `[[route]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Domain, or `*` for every domain.
    pub domain: String,
    /// `host:port` list, tried in order.
    pub hosts: Vec<String>,
}

/// `[accounting]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountingConfig {
    /// JSON Lines file holding the newest records; empty = `<spool.path>/accounting.jsonl`.
    /// Closed segments sit beside it as `<path>.<sequence>[.zst]`.
    pub path: String,
    /// Close the current segment past this size.
    pub rotate_size: ByteSize,
    /// ... or past this age (`""` = never by age).
    #[serde(deserialize_with = "optional_duration")]
    pub rotate_age: Option<HumanDuration>,
    /// Compress closed segments with zstd (extension).
    pub compress: bool,
    /// Delete closed segments older than this (extension; `""` = keep them).
    #[serde(deserialize_with = "optional_duration")]
    pub retain_age: Option<HumanDuration>,
    /// Delete the oldest closed segments while all of them take more than this (extension;
    /// `""` = no limit).
    #[serde(deserialize_with = "optional_size")]
    pub retain_size: Option<ByteSize>,
    /// How much of the log retention keeps beyond its limits for a webhook that has not
    /// sent it yet; past it the oldest is deleted anyway, with an error and a metric
    /// (extension).
    pub webhook_hold: ByteSize,
    /// Also write every record as a PowerMTA-style CSV line to `acct.csv` beside the log,
    /// rotated with it as `acct-<sequence>.csv` (extension).
    pub csv: bool,
    /// The CSV columns: PowerMTA names (`type`, `timeLogged`, `orig`, `rcpt`, `dsnStatus`,
    /// ...) or record paths (`id`, `response.code`, `headers.Feedback-ID`); empty = the
    /// default set (extension).
    pub csv_fields: Vec<String>,
}

impl Default for AccountingConfig {
    fn default() -> Self {
        AccountingConfig {
            path: String::new(),
            rotate_size: ByteSize(1 << 30),
            rotate_age: Some(secs(86_400)),
            compress: false,
            retain_age: None,
            retain_size: None,
            webhook_hold: ByteSize(10 << 30),
            csv: false,
            csv_fields: Vec::new(),
        }
    }
}

impl AccountingConfig {
    /// When segments are closed and compressed.
    pub fn rotation(&self) -> accounting::Rotation {
        accounting::Rotation {
            size: self.rotate_size.0.max(1),
            age: self.rotate_age.map(|d| d.0).filter(|d| !d.is_zero()),
            compress: self.compress,
        }
    }

    /// The CSV copy's layout, when `csv` is on.
    pub fn csv_format(&self) -> Result<Option<accounting::CsvFormat>, ConfigError> {
        if !self.csv {
            return Ok(None);
        }
        accounting::CsvFormat::new(&self.csv_fields)
            .map(Some)
            .map_err(|e| invalid("accounting.csv_fields", e))
    }

    /// When closed segments are deleted.
    pub fn retention(&self) -> accounting::Retention {
        accounting::Retention {
            max_age: self.retain_age.map(|d| d.0),
            max_size: self.retain_size.map(|s| s.0),
            hold: self.webhook_hold.0,
        }
    }
}

/// `[[shaping]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapingConfig {
    /// Domain, glob, `mx:` suffix or `*`.
    #[serde(rename = "match")]
    pub matches: String,
    /// Concurrent sessions.
    pub max_connections: Option<usize>,
    /// `N/s`, `N/m`, `N/h`.
    pub max_message_rate: Option<String>,
    /// New connections per time unit.
    pub max_connection_rate: Option<String>,
    /// Messages per session.
    pub max_deliveries_per_connection: Option<u32>,
    /// Concurrent sessions while in backoff.
    pub backoff_max_connections: Option<usize>,
    /// Message rate while in backoff.
    pub backoff_max_message_rate: Option<String>,
    /// Connection rate while in backoff.
    pub backoff_max_connection_rate: Option<String>,
    /// STARTTLS: `opportunistic` (default), `required` (verified against web PKI) or `disabled`.
    pub tls: Option<String>,
    /// `local` (default): the limits are this instance's; `cluster`: they are totals for
    /// every instance sharing `[cluster]`'s Redis.
    pub scope: Option<String>,
}

/// `[[automation]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutomationConfig {
    /// Regex over `"<code> <enhanced> <text>"`.
    pub match_response: String,
    /// `suspend`, `backoff` or `bounce`.
    pub action: String,
    /// How long the action lasts.
    pub duration: Option<HumanDuration>,
}

/// `[[dkim]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    /// Signing domain.
    pub domain: String,
    /// Selector.
    pub selector: String,
    /// PEM private key (RSA or Ed25519).
    pub key_file: PathBuf,
}

/// `[bounce_processing]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BounceProcessingConfig {
    /// Domains whose mail is parsed as DSN/ARF, never relayed.
    pub domains: Vec<String>,
    /// Rewrite the envelope sender as VERP.
    pub verp: bool,
    /// Secrets (at least 16 bytes each) that tag VERP addresses and unsubscribe links: the
    /// first signs, all verify (rotation). Unset: a key is generated once and kept in the
    /// spool (extension).
    pub keys: Vec<String>,
    /// How long the recipient, tenant and campaign of each message are kept for matching
    /// late reports (extension; default 7 days).
    pub sent_retention: HumanDuration,
    /// Largest inbound report accepted (extension; default 10 MiB).
    pub max_report_size: u64,
    /// Inbound reports accepted per client address and minute (extension; default 600).
    pub max_reports_per_minute: u32,
    /// A bounce classification rule file (TOML, see `accounting::classify`) replacing the
    /// built-in rules; reloaded on SIGHUP (extension).
    pub classification_rules: Option<std::path::PathBuf>,
}

impl Default for BounceProcessingConfig {
    fn default() -> Self {
        BounceProcessingConfig {
            domains: Vec::new(),
            verp: false,
            keys: Vec::new(),
            sent_retention: HumanDuration(std::time::Duration::from_secs(7 * 86_400)),
            max_report_size: 10 << 20,
            max_reports_per_minute: 600,
            classification_rules: None,
        }
    }
}

fn invalid(key: impl Into<String>, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.to_string(),
    }
}

impl Config {
    /// `[[tenant]] weight`s by name.
    pub fn tenant_weights(&self) -> std::collections::HashMap<String, u32> {
        self.tenant
            .iter()
            .map(|t| (t.name.clone(), t.weight))
            .collect()
    }

    /// Parses TOML text and validates it.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.read_secret_files()?;
        config.validate()?;
        Ok(config)
    }

    /// Adds the API tokens and AUTH users of `http.api_tokens_file` and
    /// `smtp_listener.auth_users_file` to the inline ones. Blank lines and lines starting
    /// with `#` are skipped.
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        fn lines(key: &str, path: &std::path::Path) -> Result<Vec<String>, ConfigError> {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
            Ok(text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect())
        }
        if let Some(path) = &self.http.api_tokens_file {
            let tokens = lines("http.api_tokens_file", path)?;
            self.http.api_tokens.extend(tokens);
        }
        if let Some(path) = &self.smtp_listener.auth_users_file {
            let key = "smtp_listener.auth_users_file";
            for (n, line) in lines(key, path)?.into_iter().enumerate() {
                // Only hashes: a file of clear passwords would be the weaker choice here.
                let (user, hash) = line
                    .split_once(':')
                    .filter(|(u, h)| !u.is_empty() && h.starts_with('$'))
                    .ok_or_else(|| {
                        invalid(key, format!("entry {} is not user:password_hash", n + 1))
                    })?;
                self.smtp_listener.auth_users.push(AuthUser {
                    user: user.to_owned(),
                    password: None,
                    password_hash: Some(hash.to_owned()),
                });
            }
        }
        Ok(())
    }

    /// Reads and validates a file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.http.listen.ip().is_loopback() && self.http.api_tokens.is_empty() {
            return Err(invalid(
                "http.api_tokens",
                "a non-loopback http.listen needs at least one API token",
            ));
        }
        for (i, ns) in self.dns.nameservers.iter().enumerate() {
            ns.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    format!("dns.nameservers[{i}]"),
                    format!("{ns:?} is not ip:port"),
                )
            })?;
        }
        if self.delivery.max_connections == 0 {
            return Err(invalid("delivery.max_connections", "must be at least 1"));
        }
        if self.delivery.max_workers == 0 {
            return Err(invalid("delivery.max_workers", "must be at least 1"));
        }
        if self.delivery.mx_address_limit == 0 {
            return Err(invalid("delivery.mx_address_limit", "must be at least 1"));
        }
        if self.delivery.session_setup_timeout.0.is_zero() {
            return Err(invalid(
                "delivery.session_setup_timeout",
                "must be positive",
            ));
        }
        if self.dns.max_in_flight == 0 {
            return Err(invalid("dns.max_in_flight", "must be at least 1"));
        }
        if self.retry.intervals.iter().any(|d| d.0.is_zero()) {
            return Err(invalid("retry.intervals", "intervals must be positive"));
        }
        for (i, r) in self.route.iter().enumerate() {
            if r.domain.trim().is_empty() {
                return Err(invalid(format!("route[{i}].domain"), "empty domain"));
            }
            if r.hosts.is_empty() {
                return Err(invalid(format!("route[{i}].hosts"), "no hosts"));
            }
            for (j, h) in r.hosts.iter().enumerate() {
                h.parse::<SocketAddr>().map_err(|_| {
                    invalid(
                        format!("route[{i}].hosts[{j}]"),
                        format!("{h:?} is not ip:port"),
                    )
                })?;
            }
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        self.shaping_rules()?;
        for (i, a) in self.automation.iter().enumerate() {
            regex::Regex::new(&a.match_response)
                .map_err(|e| invalid(format!("automation[{i}].match_response"), e))?;
            if !matches!(a.action.as_str(), "suspend" | "backoff" | "bounce") {
                return Err(invalid(
                    format!("automation[{i}].action"),
                    format!("{:?} is not suspend, backoff or bounce", a.action),
                ));
            }
        }
        self.dkim_signers()?;
        self.validate_egress()?;
        self.validate_feedback()?;
        let mut tenants = std::collections::HashSet::new();
        for (i, t) in self.tenant.iter().enumerate() {
            if t.name.is_empty() || !tenants.insert(t.name.as_str()) {
                return Err(invalid(
                    format!("tenant[{i}].name"),
                    format!("{:?} is empty or named twice", t.name),
                ));
            }
            if t.weight == 0 || t.weight > 1000 {
                return Err(invalid(
                    format!("tenant[{i}].weight"),
                    "must be between 1 and 1000",
                ));
            }
        }
        self.keyed_rates()?;
        for net in &self.smtp_listener.relay_networks {
            parse_cidr(net).ok_or_else(|| {
                invalid(
                    "smtp_listener.relay_networks",
                    format!("{net:?} is not a CIDR network"),
                )
            })?;
        }
        self.smtp_listener_tls()?;
        self.validate_smtp_listener()?;
        if let Some(to) = &self.drain.on_shutdown_to {
            peer_url(to).map_err(|e| invalid("drain.on_shutdown_to", e))?;
        }
        self.drain.peer_token()?;
        self.accounting.csv_format()?;
        let mut labels = std::collections::HashSet::new();
        for (i, w) in self.webhook.iter().enumerate() {
            w.validate()
                .map_err(|e| invalid(format!("webhook[{i}]"), e))?;
            // The label keys the webhook's cursor in the spool: two sharing one would
            // overwrite each other's place.
            if !labels.insert(w.label()) {
                return Err(invalid(
                    format!("webhook[{i}].name"),
                    format!(
                        "{:?} is used by another webhook; give each a distinct name",
                        w.label()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `[stamping]` and `[bounce_processing]`.
    fn validate_feedback(&self) -> Result<(), ConfigError> {
        let s = &self.stamping;
        let bounce = &self.bounce_processing;
        for (i, r) in s.rule.iter().enumerate() {
            if r.tenant.is_none() && r.campaign.is_none() {
                return Err(invalid(
                    format!("stamping.rule[{i}]"),
                    "a rule needs a tenant, a campaign or both",
                ));
            }
        }
        let tables = std::iter::once((
            "stamping".to_owned(),
            [
                ("x_complaints_to", &s.x_complaints_to),
                ("x_csa_complaints", &s.x_csa_complaints),
                ("feedback_id", &s.feedback_id),
                ("sender_id", &s.sender_id),
                ("list_unsubscribe_url", &s.list_unsubscribe_url),
            ],
            s.list_unsubscribe_mailto,
        ))
        .chain(s.rule.iter().enumerate().map(|(i, r)| {
            (
                format!("stamping.rule[{i}]"),
                [
                    ("x_complaints_to", &r.x_complaints_to),
                    ("x_csa_complaints", &r.x_csa_complaints),
                    ("feedback_id", &r.feedback_id),
                    ("sender_id", &r.sender_id),
                    ("list_unsubscribe_url", &r.list_unsubscribe_url),
                ],
                r.list_unsubscribe_mailto,
            )
        }));
        for (table, values, mailto) in tables {
            for (name, value) in values {
                let Some(v) = value else { continue };
                if v.chars().any(char::is_control) || v.len() > 900 {
                    return Err(invalid(
                        format!("{table}.{name}"),
                        "a header value may not hold control characters or exceed 900 bytes",
                    ));
                }
                if name == "list_unsubscribe_url"
                    && !(v.starts_with("https://") || v.starts_with("http://"))
                {
                    return Err(invalid(
                        format!("{table}.{name}"),
                        "must be an https:// URL (receivers require https for one-click)",
                    ));
                }
            }
            if mailto == Some(true) && bounce.domains.is_empty() {
                return Err(invalid(
                    format!("{table}.list_unsubscribe_mailto"),
                    "needs a bounce_processing.domains entry to put the address under",
                ));
            }
        }
        if bounce.verp && bounce.domains.is_empty() {
            return Err(invalid(
                "bounce_processing.verp",
                "needs a bounce_processing.domains entry to put the addresses under",
            ));
        }
        for (i, d) in bounce.domains.iter().enumerate() {
            if d.is_empty() || d.contains(['@', ' ', '<', '>']) {
                return Err(invalid(
                    format!("bounce_processing.domains[{i}]"),
                    format!("{d:?} is not a domain"),
                ));
            }
        }
        for (i, k) in bounce.keys.iter().enumerate() {
            if k.len() < feedback::keys::MIN_KEY_BYTES {
                return Err(invalid(
                    format!("bounce_processing.keys[{i}]"),
                    "a key needs at least 16 bytes",
                ));
            }
        }
        Ok(())
    }

    fn validate_egress(&self) -> Result<(), ConfigError> {
        let mut sources = std::collections::HashSet::new();
        for (i, s) in self.egress_source.iter().enumerate() {
            if s.name.is_empty() || s.name.contains(['|', ' ']) {
                return Err(invalid(
                    format!("egress_source[{i}].name"),
                    "names are non-empty, without spaces or '|'",
                ));
            }
            if !sources.insert(s.name.as_str()) {
                return Err(invalid(
                    format!("egress_source[{i}].name"),
                    format!("{:?} is defined twice", s.name),
                ));
            }
        }
        let mut pools = std::collections::HashSet::new();
        for (i, p) in self.egress_pool.iter().enumerate() {
            if !pools.insert(p.name.as_str()) {
                return Err(invalid(
                    format!("egress_pool[{i}].name"),
                    format!("{:?} is defined twice", p.name),
                ));
            }
            if p.sources.is_empty() {
                return Err(invalid(
                    format!("egress_pool[{i}].sources"),
                    "a pool needs at least one source",
                ));
            }
            for (j, m) in p.sources.iter().enumerate() {
                if !sources.contains(m.name.as_str()) {
                    return Err(invalid(
                        format!("egress_pool[{i}].sources[{j}].name"),
                        format!("no egress_source named {:?}", m.name),
                    ));
                }
                if m.weight == 0 {
                    return Err(invalid(
                        format!("egress_pool[{i}].sources[{j}].weight"),
                        "must be at least 1",
                    ));
                }
            }
        }
        for (i, r) in self.egress_rule.iter().enumerate() {
            if !pools.contains(r.pool.as_str()) {
                return Err(invalid(
                    format!("egress_rule[{i}].pool"),
                    format!("no egress_pool named {:?}", r.pool),
                ));
            }
        }
        Ok(())
    }

    /// The `[[shaping]]` table as rate-limiter rules (the `*` rule, if any, is the default).
    pub fn shaping_rules(&self) -> Result<Vec<Rule>, ConfigError> {
        self.shaping
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let key = |k: &str| format!("shaping[{i}].{k}");
                let matcher: Matcher = s.matches.parse().map_err(|e| invalid(key("match"), e))?;
                let rate = |v: &Option<String>, k: &str| -> Result<Option<Rate>, ConfigError> {
                    v.as_deref()
                        .map(|r| r.parse::<Rate>().map_err(|e| invalid(key(k), e)))
                        .transpose()
                };
                if let Some(tls) = &s.tls {
                    parse_tls_mode(tls).ok_or_else(|| {
                        invalid(
                            key("tls"),
                            format!("{tls:?} is not opportunistic, required or disabled"),
                        )
                    })?;
                }
                let scope = match s.scope.as_deref() {
                    None | Some("local") => Scope::Local,
                    Some("cluster") if self.cluster.is_some() => Scope::Cluster,
                    Some("cluster") => {
                        return Err(invalid(
                            key("scope"),
                            "\"cluster\" needs a [cluster] section with redis_url",
                        ))
                    }
                    Some(other) => {
                        return Err(invalid(
                            key("scope"),
                            format!("{other:?} is not local or cluster"),
                        ))
                    }
                };
                let defaults = Limits::default();
                let limits = Limits {
                    scope,
                    max_connections: s.max_connections.unwrap_or(defaults.max_connections),
                    max_message_rate: rate(&s.max_message_rate, "max_message_rate")?,
                    max_connection_rate: rate(&s.max_connection_rate, "max_connection_rate")?,
                    max_deliveries_per_connection: s
                        .max_deliveries_per_connection
                        .unwrap_or(defaults.max_deliveries_per_connection),
                    backoff_max_connections: s.backoff_max_connections,
                    backoff_max_message_rate: rate(
                        &s.backoff_max_message_rate,
                        "backoff_max_message_rate",
                    )?,
                    backoff_max_connection_rate: rate(
                        &s.backoff_max_connection_rate,
                        "backoff_max_connection_rate",
                    )?,
                };
                if limits.max_connections == 0 {
                    return Err(invalid(key("max_connections"), "must be at least 1"));
                }
                if limits.max_deliveries_per_connection == 0 {
                    return Err(invalid(
                        key("max_deliveries_per_connection"),
                        "must be at least 1",
                    ));
                }
                Ok(Rule { matcher, limits })
            })
            .collect()
    }

    /// `[[rate_limit]]` as keyed rates (`tenant:<name>`, `campaign:<name>`).
    pub fn keyed_rates(&self) -> Result<std::collections::HashMap<String, Rate>, ConfigError> {
        self.rate_limit
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let key = match (&r.tenant, &r.campaign) {
                    (Some(t), None) => format!("tenant:{t}"),
                    (None, Some(c)) => format!("campaign:{c}"),
                    _ => {
                        return Err(invalid(
                            format!("rate_limit[{i}]"),
                            "give exactly one of tenant and campaign",
                        ))
                    }
                };
                let rate = r
                    .max_message_rate
                    .parse::<Rate>()
                    .map_err(|e| invalid(format!("rate_limit[{i}].max_message_rate"), e))?;
                Ok((key, rate))
            })
            .collect()
    }

    /// The STARTTLS mode of a destination: the most specific `[[shaping]]` rule with a `tls`
    /// key decides; opportunistic when none has one.
    pub fn tls_mode(&self, domain: &str, mx_hosts: &[String]) -> connection_pool::TlsMode {
        tls_mode_of(&self.shaping, domain, mx_hosts)
    }

    fn validate_smtp_listener(&self) -> Result<(), ConfigError> {
        let l = &self.smtp_listener;
        for (i, u) in l.auth_users.iter().enumerate() {
            let key = format!("smtp_listener.auth_users[{i}]");
            if u.user.is_empty() {
                return Err(invalid(key, "user must not be empty"));
            }
            match (&u.password, &u.password_hash) {
                (Some(p), None) if p.is_empty() => {
                    return Err(invalid(key, "password must not be empty"))
                }
                (Some(_), None) => {}
                (None, Some(hash)) => crate::listener::check_password_hash(hash)
                    .map_err(|e| invalid(format!("{key}.password_hash"), e))?,
                _ => {
                    return Err(invalid(
                        key,
                        "give exactly one of password and password_hash",
                    ))
                }
            }
        }
        for (key, value) in [
            ("max_connections", l.max_connections),
            ("max_connections_per_ip", l.max_connections_per_ip),
            ("max_recipients", l.max_recipients),
        ] {
            if value == 0 {
                return Err(invalid(
                    format!("smtp_listener.{key}"),
                    "must be at least 1",
                ));
            }
        }
        for (key, value) in [
            ("idle_timeout", l.idle_timeout),
            ("tls_handshake_timeout", l.tls_handshake_timeout),
            ("write_timeout", l.write_timeout),
            ("auth_failure_window", l.auth_failure_window),
        ] {
            if value.0.is_zero() {
                return Err(invalid(format!("smtp_listener.{key}"), "must be positive"));
            }
        }
        Ok(())
    }

    /// The SMTP listener's STARTTLS certificate, loaded from `tls_cert_file` and
    /// `tls_key_file`; `None` when neither is set.
    pub fn smtp_listener_tls(&self) -> Result<Option<smtp_server::TlsAcceptor>, ConfigError> {
        let l = &self.smtp_listener;
        match (&l.tls_cert_file, &l.tls_key_file) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => smtp_server::tls_acceptor_from_pem_files(cert, key)
                .map(Some)
                .map_err(|e| invalid("smtp_listener.tls_cert_file", e)),
            (Some(_), None) => Err(invalid(
                "smtp_listener.tls_key_file",
                "tls_cert_file is set but tls_key_file is not",
            )),
            (None, Some(_)) => Err(invalid(
                "smtp_listener.tls_cert_file",
                "tls_key_file is set but tls_cert_file is not",
            )),
        }
    }

    /// Loads every `[[dkim]]` key: a missing or unusable key file is a configuration error,
    /// found by `check-config` and at start-up rather than at the first message.
    pub fn dkim_signers(&self) -> Result<dkim::Signers, ConfigError> {
        let keys: Vec<dkim::KeyConfig> = self
            .dkim
            .iter()
            .map(|d| dkim::KeyConfig {
                domain: d.domain.clone(),
                selector: d.selector.clone(),
                key_file: d.key_file.clone(),
            })
            .collect();
        dkim::Signers::load(&keys).map_err(|e| {
            let key = e.config_key().unwrap_or_else(|| "dkim".to_owned());
            invalid(key, e)
        })
    }

    /// Where accounting records go.
    pub fn accounting_path(&self) -> PathBuf {
        if self.accounting.path.is_empty() {
            self.spool.path.join("accounting.jsonl")
        } else {
            PathBuf::from(&self.accounting.path)
        }
    }
}

/// The STARTTLS mode the most specific `[[shaping]]` rule with a `tls` key gives a
/// destination; opportunistic when none has one.
pub fn tls_mode_of(
    shaping: &[ShapingConfig],
    domain: &str,
    mx_hosts: &[String],
) -> connection_pool::TlsMode {
    shaping
        .iter()
        .filter_map(|s| {
            let mode = parse_tls_mode(s.tls.as_deref()?)?;
            let matcher: Matcher = s.matches.parse().ok()?;
            Some((matcher.specificity(domain, mx_hosts)?, mode))
        })
        .max_by_key(|(score, _)| *score)
        .map_or(connection_pool::TlsMode::Opportunistic, |(_, mode)| mode)
}

fn parse_tls_mode(s: &str) -> Option<connection_pool::TlsMode> {
    match s {
        "opportunistic" => Some(connection_pool::TlsMode::Opportunistic),
        "required" => Some(connection_pool::TlsMode::Required),
        "disabled" => Some(connection_pool::TlsMode::Disabled),
        _ => None,
    }
}

/// Parses `ip/len`.
pub fn parse_cidr(s: &str) -> Option<(std::net::IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: std::net::IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_embedded_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:8025");
        assert_eq!(c.retry.intervals.len(), 6);
        assert_eq!(c.retry.max_age.0, Duration::from_secs(4 * 86_400));
        assert_eq!(
            c.accounting_path(),
            PathBuf::from("./drover-data/accounting.jsonl")
        );
    }

    #[test]
    fn drain_keys_name_a_bad_peer_url_or_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("peer.token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let c = Config::parse(&format!(
            "[drain]\non_shutdown_to = \"http://10.0.0.2:8025\"\npeer_token_file = {token:?}\n"
        ))
        .unwrap();
        assert_eq!(c.drain.peer_token().unwrap().as_deref(), Some("s3cret"));
        let key = |toml: &str| match Config::parse(toml) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{toml}: {other:?}"),
        };
        assert_eq!(
            key("[drain]\non_shutdown_to = \"ftp://peer\"\n"),
            "drain.on_shutdown_to"
        );
        assert_eq!(
            key("[drain]\non_shutdown_to = \"http://peer:8025/?x=1\"\n"),
            "drain.on_shutdown_to"
        );
        assert_eq!(
            key("[drain]\npeer_token_file = \"/nonexistent/token\"\n"),
            "drain.peer_token_file"
        );
        std::fs::write(&token, "\n").unwrap();
        assert_eq!(
            key(&format!("[drain]\npeer_token_file = {token:?}\n")),
            "drain.peer_token_file"
        );
        assert!(Config::parse("[drain]\nto = \"x\"\n").is_err());
    }

    #[test]
    fn accounting_rotation_and_retention_keys() {
        assert_eq!(ByteSize::parse("64MiB"), Some(ByteSize(64 << 20)));
        assert_eq!(ByteSize::parse("1GiB"), Some(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("500MB"), Some(ByteSize(500_000_000)));
        assert_eq!(ByteSize::parse("4096"), Some(ByteSize(4096)));
        assert_eq!(ByteSize::parse("12 parsecs"), None);
        assert_eq!(ByteSize::parse(""), None);
        let c = Config::parse(
            "[accounting]\nrotate_size = \"64MiB\"\nrotate_age = \"\"\ncompress = true\nretain_age = \"30d\"\nretain_size = 1000000\n",
        )
        .unwrap();
        let rotation = c.accounting.rotation();
        assert_eq!(rotation.size, 64 << 20);
        assert_eq!(rotation.age, None);
        assert!(rotation.compress);
        let retention = c.accounting.retention();
        assert_eq!(retention.max_age, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(retention.max_size, Some(1_000_000));
        assert_eq!(retention.hold, 10 << 30);
        let defaults = Config::parse("").unwrap().accounting.rotation();
        assert_eq!(defaults.size, 1 << 30);
        assert_eq!(defaults.age, Some(Duration::from_secs(86_400)));
        assert!(Config::parse("[accounting]\nrotate_size = \"big\"\n").is_err());
        assert!(c.accounting.csv_format().unwrap().is_none());
        let csv = Config::parse(
            "[accounting]\ncsv = true\ncsv_fields = [\"type\", \"rcpt\", \"response.code\"]\n",
        )
        .unwrap();
        assert_eq!(
            csv.accounting.csv_format().unwrap().unwrap().header(),
            "type,rcpt,response.code"
        );
        assert!(Config::parse("[accounting]\ncsv = true\ncsv_fields = [\"nonsense\"]\n").is_err());
    }

    #[test]
    fn smtp_listener_limits_have_defaults_and_parse() {
        let d = Config::parse("").unwrap().smtp_listener;
        assert_eq!(d.max_auth_failures, 5);
        assert_eq!(d.auth_failure_window.0, Duration::from_secs(300));
        assert_eq!((d.max_connections, d.max_connections_per_ip), (1000, 50));
        assert_eq!(d.idle_timeout.0, Duration::from_secs(300));
        assert_eq!(d.tls_handshake_timeout.0, Duration::from_secs(30));
        assert_eq!(d.write_timeout.0, Duration::from_secs(60));
        assert_eq!(d.max_recipients, 1000);
        assert_eq!(d.bare_newlines, BareNewlines::Reject);
        let c = Config::parse(concat!(
            "[smtp_listener]\nmax_auth_failures = 0\nauth_failure_window = \"1h\"\n",
            "max_connections = 10\nmax_connections_per_ip = 2\nidle_timeout = \"1m\"\n",
            "tls_handshake_timeout = \"5s\"\nwrite_timeout = \"10s\"\nmax_recipients = 3\n",
            "bare_newlines = \"normalize\"\n",
            "auth_users = [{ user = \"a\", password = \"p\" }, { user = \"b\", password_hash = ",
            "\"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g\" }]\n",
        ))
        .unwrap()
        .smtp_listener;
        assert_eq!(c.max_auth_failures, 0);
        assert_eq!(c.auth_failure_window.0, Duration::from_secs(3600));
        assert_eq!((c.max_connections, c.max_connections_per_ip), (10, 2));
        assert_eq!(c.idle_timeout.0, Duration::from_secs(60));
        assert_eq!(c.tls_handshake_timeout.0, Duration::from_secs(5));
        assert_eq!(c.write_timeout.0, Duration::from_secs(10));
        assert_eq!(c.max_recipients, 3);
        assert_eq!(c.bare_newlines, BareNewlines::Normalize);
        assert_eq!(c.auth_users[0].password.as_deref(), Some("p"));
        assert!(c.auth_users[1].password_hash.is_some());
        // Neither form of the secret shows in debug output.
        let debug = format!("{:?}", c.auth_users);
        assert!(
            !debug.contains("argon2") && !debug.contains("\"p\""),
            "{debug}"
        );
    }

    #[test]
    fn the_contract_example_parses() {
        let text = include_str!("../../../deploy/drover.example.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.route[0].domain, "example.test");
        assert_eq!(c.smtp_listener.max_connections_per_ip, 50);
        assert_eq!(c.smtp_listener.bare_newlines, BareNewlines::Reject);
        assert_eq!(c.retry.intervals[4].0, Duration::from_secs(4800));
        assert_eq!(c.shaping_rules().unwrap().len(), c.shaping.len());
        assert_eq!(
            c.tls_mode("example.test", &[]),
            connection_pool::TlsMode::Disabled
        );
        assert_eq!(
            c.tls_mode("other.test", &[]),
            connection_pool::TlsMode::Opportunistic
        );
        let google = ["aspmx.l.google.com".to_owned()];
        assert_eq!(
            c.tls_mode("customer.test", &google),
            connection_pool::TlsMode::Required
        );
    }

    #[test]
    fn the_readme_example_parses() {
        let readme = include_str!("../../../README.md");
        let block = readme
            .split("### A production-shaped example")
            .nth(1)
            .and_then(|rest| rest.split("```toml").nth(1))
            .and_then(|rest| rest.split("```").next())
            .expect("the README keeps its example");
        let c = Config::parse(block).unwrap();
        assert_eq!(c.automation.len(), 4);
        assert_eq!(c.egress_source.len(), 2);
    }

    #[test]
    fn the_cluster_section_and_scope_parse_and_bad_ones_are_named() {
        let c = Config::parse(
            "[cluster]\nredis_url = \"redis://127.0.0.1:6379/0\"\nlocal_share = 0.5\n\
             [[shaping]]\nmatch = \"c.test\"\nmax_connections = 5\nscope = \"cluster\"\n\
             [[shaping]]\nmatch = \"l.test\"\n",
        )
        .unwrap();
        let rules = c.shaping_rules().unwrap();
        assert_eq!(rules[0].limits.scope, Scope::Cluster);
        assert_eq!(rules[1].limits.scope, Scope::Local);
        let cluster = c.cluster.unwrap();
        let settings = cluster.settings("host-1");
        assert_eq!(settings.instance_id, "host-1");
        assert_eq!(settings.lease_ttl, Duration::from_secs(30));
        assert_eq!(settings.key_prefix, "drover:");
        assert_eq!(settings.timeout, Duration::from_millis(200));
        assert_eq!(cluster.local_share, 0.5);
        let url = "[cluster]\nredis_url = \"redis://127.0.0.1/0\"\n";
        for (text, key) in [
            (
                "[[shaping]]\nmatch = \"*\"\nscope = \"cluster\"\n".to_owned(),
                "shaping[0].scope",
            ),
            (
                format!("{url}[[shaping]]\nmatch = \"*\"\nscope = \"galaxy\"\n"),
                "shaping[0].scope",
            ),
            (
                "[cluster]\nredis_url = \"http://x\"\n".to_owned(),
                "cluster.redis_url",
            ),
            (format!("{url}local_share = 0.0\n"), "cluster.local_share"),
            (format!("{url}local_share = 1.5\n"), "cluster.local_share"),
            (format!("{url}lease_ttl = \"100ms\"\n"), "cluster.lease_ttl"),
            (format!("{url}timeout = \"20s\"\n"), "cluster.timeout"),
            (format!("{url}redis_host = \"x\"\n"), "redis_host"),
            ("[cluster]\nlease_ttl = \"5s\"\n".to_owned(), "redis_url"),
        ] {
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::parse("[spool]\npth = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pth"), "{err}");
        let err = Config::parse("[nope]\n").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (
                "[[shaping]]\nmatch = \"*\"\nmax_message_rate = \"fast\"\n",
                "shaping[0].max_message_rate",
            ),
            ("[retry]\nmax_age = \"soon\"\n", "max_age"),
            ("[http]\nlisten = \"0.0.0.0:8025\"\n", "http.api_tokens"),
            (
                "[[automation]]\nmatch_response = \"(\"\naction = \"suspend\"\n",
                "automation[0].match_response",
            ),
            (
                "[[automation]]\nmatch_response = \"x\"\naction = \"explode\"\n",
                "automation[0].action",
            ),
            (
                "[dns]\nnameservers = [\"localhost\"]\n",
                "dns.nameservers[0]",
            ),
            (
                "[[route]]\ndomain = \"a.test\"\nhosts = [\"nowhere\"]\n",
                "route[0].hosts[0]",
            ),
            (
                "[smtp_listener]\ntls_cert_file = \"/nonexistent/cert.pem\"\n",
                "smtp_listener.tls_key_file",
            ),
            (
                "[smtp_listener]\ntls_cert_file = \"/nonexistent/c.pem\"\ntls_key_file = \"/nonexistent/k.pem\"\n",
                "smtp_listener.tls_cert_file",
            ),
            (
                "[smtp_listener]\nauth_users = [{ user = \"u\", password = \"\" }]\n",
                "smtp_listener.auth_users[0]",
            ),
            (
                "[smtp_listener]\nauth_users = [{ user = \"u\", pass = \"p\" }]\n",
                "pass",
            ),
            (
                "[smtp_listener]\nauth_users = [{ user = \"u\" }]\n",
                "smtp_listener.auth_users[0]",
            ),
            (
                "[smtp_listener]\nauth_users = [{ user = \"u\", password = \"p\", password_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g\" }]\n",
                "smtp_listener.auth_users[0]",
            ),
            (
                "[smtp_listener]\nauth_users = [{ user = \"u\", password_hash = \"s3cret\" }]\n",
                "smtp_listener.auth_users[0].password_hash",
            ),
            (
                "[smtp_listener]\nauth_users = [{ user = \"u\", password_hash = \"$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW\" }]\n",
                "smtp_listener.auth_users[0].password_hash",
            ),
            ("[smtp_listener]\nmax_connections = 0\n", "smtp_listener.max_connections"),
            (
                "[smtp_listener]\nmax_connections_per_ip = 0\n",
                "smtp_listener.max_connections_per_ip",
            ),
            ("[smtp_listener]\nmax_recipients = 0\n", "smtp_listener.max_recipients"),
            ("[smtp_listener]\nwrite_timeout = \"0s\"\n", "smtp_listener.write_timeout"),
            ("[smtp_listener]\nbare_newlines = \"allow\"\n", "bare_newlines"),
            (
                "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"/nonexistent/k.pem\"\n",
                "dkim[0].key_file",
            ),
            (
                // A file that exists but holds no private key.
                concat!(
                    "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"",
                    env!("CARGO_MANIFEST_DIR"),
                    "/Cargo.toml\"\n"
                ),
                "dkim[0].key_file",
            ),
            (
                "[[dkim]]\ndomain = \"example.com\"\nselector = \"\"\nkey_file = \"/k.pem\"\n",
                "dkim[0].selector",
            ),
        ];
        for (text, key) in cases {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn secrets_can_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("api_tokens");
        std::fs::write(&tokens, "# platform\nfrom-file-1\n\n  from-file-2  \n").unwrap();
        let users = dir.path().join("auth_users");
        std::fs::write(
            &users,
            "# user:hash\nnewsletter:$argon2id$v=19$m=19456,t=2,p=1$Oguc2Uwvu/v4yeEApm8h2w$6YyTmoN1Qt69UG+XdFm63sDkMwux4RTqs6iSoJKnxvY\n",
        )
        .unwrap();
        let text = format!(
            "[http]\nlisten = \"0.0.0.0:8025\"\napi_tokens = [\"inline\"]\napi_tokens_file = {:?}\n\
             [smtp_listener]\nauth_users_file = {:?}\n",
            tokens.display().to_string(),
            users.display().to_string()
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.http.api_tokens, ["inline", "from-file-1", "from-file-2"]);
        let user = &c.smtp_listener.auth_users[0];
        assert_eq!(user.user, "newsletter");
        assert!(user.password.is_none());
        assert!(user
            .password_hash
            .as_deref()
            .unwrap()
            .starts_with("$argon2id$"));
        // Tokens from the file alone satisfy the rule for a non-loopback listener.
        let only_file = format!(
            "[http]\nlisten = \"0.0.0.0:8025\"\napi_tokens_file = {:?}\n",
            tokens.display().to_string()
        );
        assert_eq!(Config::parse(&only_file).unwrap().http.api_tokens.len(), 2);
        // A missing file, or a line that is not user:hash, names the key.
        let missing = "[http]\napi_tokens_file = \"/nonexistent/tokens\"\n";
        let err = Config::parse(missing).unwrap_err().to_string();
        assert!(err.contains("http.api_tokens_file"), "{err}");
        std::fs::write(&users, "newsletter:clear-password\n").unwrap();
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("smtp_listener.auth_users_file"), "{err}");
    }

    #[test]
    fn shutdown_grace_defaults_to_none_and_parses() {
        assert!(Config::parse("").unwrap().http.shutdown_grace.0.is_zero());
        let c = Config::parse("[http]\nshutdown_grace = \"5s\"\n").unwrap();
        assert_eq!(c.http.shutdown_grace.0, Duration::from_secs(5));
    }
}
