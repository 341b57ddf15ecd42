//! The durable RocksDB spool and the in-memory schedule
