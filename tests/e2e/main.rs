//! End-to-end tests: real engine, real sink, real RocksDB, on loopback.
