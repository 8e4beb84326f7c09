//! Hooks for a program that runs agents inside itself (the fleet simulator,
//! `edgebind sim`): an [`Observer`] hears what each agent's runtime does, and
//! a [`RebootHook`] takes the place of the reboot request so that a simulated
//! device "reboots" without touching the host. The daemon sets neither; both
//! are off in [`RunOptions::default`](crate::RunOptions).

use std::sync::Arc;

use edgebind_protocol::messages::CommandStatus;
use edgebind_protocol::{CommandId, DeviceId};

pub use crate::outbox::Class;

/// What an agent's runtime reports as it goes. Every method has an empty
/// default, and each is called on the agent's async task: keep them cheap
/// (a counter, a channel send).
pub trait Observer: Send + Sync {
    /// The broker accepted the connection (CONNACK).
    fn connected(&self, _device: &DeviceId) {}
    /// A connection attempt failed (`was_connected` false) or an open
    /// connection was lost (`was_connected` true); `error` in words.
    fn lost(&self, _device: &DeviceId, _was_connected: bool, _error: &str) {}
    /// A command result was queued for the broker (the device answered).
    fn result(&self, _device: &DeviceId, _command: &CommandId, _status: CommandStatus) {}
    /// A telemetry sample was taken and queued.
    fn telemetry(&self, _device: &DeviceId) {}
    /// The broker acknowledged (PUBACK) an outbox record of this class.
    fn delivered(&self, _device: &DeviceId, _class: Class) {}
}

/// Called instead of the configured reboot request (`[actions.reboot]`) with
/// the device and the command id. `Ok` means the reboot is under way: as on a
/// device, the command stays `accepted` until an agent of the same state
/// directory starts under another boot id; `Err` is reported as `failed`.
pub type RebootHook = Arc<dyn Fn(&DeviceId, &CommandId) -> Result<(), String> + Send + Sync>;
