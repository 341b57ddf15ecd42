//! SMTP client sessions, pooled per destination
