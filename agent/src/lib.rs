//! The Edgebind device agent.
//!
//! Layout (after rumqtt's habit): [`core`] decides what to do with each event
//! (a delivered command, a finished action, a connect) without sockets or
//! files, and is unit-tested without a broker; [`runtime`] is the thin tokio
//! shell that does the I/O. [`config`], [`identity`] and [`tls`] run before
//! any connection and refuse to start on a bad bundle.
//!
//! In-process use (e.g. simulating a fleet in one test process):
//! ```no_run
//! # async fn demo(config: edgebind_agent::config::AgentConfig) {
//! use edgebind_agent::runtime::{Agent, RunOptions, shutdown_channel};
//! let agent = Agent::prepare(config, RunOptions::default()).expect("usable identity");
//! let (handle, signal) = shutdown_channel();
//! let task = tokio::spawn(agent.run(signal));
//! // ...
//! handle.shutdown();
//! let exit = task.await.unwrap();
//! # }
//! ```

pub mod actions;
pub mod backoff;
pub mod claim;
pub mod cli;
pub mod config;
pub mod core;
pub mod embed;
pub mod enroll;
pub mod host;
pub mod identity;
pub mod journal;
pub mod logging;
pub mod outbox;
pub mod reconnect;
pub mod renewal;
pub mod runner;
pub mod runtime;
pub mod systemd;
pub mod telemetry;
pub mod test_hooks;
pub mod throttle;
pub mod writer;

#[cfg(test)]
mod fuzz_support;

pub use config::AgentConfig;
pub use runtime::{Agent, Exit, RunOptions, ShutdownHandle, ShutdownSignal, shutdown_channel};
