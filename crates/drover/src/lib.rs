//! Drover: the engine's wiring: configuration, the delivery engine, the HTTP API, the SMTP
//! injection listener and the command line. The protocol, spool, resolver, pool and shaping
//! logic live in their own crates.

pub mod api;
pub mod automation;
pub mod config;
mod delivery;
pub mod egress;
pub mod engine;
mod finals;
pub mod listener;
pub mod message;
pub mod serve;

pub use config::Config;
pub use engine::Engine;
