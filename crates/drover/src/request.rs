//! An inject request (`POST /api/inject/v1`), checked and expanded into messages: the one
//! path every request takes, whether it is expanded before the answer (`api`) or stored and
//! expanded later (`generator`, KumoMTA's `deferred_generation`). Suppression, rendering,
//! stamping, DKIM, the synced spool write and the Reception records are the same for both.

use crate::config::Config;
use crate::engine::{Engine, EngineError, Unsignable};
use crate::message::{prepare, InjectRequest, Origin, Prepared, Recipient, Renderer, Supplemental};
use queue::MessageId;
use serde_json::{Map, Value};
use std::net::IpAddr;
use std::sync::Arc;

/// Why a request is refused as a whole, before anything is stored.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Malformed: a bad field, no recipient (400).
    Invalid(String),
    /// A template that does not compile (422, as KumoMTA answers it).
    Unprocessable(String),
    /// More recipients than `http.max_recipients` (413).
    TooLarge(String),
}

/// A request whose shape, envelope sender, recipient count and templates are good.
pub(crate) struct Checked {
    /// Envelope sender, its domain as A-labels ("" for the null sender).
    pub(crate) sender: String,
    /// The sender's domain, for the Message-ID of messages without one.
    pub(crate) sender_domain: String,
    pub(crate) renderer: Renderer,
    /// As given (their addresses are checked one by one at expansion).
    pub(crate) recipients: Vec<Recipient>,
    pub(crate) substitutions: Map<String, Value>,
    pub(crate) campaign: Option<String>,
    pub(crate) tenant: Option<String>,
    pub(crate) priority: queue::Priority,
    /// Whether the messages get a `Received:` header (KumoMTA's `trace_headers`).
    pub(crate) received_header: bool,
    /// KumoMTA's supplemental trace header, when the messages get one.
    pub(crate) supplemental: Option<Arc<Supplemental>>,
    /// KumoMTA's `deferred_generation: true`: store the request, expand it later.
    pub(crate) deferred: bool,
}

/// Where a request is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// At the door, before the answer: every limit applies.
    Door,
    /// A stored request at its expansion: it was accepted under the limits of its time, and a
    /// lower `http.max_recipients` since must not drop it.
    Stored,
}

/// Parses and checks a request body: everything that fails the request as a whole.
pub(crate) fn check(body: &[u8], config: &Config, stage: Stage) -> Result<Checked, Refusal> {
    let request: InjectRequest = crate::message::parse_request(body)
        .map_err(|e| Refusal::Invalid(format!("invalid request body: {e}")))?;
    let sender = crate::message::ascii_domain(request.envelope_sender.trim())
        .map_err(|e| Refusal::Invalid(format!("envelope_sender: {e}")))?
        .into_owned();
    if !sender.is_empty() {
        smtp_proto::validate_mailbox(&sender)
            .map_err(|e| Refusal::Invalid(format!("envelope_sender: {e}")))?;
    }
    if request.recipients.is_empty() {
        return Err(Refusal::Invalid("recipients: no recipient given".into()));
    }
    let max_recipients = config.http.max_recipients;
    if stage == Stage::Door && request.recipients.len() > max_recipients {
        return Err(Refusal::TooLarge(format!(
            "recipients: {} given, at most {max_recipients} per request (http.max_recipients)",
            request.recipients.len()
        )));
    }
    let sender_domain = sender
        .rsplit_once('@')
        .map(|(_, d)| d.to_owned())
        .unwrap_or_else(|| "drover.invalid".to_owned());
    let InjectRequest {
        content,
        recipients,
        substitutions,
        campaign,
        tenant,
        priority,
        template_dialect,
        trace_headers,
        deferred_generation,
        ..
    } = request;
    let supplemental = trace_headers
        .supplemental()
        .map_err(|e| Refusal::Invalid(format!("trace_headers: {e}")))?
        .map(Arc::new);
    let max_size = usize::try_from(config.smtp_listener.max_message_size).unwrap_or(usize::MAX);
    let renderer = Renderer::with_dialect(content, max_size, template_dialect).map_err(|e| {
        // As KumoMTA: a template that does not compile is 422, a bad field 400.
        if e.syntax {
            Refusal::Unprocessable(format!("content: {e}"))
        } else {
            Refusal::Invalid(format!("content: {e}"))
        }
    })?;
    Ok(Checked {
        sender,
        sender_domain,
        renderer,
        recipients,
        substitutions,
        campaign,
        tenant,
        priority,
        received_header: trace_headers.received_header,
        supplemental,
        deferred: matches!(deferred_generation, Some(Value::Bool(true))),
    })
}

/// What became of the recipients of one expansion.
#[derive(Debug, Default)]
pub(crate) struct Expanded {
    /// The queued messages' ids, in the order of their recipients.
    pub(crate) ids: Vec<String>,
    /// Refused recipients, as given.
    pub(crate) failed_recipients: Vec<String>,
    /// Why, one line each (`"<address>: <reason>"`).
    pub(crate) errors: Vec<String>,
    /// How many of the refused ones are on the suppression list.
    pub(crate) suppressed: usize,
}

impl Expanded {
    /// Whether the recipients were refused for something other than the suppression list
    /// alone, and none was queued: the request had no valid recipient.
    pub(crate) fn none_valid(&self) -> bool {
        self.ids.is_empty() && self.failed_recipients.len() > self.suppressed
    }
}

/// Why an expansion stored nothing (every one passes: the same expansion may succeed later).
#[derive(Debug)]
pub(crate) enum ExpandError {
    /// The suppression list cannot be read: nothing is queued rather than mail sent to an
    /// address that asked for none.
    Suppression(EngineError),
    /// The spool refused (shutting down, full queue, storage error).
    Accept(EngineError),
}

/// A stored request's marker, moved in the same write as the messages of its recipients
/// `previous..next` (see `queue::Spool::insert_generated`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Progress {
    pub(crate) id: MessageId,
    pub(crate) previous: u64,
    pub(crate) next: u64,
}

impl Engine {
    /// Queues one message per recipient of `recipients` (some or all of `request`'s): refuses
    /// the suppressed ones, renders, prepares, stamps, signs, stores (synced) and records the
    /// others. With `progress`, the stored request's marker moves in the same write, also
    /// when no recipient was queued.
    pub(crate) async fn expand(
        self: &Arc<Self>,
        request: &Checked,
        mut recipients: Vec<Recipient>,
        client: Option<IpAddr>,
        progress: Option<Progress>,
    ) -> Result<Expanded, ExpandError> {
        // Domains in Unicode become A-labels first, so the suppression list and the records
        // see the address that goes on the envelope (an invalid one is refused by `prepare`).
        for r in &mut recipients {
            if let Ok(std::borrow::Cow::Owned(ascii)) = crate::message::ascii_domain(r.email.trim())
            {
                r.email = ascii;
            }
        }
        // Suppressed recipients are refused before anything is rendered for them.
        let (recipients, suppressed) = self
            .split_suppressed(request.tenant.as_deref(), recipients, |r| r.email.as_str())
            .await
            .map_err(ExpandError::Suppression)?;
        if !suppressed.is_empty() {
            metrics::counter!(crate::telemetry::SUPPRESSED, "via" => "http")
                .increment(suppressed.len() as u64);
        }
        let mut out = Expanded {
            suppressed: suppressed.len(),
            ..Expanded::default()
        };
        let (suppressed_recipients, suppressed_errors): (Vec<String>, Vec<String>) = suppressed
            .into_iter()
            .map(|(r, entry)| {
                let why = format!("{}: suppressed ({})", r.email, entry.source);
                (r.email, why)
            })
            .unzip();
        if !recipients.is_empty() {
            let origin = Origin {
                sender: request.sender.clone(),
                campaign: request.campaign.clone(),
                tenant: request.tenant.clone(),
                received_ms: crate::clock::now_ms(),
                priority: request.priority,
                // KumoMTA's per-request switch: no Received header at all when asked.
                door: request
                    .received_header
                    .then(|| Arc::new(crate::prepare::Door::Http { client })),
                supplemental: request.supplemental.clone(),
            };
            let max_size = self.config.smtp_listener.max_message_size;
            // Rendering a large batch takes a while: the runtime moves its other tasks off
            // this thread meanwhile. Not a blocking-pool task: the bodies are allocated on a
            // thread that keeps allocating (a worker), so their memory is reused instead of
            // stranded in the heaps of idle pool threads (measured at 100 KB: +20 % CPU and
            // +200 MB RSS that way).
            let Prepared {
                messages,
                failed_recipients,
                errors,
            } = crate::blocking::off_the_runtime(|| {
                prepare(
                    &request.renderer,
                    &request.substitutions,
                    &recipients,
                    &origin,
                    &request.sender_domain,
                    max_size,
                )
            });
            out.failed_recipients = failed_recipients;
            out.errors = errors;
            out.failed_recipients.extend(suppressed_recipients);
            out.errors.extend(suppressed_errors);
            let ids = self.accept_signable(messages, &mut out, progress).await?;
            out.ids = ids;
        } else {
            out.failed_recipients = suppressed_recipients;
            out.errors = suppressed_errors;
        }
        if out.ids.is_empty() {
            if let Some(p) = progress {
                self.spool
                    .insert_generated(Vec::new(), p.id, p.previous, p.next)
                    .await
                    .map_err(|e| ExpandError::Accept(e.into()))?;
            }
        }
        Ok(out)
    }

    /// Accepts `messages`; one that cannot be DKIM-signed fails its recipient only (into
    /// `out`), and the others are accepted (signing outcomes do not change on a second try,
    /// so this loops at most twice). Returns the ids queued.
    async fn accept_signable(
        self: &Arc<Self>,
        mut messages: Vec<crate::message::NewMessage>,
        out: &mut Expanded,
        progress: Option<Progress>,
    ) -> Result<Vec<String>, ExpandError> {
        loop {
            if messages.is_empty() {
                return Ok(Vec::new());
            }
            let ids: Vec<String> = messages.iter().map(|m| m.meta.id.to_string()).collect();
            match self.accept_with_progress(messages, "http", progress).await {
                Ok(()) => return Ok(ids),
                Err(EngineError::Unsignable(unsignable)) => {
                    let Unsignable {
                        failures,
                        messages: batch,
                    } = *unsignable;
                    let mut refused = vec![false; batch.len()];
                    for (i, e) in failures {
                        if let Some(m) = batch.get(i) {
                            refused[i] = true;
                            out.failed_recipients.push(m.meta.recipient.clone());
                            out.errors
                                .push(format!("{}: DKIM signing failed: {e}", m.meta.recipient));
                        }
                    }
                    messages = batch
                        .into_iter()
                        .zip(refused)
                        .filter_map(|(m, refused)| (!refused).then_some(m))
                        .collect();
                }
                Err(e) => return Err(ExpandError::Accept(e)),
            }
        }
    }
}
