//! Per-destination rates and connection caps on governor
