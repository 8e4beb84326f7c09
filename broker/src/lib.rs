//! Broker config (filled in by the broker work).
