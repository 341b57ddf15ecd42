//! Drover library: config, engine wiring, HTTP API.
