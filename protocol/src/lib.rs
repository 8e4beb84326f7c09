//! The single source of truth for what crosses the broker.
//!
//! Everything that names a topic, parses a payload or decides who may touch
//! which topic lives here: the agent, the broker-config generator, the fleet
//! service, the CLI and the tests all call these functions instead of writing
//! topic strings of their own. Change the namespace here and every side moves
//! together.

pub mod acl;
pub mod actions;
pub mod bundle;
pub mod ids;
pub mod messages;
pub mod principal;
pub mod provision;
pub mod reconnect;
pub mod renewal;
pub mod settings;
pub mod throttle;
pub mod topics;

pub use ids::{CommandId, DeviceId, IdError, UnitSerial};
pub use principal::Principal;
