//! Turning an inject request into one RFC 5322 message per recipient.
//!
//! Templates use `{{ var }}` (minijinja). The header section and the body of a raw message are
//! rendered separately: values substituted into headers have CR and LF replaced by spaces, so a
//! recipient's name can never inject a header, while the body gets values verbatim.

use queue::{MessageId, MessageMeta};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Headers copied from each message into its accounting records (contract §4).
pub const TRACKED_HEADERS: &[&str] = &[
    "X-Complaints-To",
    "X-CSA-Complaints",
    "Feedback-ID",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "X-Campaign",
];

/// One message ready to be stored.
pub struct NewMessage {
    /// Metadata (id, envelope, campaign...).
    pub meta: MessageMeta,
    /// The RFC 5322 message.
    pub body: Vec<u8>,
    /// The door it came in by: `prepare` writes its `Received:` header (none when unset).
    pub door: Option<std::sync::Arc<crate::prepare::Door>>,
    /// Whether `prepare` has run (a batch handed back and injected again is not prepared
    /// twice).
    pub prepared: bool,
}

/// What the messages of one injection (a request, an SMTP transaction) share.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Envelope sender ("" for the null sender).
    pub sender: String,
    /// Campaign, if any.
    pub campaign: Option<String>,
    /// Tenant, if any.
    pub tenant: Option<String>,
    /// When it was received (ms since the epoch).
    pub received_ms: u64,
    /// How urgent among its destination's waiting mail.
    pub priority: queue::Priority,
    /// The door the messages came in by (their `Received:` header).
    pub door: Option<std::sync::Arc<crate::prepare::Door>>,
    /// KumoMTA's supplemental trace header, when the messages get one.
    pub supplemental: Option<std::sync::Arc<Supplemental>>,
}

/// A supplemental trace header to write into each message (KumoMTA's `X-KumoRef`).
#[derive(Debug, Clone)]
pub struct Supplemental {
    /// The header's name (an `X-` field).
    pub header_name: String,
    /// What it carries besides the recipient and the message id: `tenant`, `campaign` or a
    /// key of the recipient's `metadata`.
    pub include_meta_names: Vec<String>,
}

impl Supplemental {
    /// The header field for one message.
    fn field(&self, origin: &Origin, recipient: &Recipient, email: &str, id: &str) -> String {
        let mut meta = Map::new();
        for name in &self.include_meta_names {
            let value = match name.as_str() {
                "tenant" => origin.tenant.clone().map(Value::String),
                "campaign" => origin.campaign.clone().map(Value::String),
                _ => recipient
                    .metadata
                    .as_ref()
                    .and_then(|m| m.get(name).cloned()),
            };
            if let Some(v) = value {
                meta.insert(name.clone(), v);
            }
        }
        feedback::trace_ref::header(&self.header_name, email, Some(id), &meta)
    }
}

impl NewMessage {
    /// A message for one recipient, due now, its tracked headers taken from `body`.
    pub fn new(
        id: MessageId,
        origin: &Origin,
        recipient: String,
        domain: String,
        body: Vec<u8>,
    ) -> NewMessage {
        let meta = MessageMeta {
            id,
            sender: origin.sender.clone(),
            recipient,
            domain,
            campaign: origin.campaign.clone(),
            tenant: origin.tenant.clone(),
            received_ms: origin.received_ms,
            due_ms: origin.received_ms,
            attempts: 0,
            headers: tracked_headers(&body),
            last_source: None,
            priority: origin.priority,
            size: body.len() as u64,
            metadata: None,
            arrived_ms: None,
        };
        NewMessage {
            meta,
            body,
            door: origin.door.clone(),
            prepared: false,
        }
    }
}

/// The messages made from an inject request, and the recipients refused with why.
pub struct Prepared {
    /// One message per accepted recipient.
    pub messages: Vec<NewMessage>,
    /// Recipients refused (as given).
    pub failed_recipients: Vec<String>,
    /// Why, one line per refused recipient.
    pub errors: Vec<String>,
}

/// Renders one message per recipient (CPU work: run it off the async threads). A recipient
/// with an invalid address, a failing template or a message over `max_size` is refused alone.
pub fn prepare(
    renderer: &Renderer,
    substitutions: &Map<String, Value>,
    recipients: &[Recipient],
    origin: &Origin,
    sender_domain: &str,
    max_size: u64,
) -> Prepared {
    let mut out = Prepared {
        messages: Vec::with_capacity(recipients.len()),
        failed_recipients: Vec::new(),
        errors: Vec::new(),
    };
    for recipient in recipients {
        let mut refuse = |why: String| {
            out.failed_recipients.push(recipient.email.clone());
            out.errors.push(format!("{}: {why}", recipient.email));
        };
        let email = match envelope_address(&recipient.email) {
            Ok(email) => email,
            Err(e) => {
                refuse(e);
                continue;
            }
        };
        let email = email.as_ref();
        let domain = email
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        let id = MessageId::generate();
        let id_text = id.to_string();
        let mut body = match renderer.render_for(substitutions, recipient, &id_text, sender_domain)
        {
            Ok(b) => b,
            Err(e) => {
                refuse(e);
                continue;
            }
        };
        if let Some(s) = &origin.supplemental {
            let field = s.field(origin, recipient, email, &id_text);
            body.splice(0..0, field.into_bytes());
        }
        if body.len() as u64 > max_size {
            refuse(format!(
                "message of {} bytes exceeds the limit of {max_size}",
                body.len()
            ));
            continue;
        }
        let metadata = recipient.metadata.clone().map(Value::Object);
        if let Some(m) = &metadata {
            let len = m.to_string().len();
            if len > MAX_METADATA_BYTES {
                refuse(format!(
                    "metadata of {len} bytes exceeds the limit of {MAX_METADATA_BYTES}"
                ));
                continue;
            }
        }
        let mut message = NewMessage::new(id, origin, email.to_owned(), domain, body);
        message.meta.metadata = metadata;
        out.messages.push(message);
    }
    out
}

/// A recipient's address as it goes on the envelope (trimmed, its domain as A-labels), or
/// why it cannot be one. Depends on the address alone, so a request checked before it is
/// stored (deferred generation) refuses the same recipients as its expansion later.
pub fn envelope_address(address: &str) -> Result<std::borrow::Cow<'_, str>, String> {
    let email = ascii_domain(address.trim())?;
    smtp_proto::validate_mailbox(&email).map_err(|e| e.to_string())?;
    Ok(email)
}

/// The address with its domain as A-labels (punycode, IDNA 2008 / UTS 46), so the envelope
/// is ASCII unless the local part itself needs SMTPUTF8. An ASCII address comes back as it
/// is (borrowed).
pub fn ascii_domain(address: &str) -> Result<std::borrow::Cow<'_, str>, String> {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Ok(std::borrow::Cow::Borrowed(address));
    };
    if domain.is_ascii() {
        return Ok(std::borrow::Cow::Borrowed(address));
    }
    let ascii = idna::domain_to_ascii(domain).map_err(|_| {
        format!("the domain {domain:?} is not a valid internationalised domain name (IDNA)")
    })?;
    Ok(std::borrow::Cow::Owned(format!("{local}@{ascii}")))
}

/// Bodies up to this size that are not strict JSON get a second reading as JSON5.
const JSON5_MAX: usize = 1 << 20;

/// Reads an inject request body: strict JSON, or, for a small body that is not, JSON5 (the
/// comments and trailing commas of KumoMTA's documented examples, which clients copy as they
/// are). A body neither reads as is refused with the strict reader's error.
pub fn parse_request(body: &[u8]) -> Result<InjectRequest, String> {
    match serde_json::from_slice(body) {
        Ok(request) => Ok(request),
        Err(strict) => {
            let relaxed = (body.len() <= JSON5_MAX)
                .then(|| std::str::from_utf8(body).ok())
                .flatten()
                .and_then(|text| json5::from_str::<InjectRequest>(text).ok());
            relaxed.ok_or_else(|| strict.to_string())
        }
    }
}

/// The body of `POST /api/inject/v1`. Field names follow KumoMTA's inject API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectRequest {
    /// Envelope sender ("" for the null sender).
    pub envelope_sender: String,
    /// Raw message or a builder object.
    pub content: Content,
    /// Recipients; each becomes its own queued message.
    pub recipients: Vec<Recipient>,
    /// Request-wide template values.
    #[serde(default)]
    pub substitutions: Map<String, Value>,
    /// Campaign name.
    #[serde(default)]
    pub campaign: Option<String>,
    /// Tenant name.
    #[serde(default)]
    pub tenant: Option<String>,
    /// `Jinja` (default), `Static` (no expansion) or `Handlebars` (KumoMTA's field).
    #[serde(default)]
    pub template_dialect: Dialect,
    /// Accepted for compatibility with KumoMTA clients; Drover always spools before answering.
    #[serde(default)]
    pub deferred_spool: Option<Value>,
    /// Accepted for compatibility with KumoMTA clients.
    #[serde(default)]
    pub deferred_generation: Option<Value>,
    /// KumoMTA's trace header switches: `received_header: false` leaves out the
    /// `Received:` header; the supplemental header (on unless `supplemental_header: false`)
    /// carries the recipient, the message id and the named metadata.
    #[serde(default)]
    pub trace_headers: TraceHeaders,
    /// `high`, `normal` (default) or `low` (contract §3, Drover's extension).
    #[serde(default)]
    pub priority: queue::Priority,
}

/// `trace_headers` of an inject request (KumoMTA's `HttpTraceHeaders`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TraceHeaders {
    /// Add the `Received:` trace header (default).
    pub received_header: bool,
    /// Add KumoMTA's supplemental header (default, as KumoMTA's HTTP injection does).
    pub supplemental_header: bool,
    /// Its name (default `X-KumoRef`).
    pub header_name: Option<String>,
    /// The metadata it carries: `tenant`, `campaign` or keys of a recipient's `metadata`.
    pub include_meta_names: Vec<String>,
}

impl TraceHeaders {
    /// The supplemental header to write, if any; an unusable name is the request's error.
    pub fn supplemental(&self) -> Result<Option<Supplemental>, String> {
        if !self.supplemental_header {
            return Ok(None);
        }
        let header_name = self
            .header_name
            .clone()
            .unwrap_or_else(|| feedback::trace_ref::DEFAULT_HEADER.to_owned());
        if !feedback::trace_ref::valid_header_name(&header_name) {
            return Err(format!(
                "header_name {header_name:?} is not a field name a trace header can have"
            ));
        }
        Ok(Some(Supplemental {
            header_name,
            include_meta_names: self.include_meta_names.clone(),
        }))
    }
}

impl Default for TraceHeaders {
    fn default() -> Self {
        TraceHeaders {
            received_header: true,
            supplemental_header: true,
            header_name: None,
            include_meta_names: Vec::new(),
        }
    }
}

/// `content`: a raw message or a description to build one from.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// A complete RFC 5322 message (a template).
    Raw(String),
    /// Parts to build a MIME message from.
    Builder(Box<Builder>),
}

/// An address with an optional display name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedAddress {
    /// The address.
    pub email: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
}

/// The builder form of `content`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Builder {
    /// From header.
    pub from: NamedAddress,
    /// Subject (a template).
    #[serde(default)]
    pub subject: Option<String>,
    /// Plain-text part (a template).
    #[serde(default)]
    pub text_body: Option<String>,
    /// HTML part (a template).
    #[serde(default)]
    pub html_body: Option<String>,
    /// Extra headers (values are templates).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Reply-To header.
    #[serde(default)]
    pub reply_to: Option<NamedAddress>,
    /// AMP part (`text/x-amp-html`, a template), between the text and HTML parts of the
    /// `multipart/alternative` (KumoMTA's `amp_html_body`).
    #[serde(default)]
    pub amp_html_body: Option<String>,
    /// Files attached (or, with a `content_id`, shown inline by the HTML part).
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// Substituted values are HTML-escaped in `html_body` and `amp_html_body` (default);
    /// `false` puts them in as given.
    #[serde(default = "yes")]
    pub html_autoescape: bool,
}

fn yes() -> bool {
    true
}

/// One `attachments` entry. Drover's field names and KumoMTA's are both accepted:
/// `filename` or `file_name`; `data` is base64 when `base64` is true, which is the default
/// with `filename` and not with `file_name` (KumoMTA's default: `data` is the text itself).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    /// File name shown to the reader.
    #[serde(default)]
    pub filename: Option<String>,
    /// KumoMTA's name for `filename`.
    #[serde(default)]
    pub file_name: Option<String>,
    /// MIME type, e.g. `application/pdf`.
    pub content_type: String,
    /// The content: base64, or the text itself (see `base64`).
    pub data: String,
    /// Whether `data` is base64.
    #[serde(default)]
    pub base64: Option<bool>,
    /// Shown inline rather than as an attachment (implied by `content_id`).
    #[serde(default)]
    pub inline: bool,
    /// Content-ID for `cid:` references from the HTML part; the part then goes into a
    /// `multipart/related` with it.
    #[serde(default)]
    pub content_id: Option<String>,
}

/// An attachment checked and decoded once per request.
#[derive(Debug)]
struct Part {
    content_type: String,
    filename: Option<String>,
    bytes: Vec<u8>,
    content_id: Option<String>,
    inline: bool,
}

impl Attachment {
    fn decode(self, i: usize) -> Result<Part, TemplateError> {
        use base64::Engine as _;
        let field = |name: &str| format!("content.attachments[{i}].{name}");
        let ct = self.content_type.trim();
        let valid_ct = ct.split_once('/').is_some_and(|(t, s)| {
            let token = |x: &str| {
                !x.is_empty()
                    && x.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
            };
            token(t) && token(s.split(';').next().unwrap_or_default().trim())
        });
        if !valid_ct || ct.contains(['\r', '\n']) {
            return Err(TemplateError::invalid(format!(
                "{}: {ct:?} is not a MIME type (type/subtype)",
                field("content_type")
            )));
        }
        let kumo = self.file_name.is_some();
        let filename = self.filename.or(self.file_name);
        if filename
            .as_deref()
            .is_some_and(|f| f.contains(['\r', '\n']))
        {
            return Err(TemplateError::invalid(format!(
                "{}: contains a line break",
                field("filename")
            )));
        }
        let content_id = self.content_id.map(|c| {
            c.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        });
        if content_id.as_deref().is_some_and(|c| {
            c.is_empty()
                || c.contains(|ch: char| {
                    ch.is_control() || ch.is_whitespace() || ch == '<' || ch == '>'
                })
        }) {
            return Err(TemplateError::invalid(format!(
                "{}: not a valid Content-ID",
                field("content_id")
            )));
        }
        let bytes = if self.base64.unwrap_or(!kumo) {
            let compact: String = self.data.split_ascii_whitespace().collect();
            base64::engine::general_purpose::STANDARD
                .decode(compact.as_bytes())
                .map_err(|e| {
                    TemplateError::invalid(format!("{}: invalid base64: {e}", field("data")))
                })?
        } else {
            self.data.into_bytes()
        };
        Ok(Part {
            content_type: ct.to_owned(),
            filename,
            inline: self.inline || content_id.is_some(),
            content_id,
            bytes,
        })
    }
}

/// One recipient.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipient {
    /// Address.
    pub email: String,
    /// Display name, also the `name` template value.
    #[serde(default)]
    pub name: Option<String>,
    /// Recipient template values, over the request's.
    #[serde(default)]
    pub substitutions: Map<String, Value>,
    /// Any JSON values the platform wants back in every record of this recipient's message
    /// (KumoMTA's per-recipient `metadata`; contract §4 `metadata`).
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
}

/// The largest `metadata` object accepted per recipient (serialised): it is kept with the
/// message and copied into each of its records.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// What is wrong with a request's content: the whole request's fault.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    /// What, naming the field.
    pub message: String,
    /// A template that does not compile (KumoMTA answers those 422), rather than a field
    /// that is not valid (400).
    pub syntax: bool,
}

impl TemplateError {
    fn invalid(message: impl Into<String>) -> TemplateError {
        TemplateError {
            message: message.into(),
            syntax: false,
        }
    }

    fn syntax(message: impl Into<String>) -> TemplateError {
        TemplateError {
            message: message.into(),
            syntax: true,
        }
    }
}

pub use crate::templates::{Dialect, RENDER_FUEL};

/// Compiled templates for one request.
pub struct Renderer {
    templates: crate::templates::Templates,
    kind: Kind,
}

enum Kind {
    Raw,
    Builder(Box<Builder>, Vec<Part>),
}

fn add(
    templates: &mut crate::templates::Templates,
    name: &'static str,
    source: &str,
) -> Result<(), TemplateError> {
    templates
        .add(name.to_owned(), source.to_owned())
        .map_err(|e| TemplateError::syntax(format!("template error in {name}: {e}")))
}

/// Splits a raw message at its first empty line. `(headers, body)`; the separator is in neither.
fn split_message(raw: &str) -> (&str, &str) {
    for sep in ["\r\n\r\n", "\n\n"] {
        if let Some(i) = raw.find(sep) {
            // The earliest separator wins, whichever line ending it uses.
            let other = if sep == "\r\n\r\n" {
                raw.find("\n\n")
            } else {
                raw.find("\r\n\r\n")
            };
            if other.is_none_or(|j| i <= j) {
                return (&raw[..i], &raw[i + sep.len()..]);
            }
        }
    }
    (raw, "")
}

impl Renderer {
    /// Compiles the request's templates; no rendered part may exceed `max_size` bytes.
    pub fn new(content: Content, max_size: usize) -> Result<Renderer, TemplateError> {
        Renderer::with_dialect(content, max_size, Dialect::Jinja)
    }

    /// [`Renderer::new`] for templates of `dialect` (KumoMTA's `template_dialect`).
    pub fn with_dialect(
        content: Content,
        max_size: usize,
        dialect: Dialect,
    ) -> Result<Renderer, TemplateError> {
        // Values go into headers and text as given; into the HTML parts of a builder message
        // HTML-escaped, unless the request says otherwise.
        let escape_html = matches!(&content, Content::Builder(b) if b.html_autoescape);
        let mut env = crate::templates::Templates::new(dialect, escape_html, max_size);
        let kind = match content {
            Content::Raw(raw) => {
                if raw.trim().is_empty() {
                    return Err(TemplateError::invalid("content is empty"));
                }
                let (head, body) = split_message(&raw);
                add(&mut env, "headers", head)?;
                add(&mut env, "body", body)?;
                Kind::Raw
            }
            Content::Builder(mut b) => {
                smtp_proto::validate_mailbox(&b.from.email)
                    .map_err(|e| TemplateError::invalid(format!("content.from: {e}")))?;
                // Header fields are one line each: a line break in a value would start a
                // header of the client's choosing (`Bcc:`) or end the header section.
                let one_line = |field: &str, value: &str| {
                    if value.contains(['\r', '\n']) {
                        Err(TemplateError::invalid(format!(
                            "{field}: contains a line break (CR or LF); header fields are one line"
                        )))
                    } else {
                        Ok(())
                    }
                };
                one_line("content.from.name", b.from.name.as_deref().unwrap_or(""))?;
                one_line("content.subject", b.subject.as_deref().unwrap_or(""))?;
                if let Some(r) = &b.reply_to {
                    smtp_proto::validate_mailbox(&r.email)
                        .map_err(|e| TemplateError::invalid(format!("content.reply_to: {e}")))?;
                    one_line("content.reply_to.name", r.name.as_deref().unwrap_or(""))?;
                }
                for (name, value) in &b.headers {
                    one_line(&format!("content.headers.{name}"), value)?;
                }
                add(&mut env, "subject", b.subject.as_deref().unwrap_or(""))?;
                add(&mut env, "text", b.text_body.as_deref().unwrap_or(""))?;
                add(&mut env, "html", b.html_body.as_deref().unwrap_or(""))?;
                add(&mut env, "amp", b.amp_html_body.as_deref().unwrap_or(""))?;
                if b.text_body.is_none() && b.html_body.is_none() && b.amp_html_body.is_none() {
                    return Err(TemplateError::invalid(
                        "content needs text_body, html_body or amp_html_body",
                    ));
                }
                let parts = std::mem::take(&mut b.attachments)
                    .into_iter()
                    .enumerate()
                    .map(|(i, a)| a.decode(i))
                    .collect::<Result<Vec<Part>, _>>()?;
                for (name, value) in &b.headers {
                    if name.is_empty() || !name.bytes().all(|c| c.is_ascii_graphic() && c != b':') {
                        return Err(TemplateError::invalid(format!(
                            "content.headers: invalid header name {name:?}"
                        )));
                    }
                    env.add(format!("h:{name}"), value.clone()).map_err(|e| {
                        TemplateError::syntax(format!("template error in header {name}: {e}"))
                    })?;
                }
                Kind::Builder(b, parts)
            }
        };
        Ok(Renderer {
            templates: env,
            kind,
        })
    }

    /// Renders one template to bytes, within the fuel and size limits.
    fn render_bytes(&self, name: &str, ctx: &Map<String, Value>) -> Result<Vec<u8>, String> {
        self.templates.render(name, ctx)
    }

    /// Renders one template to a string (for headers and MIME parts).
    fn render(&self, name: &str, ctx: &Map<String, Value>) -> Result<String, String> {
        // Rendering writes only the UTF-8 of strings.
        String::from_utf8(self.render_bytes(name, ctx)?).map_err(|e| format!("template error: {e}"))
    }

    /// Renders the message for one recipient, with CRLF line endings and the headers every
    /// message needs (Message-ID, Date) added when the template lacks them.
    pub fn render_for(
        &self,
        request_subs: &Map<String, Value>,
        recipient: &Recipient,
        id: &str,
        sender_domain: &str,
    ) -> Result<Vec<u8>, String> {
        let mut ctx = request_subs.clone();
        for (k, v) in &recipient.substitutions {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("email".into(), Value::String(recipient.email.clone()));
        ctx.insert(
            "name".into(),
            Value::String(recipient.name.clone().unwrap_or_default()),
        );
        // KumoMTA's predefined `to_header`, and Drover's `metadata` (the recipient's object;
        // a substitution of that name wins).
        ctx.insert(
            "to_header".into(),
            Value::String(to_header(recipient.name.as_deref(), &recipient.email)),
        );
        // Always an object, so `metadata.x` is merely empty for a recipient without it.
        ctx.entry("metadata")
            .or_insert_with(|| Value::Object(recipient.metadata.clone().unwrap_or_default()));
        let header_ctx = header_safe(&ctx);
        let message = match &self.kind {
            Kind::Raw => {
                let head = self.render("headers", &header_ctx)?;
                // The body goes out as bytes: no second pass to validate it as a string.
                let body = self.render_bytes("body", &ctx)?;
                let head = head.trim_end_matches(['\r', '\n']);
                let mut out = Vec::with_capacity(head.len() + body.len() + 64);
                to_crlf_into(head.as_bytes(), &mut out);
                out.extend_from_slice(b"\r\n\r\n");
                to_crlf_into(&body, &mut out);
                out
            }
            Kind::Builder(b, parts) => {
                self.build(b, parts, &ctx, &header_ctx, recipient, id, sender_domain)?
            }
        };
        Ok(message)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        b: &Builder,
        parts: &[Part],
        ctx: &Map<String, Value>,
        header_ctx: &Map<String, Value>,
        recipient: &Recipient,
        id: &str,
        sender_domain: &str,
    ) -> Result<Vec<u8>, String> {
        use mail_builder::headers::address::Address;
        use mail_builder::headers::raw::Raw;
        use mail_builder::MessageBuilder;
        let addr = |a: &NamedAddress| -> Address<'static> {
            Address::new_address(a.name.clone(), a.email.clone())
        };
        let mut mb = MessageBuilder::new()
            .from(addr(&b.from))
            .to(Address::new_address(
                recipient
                    .name
                    .as_ref()
                    .map(|n| n.replace(['\r', '\n'], " ")),
                recipient.email.clone(),
            ))
            .subject(one_line(self.render("subject", header_ctx)?))
            .message_id(format!("{id}@{sender_domain}"));
        if let Some(r) = &b.reply_to {
            mb = mb.reply_to(addr(r));
        }
        for name in b.headers.keys() {
            let value = one_line(self.render(&format!("h:{name}"), header_ctx)?);
            mb = mb.header(name.clone(), Raw::new(value));
        }
        mb = mb.body(self.mime_body(b, parts, ctx)?);
        mb.write_to_vec()
            .map(|m| to_crlf(&m))
            .map_err(|e| format!("cannot build message: {e}"))
    }
}

impl Renderer {
    /// The MIME tree: the bodies as `multipart/alternative` (text, AMP, HTML), inside a
    /// `multipart/related` with the inline parts, inside a `multipart/mixed` with the
    /// attachments; each level only when it has more than one part.
    fn mime_body<'a>(
        &self,
        b: &Builder,
        parts: &'a [Part],
        ctx: &Map<String, Value>,
    ) -> Result<mail_builder::mime::MimePart<'a>, String> {
        use mail_builder::mime::{BodyPart, MimePart};
        let mut alternatives = Vec::new();
        if b.text_body.is_some() {
            alternatives.push(MimePart::new("text/plain", self.render("text", ctx)?));
        }
        if b.amp_html_body.is_some() {
            alternatives.push(MimePart::new("text/x-amp-html", self.render("amp", ctx)?));
        }
        if b.html_body.is_some() {
            alternatives.push(MimePart::new("text/html", self.render("html", ctx)?));
        }
        let one_or_many = |content_type: &'static str, mut list: Vec<MimePart<'a>>| {
            if list.len() == 1 {
                list.pop().expect("one part")
            } else {
                MimePart::new(content_type, list)
            }
        };
        let part = |p: &'a Part| {
            let mut m = MimePart::new(
                p.content_type.as_str(),
                BodyPart::Binary(std::borrow::Cow::Borrowed(&p.bytes[..])),
            );
            if p.inline {
                m = match &p.filename {
                    Some(name) => m.header(
                        "Content-Disposition",
                        mail_builder::headers::content_type::ContentType::new("inline")
                            .attribute("filename", name.as_str()),
                    ),
                    None => m.inline(),
                };
                if let Some(cid) = &p.content_id {
                    m = m.cid(cid.as_str());
                }
            } else {
                m = m.attachment(p.filename.as_deref().unwrap_or("attachment"));
            }
            m
        };
        let mut body = one_or_many("multipart/alternative", alternatives);
        let inline: Vec<MimePart<'a>> = parts.iter().filter(|p| p.inline).map(part).collect();
        if !inline.is_empty() {
            let mut related = vec![body];
            related.extend(inline);
            body = MimePart::new("multipart/related", related);
        }
        let attached: Vec<MimePart<'a>> = parts.iter().filter(|p| !p.inline).map(part).collect();
        if !attached.is_empty() {
            let mut mixed = vec![body];
            mixed.extend(attached);
            body = MimePart::new("multipart/mixed", mixed);
        }
        Ok(body)
    }
}

/// A rendered header value on one line: a template can still make a line break (a string
/// literal with `\n`), which must not start a header of its own.
/// `"Name" <email>` (the name as an RFC 2047 word when it is not ASCII), or the bare address
/// without a name: a value that can stand in a `To:` header as it is.
fn to_header(name: Option<&str>, email: &str) -> String {
    let name = name.map(|n| n.replace(['\r', '\n'], " "));
    match name.as_deref().map(str::trim) {
        None | Some("") => email.to_owned(),
        Some(n) if n.is_ascii() => {
            let quoted = n.replace('\\', "\\\\").replace('"', "\\\"");
            format!("\"{quoted}\" <{email}>")
        }
        Some(n) => {
            use base64::Engine as _;
            // RFC 2047 words stay within 75 characters: at most 45 bytes each, whole chars.
            let mut words = Vec::new();
            let mut start = 0;
            for (i, c) in n.char_indices() {
                if i + c.len_utf8() - start > 45 {
                    words.push(&n[start..i]);
                    start = i;
                }
            }
            words.push(&n[start..]);
            let words: Vec<String> = words
                .iter()
                .map(|w| {
                    let b64 = base64::engine::general_purpose::STANDARD.encode(w.as_bytes());
                    format!("=?utf-8?b?{b64}?=")
                })
                .collect();
            format!("{} <{email}>", words.join(" "))
        }
    }
}

fn one_line(value: String) -> String {
    if value.contains(['\r', '\n']) {
        value.replace("\r\n", " ").replace(['\r', '\n'], " ")
    } else {
        value
    }
}

fn header_safe(ctx: &Map<String, Value>) -> Map<String, Value> {
    fn clean(v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(s.replace(['\r', '\n'], " ")),
            Value::Array(a) => Value::Array(a.iter().map(clean).collect()),
            Value::Object(o) => {
                Value::Object(o.iter().map(|(k, v)| (k.clone(), clean(v))).collect())
            }
            other => other.clone(),
        }
    }
    ctx.iter().map(|(k, v)| (k.clone(), clean(v))).collect()
}

/// Normalises line endings to CRLF (bare LF and bare CR alike).
pub fn to_crlf(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + 2);
    to_crlf_into(input, &mut out);
    out
}

/// [`to_crlf`], appending to `out`.
pub fn to_crlf_into(input: &[u8], out: &mut Vec<u8>) {
    out.reserve(input.len() + 2);
    // One SIMD pass over the line ends; the input is copied in long runs between the rare
    // places that need a byte inserted.
    let mut copied = 0;
    for i in memchr::memchr2_iter(b'\r', b'\n', input) {
        if input[i] == b'\r' {
            if input.get(i + 1) != Some(&b'\n') {
                out.extend_from_slice(&input[copied..=i]);
                out.push(b'\n');
                copied = i + 1;
            }
        } else if i == 0 || input[i - 1] != b'\r' {
            out.extend_from_slice(&input[copied..i]);
            out.extend_from_slice(b"\r\n");
            copied = i + 1;
        }
    }
    out.extend_from_slice(&input[copied..]);
}

/// The header fields of a message, in order, unfolded, names and values trimmed.
fn header_fields(message: &[u8]) -> Vec<(String, String)> {
    // Only the header section is decoded: a body can be tens of megabytes.
    let mut end = message.len();
    let mut start = 0;
    while start < message.len() {
        let line_end = message[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |i| start + i + 1);
        if matches!(&message[start..line_end], b"\n" | b"\r\n") {
            end = start;
            break;
        }
        start = line_end;
    }
    let head = String::from_utf8_lossy(&message[..end]);
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut continuing = false;
    for line in head.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let (true, Some((_, v))) = (continuing, fields.last_mut()) {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        match line.split_once(':') {
            Some((n, v)) => {
                fields.push((n.trim().to_owned(), v.trim().to_owned()));
                continuing = true;
            }
            None => continuing = false,
        }
    }
    fields
}

/// The tracked headers of a message (first occurrence of each, unfolded).
pub fn tracked_headers(message: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, value) in header_fields(message) {
        if let Some(canonical) = TRACKED_HEADERS
            .iter()
            .find(|t| t.eq_ignore_ascii_case(&name))
        {
            out.entry((*canonical).to_owned()).or_insert(value);
        }
    }
    out
}

/// The first `name` header of a message (case-insensitive), unfolded; `None` when absent
/// or empty.
pub fn header_value(message: &[u8], name: &str) -> Option<String> {
    header_fields(message)
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(content: Value) -> InjectRequest {
        serde_json::from_value(serde_json::json!({
            "envelope_sender": "b@news.example.com",
            "content": content,
            "recipients": [{"email": "ann@example.test", "name": "Ann\r\nBcc: evil@x.test", "substitutions": {"plan": "gold"}}],
            "substitutions": {"plan": "silver", "campaign_name": "nov"},
        }))
        .unwrap()
    }

    fn parse(message: &[u8]) -> mail_parser::Message<'_> {
        mail_parser::MessageParser::default()
            .parse(message)
            .expect("parses as MIME")
    }

    #[test]
    fn attachments_inline_parts_and_amp_make_the_usual_mime_tree() {
        use mail_parser::MimeHeaders;
        let gif =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b"GIF89a-bytes");
        let r = req(serde_json::json!({
            "from": {"email": "news@example.com"},
            "subject": "Report for {{ name }}",
            "text_body": "Hi {{ name }}",
            "html_body": "<p>Hi {{ plan }}</p><img src=\"cid:logo\">",
            "amp_html_body": "<html amp4email>{{ plan }}</html>",
            "attachments": [
                {"filename": "report.pdf", "content_type": "application/pdf", "data": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b"%PDF-1.4 fake")},
                {"file_name": "logo.gif", "content_type": "image/gif", "data": gif, "base64": true, "content_id": "logo"},
                {"file_name": "notes.txt", "content_type": "text/plain", "data": "plain text, not base64"},
            ],
        }));
        let mut recipient = r.recipients[0].clone();
        recipient
            .substitutions
            .insert("plan".into(), Value::String("<b>gold</b> & co".into()));
        let renderer = Renderer::new(r.content, 1 << 20).unwrap();
        let out = renderer
            .render_for(&r.substitutions, &recipient, "abc", "news.example.com")
            .unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(!text.replace("\r\n", "").contains('\n'), "only CRLF");
        let m = parse(&out);
        assert_eq!(m.content_type().unwrap().subtype(), Some("mixed"));
        // HTML escaped in the HTML and AMP parts, as given in the text part.
        let html = m.body_html(0).unwrap();
        assert!(
            html.contains("&lt;b&gt;gold&lt;") && html.contains("&amp; co"),
            "{html}"
        );
        assert!(!html.contains("<b>"), "{html}");
        assert!(text.contains("multipart/related"), "{text}");
        assert!(text.contains("text/x-amp-html"), "{text}");
        let attachments: Vec<_> = m
            .parts
            .iter()
            .filter(|p| p.attachment_name().is_some())
            .collect();
        assert_eq!(attachments.len(), 3, "{text}");
        let pdf = attachments
            .iter()
            .find(|a| a.attachment_name() == Some("report.pdf"))
            .unwrap();
        assert_eq!(pdf.contents(), b"%PDF-1.4 fake");
        let logo = attachments
            .iter()
            .find(|a| a.attachment_name() == Some("logo.gif"))
            .unwrap();
        assert_eq!(logo.content_id(), Some("logo"));
        assert_eq!(logo.contents(), b"GIF89a-bytes");
        let notes = attachments
            .iter()
            .find(|a| a.attachment_name() == Some("notes.txt"))
            .unwrap();
        assert_eq!(notes.contents(), b"plain text, not base64");
    }

    #[test]
    fn autoescape_can_be_turned_off_and_bad_attachments_are_named() {
        let r = req(serde_json::json!({
            "from": {"email": "news@example.com"},
            "html_body": "<p>{{ plan }}</p>",
            "html_autoescape": false,
        }));
        let mut recipient = r.recipients[0].clone();
        recipient
            .substitutions
            .insert("plan".into(), Value::String("<b>gold</b>".into()));
        let renderer = Renderer::new(r.content, 1 << 20).unwrap();
        let out = renderer
            .render_for(&r.substitutions, &recipient, "abc", "news.example.com")
            .unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("<p><b>gold</b></p>"));
        for (attachment, field) in [
            (
                serde_json::json!({"filename": "a", "content_type": "application/pdf", "data": "not base64!"}),
                "attachments[0].data",
            ),
            (
                serde_json::json!({"filename": "a", "content_type": "pdf", "data": ""}),
                "attachments[0].content_type",
            ),
            (
                serde_json::json!({"filename": "a\r\nX: y", "content_type": "text/plain", "data": ""}),
                "attachments[0].filename",
            ),
        ] {
            let r = req(serde_json::json!({
                "from": {"email": "news@example.com"},
                "text_body": "x",
                "attachments": [attachment],
            }));
            let err = Renderer::new(r.content, 1 << 20).err().unwrap();
            assert!(err.message.contains(field), "{field}: {}", err.message);
        }
    }

    #[test]
    fn unicode_domains_become_a_labels_and_bad_ones_are_named() {
        assert_eq!(
            ascii_domain("ann@bücher.example").unwrap(),
            "ann@xn--bcher-kva.example"
        );
        assert_eq!(
            ascii_domain("ann@example.test").unwrap(),
            "ann@example.test"
        );
        assert!(matches!(
            ascii_domain("ann@example.test").unwrap(),
            std::borrow::Cow::Borrowed(_)
        ));
        // The local part is left alone (it needs SMTPUTF8, not punycode).
        assert_eq!(
            ascii_domain("jörg@bücher.example").unwrap(),
            "jörg@xn--bcher-kva.example"
        );
        let err = ascii_domain("ann@xn--a.bücher").unwrap_err();
        assert!(err.contains("internationalised"), "{err}");
    }

    #[test]
    fn line_breaks_in_builder_header_fields_are_refused_naming_the_field() {
        let base = serde_json::json!({
            "from": {"email": "news@example.com", "name": "News"},
            "subject": "Hello",
            "text_body": "Hi",
        });
        let cases = [
            (
                "/headers",
                serde_json::json!({"X-Ok": "v\r\nBcc: evil@evil.test"}),
                "content.headers.X-Ok",
            ),
            (
                "/subject",
                serde_json::json!("Hi\nBcc: evil@evil.test"),
                "content.subject",
            ),
            (
                "/from/name",
                serde_json::json!("News\r\nBcc: evil@evil.test"),
                "content.from.name",
            ),
            (
                "/reply_to",
                serde_json::json!({"email": "r@example.com", "name": "R\nX: y"}),
                "content.reply_to.name",
            ),
            (
                "/reply_to",
                serde_json::json!({"email": "r@example.com\r\nBcc: e@e.test"}),
                "content.reply_to",
            ),
        ];
        for (pointer, value, field) in cases {
            let mut content = base.clone();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let target = if parent.is_empty() {
                &mut content
            } else {
                content.pointer_mut(parent).unwrap()
            };
            target[key] = value;
            let err = Renderer::new(req(content).content, 1 << 20)
                .err()
                .unwrap_or_else(|| panic!("{field} accepted"));
            assert!(err.message.starts_with(field), "{field}: {}", err.message);
        }
        // A header name with a colon or a line break.
        for name in ["X-A:b", "X-A\r\nBcc"] {
            let mut content = base.clone();
            content["headers"] = serde_json::json!({ name: "v" });
            assert!(
                Renderer::new(req(content).content, 1 << 20).is_err(),
                "{name:?}"
            );
        }
    }

    #[test]
    fn line_breaks_made_by_templates_stay_inside_their_header() {
        let r = req(serde_json::json!({
            "from": {"email": "news@example.com"},
            "subject": "Hi {{ '\\r\\nBcc: evil@evil.test' }}",
            "text_body": "Hi",
            "headers": {"X-Ok": "{{ plan }}{{ '\\nBcc: evil@evil.test' }}"},
        }));
        let mut recipient = r.recipients[0].clone();
        recipient
            .substitutions
            .insert("plan".into(), Value::String("gold\r\nBcc: x@x.test".into()));
        let renderer = Renderer::new(r.content, 1 << 20).unwrap();
        let out = renderer
            .render_for(&r.substitutions, &recipient, "abc", "news.example.com")
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let head = text.split("\r\n\r\n").next().unwrap();
        assert!(
            !head
                .lines()
                .any(|l| l.to_ascii_lowercase().starts_with("bcc:")),
            "{head}"
        );
    }

    #[test]
    fn raw_templates_render_with_overlay_and_safe_headers() {
        let r = req(Value::String(
            "From: n@example.com\nSubject: Hi {{ name }}\nX-Campaign: {{ campaign_name }}\n\nDear {{ name }}, plan {{ plan }} for {{ email }}.{{ missing }}\n".into(),
        ));
        let renderer = Renderer::new(r.content, 1 << 20).unwrap();
        let out = renderer
            .render_for(
                &r.substitutions,
                &r.recipients[0],
                "abc",
                "news.example.com",
            )
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("Subject: Hi Ann  Bcc: evil@x.test\r\n"),
            "{text}"
        );
        let head = text.split("\r\n\r\n").next().unwrap();
        assert!(!head.contains("\r\nBcc:"), "{head}");
        assert!(
            text.contains(
                "\r\n\r\nDear Ann\r\nBcc: evil@x.test, plan gold for ann@example.test.\r\n"
            ),
            "{text}"
        );
        // Message-ID and Date are `prepare`'s, for both doors alike.
        assert!(!text.contains("Message-ID"));
        assert!(
            !text.replace("\r\n", "").contains('\n'),
            "only CRLF line endings"
        );
        let tracked = tracked_headers(text.as_bytes());
        assert_eq!(tracked.get("X-Campaign").map(String::as_str), Some("nov"));
    }

    #[test]
    fn to_header_and_metadata_reach_templates_and_the_trace_header_is_written() {
        let r: InjectRequest = serde_json::from_value(serde_json::json!({
            "envelope_sender": "b@news.example.com",
            "content": "To: {{ to_header }}\nSubject: {{ metadata.list }}\n\nfor {{ metadata.user_id }}",
            "recipients": [
                {"email": "ann@example.test", "name": "Ann \"A\" Smith",
                 "metadata": {"user_id": 7, "list": "weekly"}},
                {"email": "bob@example.test", "name": "Björn",
                 "metadata": {"user_id": 8, "list": "daily"}, "substitutions": {"metadata": {"list": "mine"}}},
                {"email": "cy@example.test"}
            ],
            "trace_headers": {"include_meta_names": ["tenant", "list", "absent"]},
            "tenant": "acme"
        }))
        .unwrap();
        let supplemental = r
            .trace_headers
            .supplemental()
            .unwrap()
            .map(std::sync::Arc::new);
        let origin = Origin {
            sender: "b@news.example.com".into(),
            campaign: None,
            tenant: r.tenant.clone(),
            received_ms: 0,
            priority: Default::default(),
            door: None,
            supplemental,
        };
        let renderer = Renderer::new(r.content, 1 << 20).unwrap();
        let out = prepare(
            &renderer,
            &r.substitutions,
            &r.recipients,
            &origin,
            "news.example.com",
            1 << 20,
        );
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let texts: Vec<String> = out
            .messages
            .iter()
            .map(|m| String::from_utf8(m.body.clone()).unwrap())
            .collect();
        assert!(
            texts[0].contains("To: \"Ann \\\"A\\\" Smith\" <ann@example.test>\r\n"),
            "{}",
            texts[0]
        );
        assert!(
            texts[0].contains("Subject: weekly\r\n\r\nfor 7"),
            "{}",
            texts[0]
        );
        let parsed = mail_parser::MessageParser::default()
            .parse(texts[1].as_bytes())
            .unwrap();
        assert_eq!(parsed.to().unwrap().first().unwrap().name(), Some("Björn"));
        // A substitution named `metadata` wins over the recipient's object.
        assert!(texts[1].contains("Subject: mine\r\n"), "{}", texts[1]);
        assert!(texts[2].starts_with("X-KumoRef: "), "{}", texts[2]);
        assert!(texts[2].contains("To: cy@example.test\r\n"), "{}", texts[2]);
        // The header carries the recipient, the id and the named metadata that exists.
        let value = header_value(&out.messages[0].body, "X-KumoRef").unwrap();
        let trace = feedback::trace_ref::decode(&value).unwrap();
        assert_eq!(trace.recipient.as_deref(), Some("ann@example.test"));
        assert_eq!(trace.id, Some(out.messages[0].meta.id.to_string()));
        assert_eq!(trace.meta["tenant"], "acme");
        assert_eq!(trace.meta["list"], "weekly");
        assert!(!trace.meta.contains_key("absent"));
        assert!(!trace.meta.contains_key("user_id"));
        // Off on request, and a name that is not an X- field is the request's error.
        let off: TraceHeaders =
            serde_json::from_value(serde_json::json!({"supplemental_header": false})).unwrap();
        assert!(off.supplemental().unwrap().is_none());
        let bad: TraceHeaders =
            serde_json::from_value(serde_json::json!({"header_name": "Subject"})).unwrap();
        assert!(bad.supplemental().is_err());
    }

    #[test]
    fn requests_read_as_json_or_json5_and_errors_are_the_strict_readers() {
        let strict =
            br#"{"envelope_sender": "a@b.c", "content": "x", "recipients": [{"email": "r@b.c"}]}"#;
        assert_eq!(parse_request(strict).unwrap().recipients.len(), 1);
        let relaxed = b"{\n // a comment\n envelope_sender: 'a@b.c', \"content\": \"x\",\n \"recipients\": [{\"email\": \"r@b.c\",},],\n}";
        assert_eq!(parse_request(relaxed).unwrap().recipients[0].email, "r@b.c");
        let e = parse_request(br#"{"envelope_sender": "a@b.c", "content": "x"}"#)
            .err()
            .unwrap();
        assert!(e.contains("missing field `recipients`"), "{e}");
        let e = parse_request(
            br#"{"envelope_sender": "a@b.c", "content": "x", "recipients": [], "bogus": 1}"#,
        )
        .err()
        .unwrap();
        assert!(e.contains("unknown field `bogus`"), "{e}");
        assert!(parse_request(b"\xff\xfe").is_err());
    }

    #[test]
    fn bad_templates_are_request_errors() {
        let r = req(Value::String("Subject: {{ oops\n\nx".into()));
        assert!(Renderer::new(r.content, 1 << 20).is_err());
        let r = req(Value::String("   ".into()));
        assert!(Renderer::new(r.content, 1 << 20).is_err());
    }

    #[test]
    fn hostile_templates_stop_at_the_fuel_and_size_limits() {
        let render = |template: &str, max_size: usize| {
            let r = req(Value::String(template.into()));
            let renderer = Renderer::new(r.content, max_size).unwrap();
            renderer.render_for(&r.substitutions, &r.recipients[0], "abc", "example.com")
        };
        // Endless work: nested loops of a billion iterations run out of fuel.
        let spin = "Subject: x\n\n{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}";
        let err = render(spin, 1 << 20).unwrap_err();
        assert!(err.contains("fuel"), "{err}");
        // A small template that expands beyond the size limit is refused while it renders.
        let bomb = "Subject: x\n\n{% for a in range(50000) %}{{ plan * 1000 }}{% endfor %}";
        let err = render(bomb, 100_000).unwrap_err();
        assert!(err.contains("exceeds the limit of 100000 bytes"), "{err}");
        assert!(render("Subject: x\n\n{{ plan }}", 100_000).is_ok());
    }

    #[test]
    fn builder_makes_a_mime_message() {
        let r = req(serde_json::json!({
            "from": {"email": "news@example.com", "name": "News"},
            "subject": "Hello {{ name }}",
            "text_body": "Hi {{ name }}, {{ plan }}",
            "html_body": "<p>Hi {{ name }}</p>",
            "headers": {"X-Campaign": "{{ campaign_name }}"},
        }));
        let renderer = Renderer::new(r.content, 1 << 20).unwrap();
        let out = renderer
            .render_for(
                &r.substitutions,
                &r.recipients[0],
                "abc",
                "news.example.com",
            )
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("multipart/alternative"), "{text}");
        assert!(text.contains("X-Campaign: nov"), "{text}");
        assert!(
            text.contains("Message-ID: <abc@news.example.com>"),
            "{text}"
        );
        let head = text.split("\r\n\r\n").next().unwrap();
        assert!(!head.contains("\r\nBcc:"), "{head}");
        assert!(
            !text.replace("\r\n", "").contains('\n'),
            "only CRLF line endings"
        );
    }

    #[test]
    fn crlf_normalisation() {
        assert_eq!(to_crlf(b"a\nb\r\nc\rd"), b"a\r\nb\r\nc\r\nd");
        assert_eq!(to_crlf(b"a\r\nb\r\n"), b"a\r\nb\r\n");
        assert_eq!(to_crlf(b"\nx"), b"\r\nx");
        assert_eq!(to_crlf(b"x\r"), b"x\r\n");
        assert_eq!(to_crlf(b""), b"");
        assert_eq!(to_crlf(b"\r\r\n\n\r"), b"\r\n\r\n\r\n\r\n");
    }

    #[test]
    fn crlf_normalisation_matches_a_byte_by_byte_reference() {
        fn reference(input: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut i = 0;
            while i < input.len() {
                match input[i] {
                    b'\r' => {
                        out.extend_from_slice(b"\r\n");
                        if input.get(i + 1) == Some(&b'\n') {
                            i += 1;
                        }
                    }
                    b'\n' => out.extend_from_slice(b"\r\n"),
                    c => out.push(c),
                }
                i += 1;
            }
            out
        }
        // Every string of up to 7 bytes over {CR, LF, 'a'}.
        for len in 0..=7u32 {
            for n in 0..3usize.pow(len) {
                let input: Vec<u8> = (0..len)
                    .map(|k| [b'\r', b'\n', b'a'][n / 3usize.pow(k) % 3])
                    .collect();
                assert_eq!(to_crlf(&input), reference(&input), "{input:?}");
            }
        }
    }
}
