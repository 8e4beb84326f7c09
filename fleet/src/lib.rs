//! Edgebind fleet side: the device registry and the fleet service that keeps
//! it in step with the broker.

pub mod ingest;
pub mod mqtt;
pub mod operator;
pub mod registry;
pub mod service;
