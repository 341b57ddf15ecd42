//! Prepare stage: the feedback loop's marks on each accepted message, the same for both
//! doors — the VERP envelope sender and the complaint and unsubscribe headers — stamped
//! before DKIM signing so the signature covers them.

use crate::config::{Config, StampRuleConfig, StampingConfig};
use crate::message::{tracked_headers, NewMessage};
use feedback::stamp::{expand, stamp, Existing};
use feedback::token::Unsubscribe;
use feedback::verp::Kind;
use feedback::Keys;

/// The stamping fields after merging rules (see `Stamper::fields_for`).
#[derive(Debug, Clone, Default)]
struct Fields {
    x_complaints_to: Option<String>,
    x_csa_complaints: Option<String>,
    feedback_id: Option<String>,
    sender_id: Option<String>,
    list_unsubscribe_mailto: Option<bool>,
    list_unsubscribe_url: Option<String>,
    existing: Option<Existing>,
}

macro_rules! fields_of {
    ($c:expr) => {
        Fields {
            x_complaints_to: $c.x_complaints_to.clone(),
            x_csa_complaints: $c.x_csa_complaints.clone(),
            feedback_id: $c.feedback_id.clone(),
            sender_id: $c.sender_id.clone(),
            list_unsubscribe_mailto: $c.list_unsubscribe_mailto,
            list_unsubscribe_url: $c.list_unsubscribe_url.clone(),
            existing: $c.existing,
        }
    };
}

impl Fields {
    /// `self`, with what it leaves unset taken from `less` (a less specific rule).
    fn over(mut self, less: &Fields) -> Fields {
        self.x_complaints_to = self
            .x_complaints_to
            .or_else(|| less.x_complaints_to.clone());
        self.x_csa_complaints = self
            .x_csa_complaints
            .or_else(|| less.x_csa_complaints.clone());
        self.feedback_id = self.feedback_id.or_else(|| less.feedback_id.clone());
        self.sender_id = self.sender_id.or_else(|| less.sender_id.clone());
        self.list_unsubscribe_mailto = self
            .list_unsubscribe_mailto
            .or(less.list_unsubscribe_mailto);
        self.list_unsubscribe_url = self
            .list_unsubscribe_url
            .or_else(|| less.list_unsubscribe_url.clone());
        self.existing = self.existing.or(less.existing);
        self
    }

    fn is_empty(&self) -> bool {
        self.x_complaints_to.is_none()
            && self.x_csa_complaints.is_none()
            && self.feedback_id.is_none()
            && self.list_unsubscribe_mailto != Some(true)
            && self.list_unsubscribe_url.is_none()
    }
}

struct Rule {
    tenant: Option<String>,
    campaign: Option<String>,
    fields: Fields,
}

impl Rule {
    fn from_config(r: &StampRuleConfig) -> Rule {
        Rule {
            tenant: r.tenant.clone(),
            campaign: r.campaign.clone(),
            fields: fields_of!(r),
        }
    }

    /// How specific a match is (campaign and tenant > campaign > tenant), if it matches.
    fn specificity(&self, tenant: Option<&str>, campaign: Option<&str>) -> Option<u8> {
        let t = match &self.tenant {
            Some(want) => (tenant == Some(want.as_str())).then_some(1)?,
            None => 0,
        };
        let c = match &self.campaign {
            Some(want) => (campaign == Some(want.as_str())).then_some(2)?,
            None => 0,
        };
        Some(t + c)
    }
}

/// Stamps accepted messages (`[stamping]`, `[bounce_processing]`).
pub(crate) struct Stamper {
    defaults: Fields,
    rules: Vec<Rule>,
    /// The first bounce domain: VERP senders (when `verp`) and `mailto:` unsubscribe
    /// addresses live under it.
    bounce_domain: Option<String>,
    verp: bool,
}

impl std::fmt::Debug for Stamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stamper")
            .field("rules", &self.rules.len())
            .field("verp", &self.verp)
            .finish_non_exhaustive()
    }
}

impl Stamper {
    pub(crate) fn from_config(config: &Config) -> Stamper {
        let s: &StampingConfig = &config.stamping;
        Stamper {
            defaults: fields_of!(s),
            rules: s.rule.iter().map(Rule::from_config).collect(),
            bounce_domain: config
                .bounce_processing
                .domains
                .first()
                .map(|d| d.to_ascii_lowercase()),
            verp: config.bounce_processing.verp,
        }
    }

    /// Whether it would change nothing in any message.
    pub(crate) fn is_noop(&self) -> bool {
        !(self.verp && self.bounce_domain.is_some())
            && self.defaults.is_empty()
            && self.rules.iter().all(|r| r.fields.is_empty())
    }

    /// The fields for a message of `tenant` and `campaign`: the matching rules from the most
    /// specific down, then the defaults.
    fn fields_for(&self, tenant: Option<&str>, campaign: Option<&str>) -> Fields {
        let mut matching: Vec<(u8, &Rule)> = self
            .rules
            .iter()
            .filter_map(|r| r.specificity(tenant, campaign).map(|s| (s, r)))
            .collect();
        // Stable: among equally specific rules, the first written wins.
        matching.sort_by_key(|(specificity, _)| std::cmp::Reverse(*specificity));
        matching
            .into_iter()
            .fold(Fields::default(), |acc, (_, r)| acc.over(&r.fields))
            .over(&self.defaults)
    }

    /// Stamps one message: its envelope sender (VERP) and its headers; the tracked headers
    /// and size of its metadata follow.
    pub(crate) fn apply(&self, keys: &Keys, m: &mut NewMessage) {
        let meta = &mut m.meta;
        let id = *meta.id.as_bytes();
        if let (true, Some(domain)) = (self.verp, &self.bounce_domain) {
            // The null sender stays null: a bounce must never cause another.
            if !meta.sender.is_empty() {
                meta.sender =
                    feedback::verp::encode(keys, Kind::Bounce, id, &meta.recipient, domain);
            }
        }
        let f = self.fields_for(meta.tenant.as_deref(), meta.campaign.as_deref());
        let mut headers: Vec<(String, String)> = Vec::new();
        if let Some(v) = &f.x_complaints_to {
            headers.push(("X-Complaints-To".into(), v.clone()));
        }
        if let Some(v) = &f.x_csa_complaints {
            headers.push(("X-CSA-Complaints".into(), v.clone()));
        }
        if let Some(template) = &f.feedback_id {
            // Colons separate Feedback-ID's fields: a value may not add one.
            let clean = |v: Option<&str>| v.unwrap_or("").replace(':', "-");
            let id_text = meta.id.to_string();
            let vars = [
                ("campaign", clean(meta.campaign.as_deref())),
                ("tenant", clean(meta.tenant.as_deref())),
                ("sender_id", clean(f.sender_id.as_deref())),
                ("id", id_text),
            ];
            let vars: Vec<(&str, &str)> = vars.iter().map(|(n, v)| (*n, v.as_str())).collect();
            headers.push(("Feedback-ID".into(), expand(template, &vars)));
        }
        let mut unsubscribe = Vec::new();
        if let (Some(true), Some(domain)) = (f.list_unsubscribe_mailto, &self.bounce_domain) {
            let address =
                feedback::verp::encode(keys, Kind::Unsubscribe, id, &meta.recipient, domain);
            unsubscribe.push(format!("<mailto:{address}?subject=unsubscribe>"));
        }
        if let Some(base) = &f.list_unsubscribe_url {
            let token = feedback::token::encode(
                keys,
                &Unsubscribe {
                    id,
                    recipient: meta.recipient.clone(),
                    tenant: meta.tenant.clone(),
                    campaign: meta.campaign.clone(),
                },
            );
            unsubscribe.push(format!("<{}/{token}>", base.trim_end_matches('/')));
        }
        if !unsubscribe.is_empty() {
            headers.push(("List-Unsubscribe".into(), unsubscribe.join(", ")));
        }
        if f.list_unsubscribe_url.is_some() {
            headers.push((
                "List-Unsubscribe-Post".into(),
                "List-Unsubscribe=One-Click".into(),
            ));
        }
        if headers.is_empty() {
            return;
        }
        m.body = stamp(&m.body, &headers, f.existing.unwrap_or_default());
        m.meta.headers = tracked_headers(&m.body);
        m.meta.size = m.body.len() as u64;
    }
}
