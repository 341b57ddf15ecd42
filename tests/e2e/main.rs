//! End-to-end tests: the real engine, a real SMTP sink, a real RocksDB spool, on loopback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

mod admin;
mod bounds;
mod cluster;
mod crash;
mod deferred;
mod delivery;
mod dkim;
mod dns;
mod drain;
mod fairness;
mod feedback;
mod fulldisk;
mod harness;
mod hostile;
mod inject;
mod kumomta;
mod listener;
mod metrics;
mod openapi;
mod postfix;
mod process;
mod readiness;
mod reports;
mod shaping;
mod status_page;
mod suppression;
mod webhooks;
