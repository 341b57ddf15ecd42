//! Metric names; every series carries the label `webhook` (the configured label).

pub(crate) const RECORDS: &str = "drover_webhook_records_total";
pub(crate) const REQUESTS: &str = "drover_webhook_requests_total";
pub(crate) const UNPARSABLE: &str = "drover_webhook_unparsable_records_total";
pub(crate) const LAG_RECORDS: &str = "drover_webhook_lag_records";
pub(crate) const LAG_BYTES: &str = "drover_webhook_lag_bytes";
pub(crate) const LAG_SECONDS: &str = "drover_webhook_lag_seconds";
pub(crate) const DURATION: &str = "drover_webhook_request_duration_seconds";

/// The `result` label of [`REQUESTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A 2xx.
    Ok,
    /// Any other status.
    HttpError,
    /// No complete answer within `timeout`.
    Timeout,
    /// The connection could not be made, or broke before the answer.
    ConnectError,
}

impl Outcome {
    pub(crate) const ALL: [Outcome; 4] = [
        Outcome::Ok,
        Outcome::HttpError,
        Outcome::Timeout,
        Outcome::ConnectError,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::HttpError => "http_error",
            Outcome::Timeout => "timeout",
            Outcome::ConnectError => "connect_error",
        }
    }
}

/// Registers the descriptions of the webhook metrics.
pub fn describe_metrics() {
    metrics::describe_counter!(
        RECORDS,
        "Records acknowledged (2xx) by the webhook endpoint."
    );
    metrics::describe_counter!(
        REQUESTS,
        "Webhook requests by result: ok, http_error (non-2xx), timeout, connect_error."
    );
    metrics::describe_counter!(
        UNPARSABLE,
        "Accounting lines skipped because they were not records (no type or timestamp)."
    );
    metrics::describe_gauge!(
        LAG_RECORDS,
        "Records not yet acknowledged: held for sending plus the log after them."
    );
    metrics::describe_gauge!(
        LAG_BYTES,
        metrics::Unit::Bytes,
        "Bytes of records not yet acknowledged: held for sending plus the log after them."
    );
    metrics::describe_gauge!(
        LAG_SECONDS,
        metrics::Unit::Seconds,
        "Age of the oldest record read but not yet acknowledged (0 when caught up)."
    );
    metrics::describe_histogram!(
        DURATION,
        metrics::Unit::Seconds,
        "Duration of one webhook request, whatever its result."
    );
}

/// The series of one webhook, looked up once (a lookup hashes the labels).
#[derive(Clone)]
pub(crate) struct Meters {
    pub(crate) records: metrics::Counter,
    pub(crate) unparsable: metrics::Counter,
    requests: [metrics::Counter; 4],
    pub(crate) lag_records: metrics::Gauge,
    pub(crate) lag_bytes: metrics::Gauge,
    pub(crate) lag_seconds: metrics::Gauge,
    pub(crate) duration: metrics::Histogram,
}

impl Meters {
    /// Registers the series of webhook `name`, so they read 0 from the first scrape.
    pub(crate) fn new(name: &str) -> Meters {
        let n = || name.to_string();
        let meters = Meters {
            records: metrics::counter!(RECORDS, "webhook" => n()),
            unparsable: metrics::counter!(UNPARSABLE, "webhook" => n()),
            requests: Outcome::ALL.map(|outcome| {
                metrics::counter!(REQUESTS, "webhook" => n(), "result" => outcome.as_str())
            }),
            lag_records: metrics::gauge!(LAG_RECORDS, "webhook" => n()),
            lag_bytes: metrics::gauge!(LAG_BYTES, "webhook" => n()),
            lag_seconds: metrics::gauge!(LAG_SECONDS, "webhook" => n()),
            duration: metrics::histogram!(DURATION, "webhook" => n()),
        };
        meters.records.increment(0);
        meters.unparsable.increment(0);
        for counter in &meters.requests {
            counter.increment(0);
        }
        meters.lag_records.set(0.0);
        meters.lag_bytes.set(0.0);
        meters.lag_seconds.set(0.0);
        meters
    }

    pub(crate) fn request(&self, outcome: Outcome) -> &metrics::Counter {
        // ALL lists the outcomes in declaration order.
        &self.requests[outcome as usize]
    }
}
