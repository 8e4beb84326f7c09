//! Test harness (filled in by the broker/PKI work).
