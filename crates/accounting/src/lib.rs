//! Accounting records (JSON Lines), bounce classification
