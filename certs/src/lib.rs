//! PKI (filled in by the PKI work).
