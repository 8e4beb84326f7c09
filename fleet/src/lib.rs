//! Edgebind fleet side: the device registry, the fleet service that keeps it
//! in step with the broker, and the operator's use cases.
//!
//! - [`registry`]: the single source of truth per device (board, tags,
//!   certificate, lifecycle, presence, desired vs reported settings,
//!   inventory, telemetry with a bounded history, command log, on-connect
//!   rules) behind the [`registry::Store`] trait. The domain rules are plain
//!   functions ([`registry::rules`]); the operations are written once over a
//!   store-and-load [`registry::storage::Storage`] trait with two backends:
//!   SQLite (one file, `<home>/registry.db` by default, WAL, versioned
//!   migrations) and PostgreSQL (`postgres://…`, a connection pool,
//!   versioned migrations), chosen by a registry URL in
//!   [`registry::open_store`]. Every call is one transaction, so a bad input
//!   changes nothing; one conformance suite runs on both backends.
//! - [`ingest`]: broker message -> [`registry::Update`], pure and tested
//!   without a broker.
//! - [`service`]: `edgebind fleet serve`. Subscribes (QoS 1, persistent
//!   session, identity `service:fleet`) to every device's status, telemetry,
//!   events, reported settings, command results and commands; writes them in
//!   batched transactions; acknowledges each message only after its
//!   transaction committed; publishes retained desired settings; delivers
//!   queued commands, on-connect rules and an inventory request when a device
//!   connects.
//! - [`operator`]: publish commands and wait for their results (`edgebind send`).
//! - [`ops`]: the operator's use cases over a [`ops::FleetHome`] (register a
//!   device, renew, revoke, refresh the broker policy, find the broker,
//!   send, set desired settings), each completing or leaving nothing
//!   half-done; the CLI only parses and renders, and the fleet service or a
//!   web console call the same functions.
//! - [`mqtt`]: mTLS connection options (rustls with ring).
//!
//! # Delivery guarantees and what the broker must be configured for
//!
//! Acknowledge-after-commit means a crash never loses a message the service
//! acknowledged; a message may be written twice after a crash (at least
//! once). Two Mosquitto limits matter for "no loss" at fleet scale:
//! `max_inflight_messages` (default 20) bounds how many unacknowledged
//! messages the broker sends the service at once, and once more than
//! `max_queued_messages` (default 1000) wait behind them (the service is
//! down, or a transaction is slow), Mosquitto drops further QoS 1 messages
//! for the service although it acknowledged them to the device. The ingest
//! benchmark (`bench_ingest`) shows this at 12,000 msg/s with the default
//! and no loss with `max_queued_messages 100000`. The generated limits now
//! follow from a burst budget (`edgebind_broker::budget`), and the service
//! throttles the fleet before they are reached ([`service::push_back`]).
//!
//! # Another database
//!
//! A third backend implements [`registry::storage::Storage`] (transactions
//! that store and load; no decisions), is added to [`registry::RegistryUrl`]
//! and [`registry::open_store`], and runs `conformance_tests!` in
//! `tests/tests/registry_conformance.rs`. The service and the CLI only use
//! the [`registry::Store`] trait, through that function.

pub mod ingest;
pub mod mqtt;
pub mod operator;
pub mod ops;
pub mod registry;
pub mod service;
