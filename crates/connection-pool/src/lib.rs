//! SMTP client sessions and the per-destination pools that keep them open for reuse.
//!
//! The client is a thin async loop around `smtp-proto`: it owns one read buffer for the life of
//! the connection, hands bytes to the sans-IO reply parser, and writes what the command encoder
//! and dot-stuffer produce. With PIPELINING the whole envelope (`MAIL`, `RCPT`, `DATA`) goes out
//! in one write and the replies are matched to the commands in order (RFC 2920).
//!
//! STARTTLS (RFC 3207) follows a per-destination [`TlsMode`]. The upgrade consumes the
//! plaintext session and returns it over TLS with the same read buffer, which must be empty at
//! that point: anything the server sent after its `220` would otherwise be taken as protected.
//! rustls runs on the ring provider, chosen per configuration rather than process-wide.

mod client;
mod pool;
mod tls;

pub use client::{
    ClientError, ConnectOptions, Envelope, PeerInfo, SmtpClient, Timeouts, TransactionResult,
};
pub use pool::{Pool, Pooled};
pub use tls::{TlsFailureMemory, TlsInfo, TlsMode};

pub(crate) const CONNECTIONS_GAUGE: &str = "drover_smtp_connections";

/// Registers the descriptions of the metrics this crate records.
pub fn describe_metrics() {
    metrics::describe_gauge!(CONNECTIONS_GAUGE, "Open outbound SMTP sessions.");
    metrics::gauge!(CONNECTIONS_GAUGE).increment(0.0);
}
