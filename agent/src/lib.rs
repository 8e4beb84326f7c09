//! The Edgebind device agent.
//!
//! Layout (after rumqtt's habit): [`core`] decides what to do with each event
//! without touching sockets or files; the runtime module does the I/O.

pub mod config;
pub mod core;
pub mod identity;
pub mod journal;
pub mod tls;
