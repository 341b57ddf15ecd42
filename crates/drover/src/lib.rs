//! Drover: the engine's wiring: configuration, the delivery engine, the HTTP API, the SMTP
//! injection listener and the command line. The protocol, spool, resolver, pool and shaping
//! logic live in their own crates.

// Doors: where messages come in.
pub mod api;
mod api_state;
mod blocking;
mod drain_api;
mod http_guard;
pub mod listener;
pub mod openapi;
pub mod unsubscribe_http;
// Prepare: one RFC 5322 message per recipient.
pub mod message;
// The engine's state, and its work by concern, in the order a message meets them.
mod admin;
mod cluster;
mod dispatch;
pub mod drain;
pub mod engine;
mod error;
mod finalizer;
mod generator;
pub mod inbound;
mod inject;
mod kumo_admin;
mod log_keeper;
mod outcome;
pub mod prepare;
mod record;
mod request;
mod restore;
mod stamping;
mod startup;
mod suppression;
mod templates;
mod webhooks;
mod worker;
// Leaves the above share.
mod activity;
pub mod allocator;
pub mod automation;
pub mod clock;
pub mod config;
mod crew;
pub mod egress;
mod observe;
mod outbound;
mod policy;
pub mod serve;
mod site_metrics;
mod status_page;
mod telemetry;
mod top_sites;

pub use config::Config;
pub use engine::Engine;

pub use engine::Unsignable;
pub use message::{NewMessage, Origin};
