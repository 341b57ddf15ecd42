//! MX resolution (RFC 5321 section 5.1) on hickory-resolver, cached
