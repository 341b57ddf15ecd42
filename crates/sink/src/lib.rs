//! A programmable SMTP sink for tests, benchmarks and operators
