//! The audit log: every state change an operator makes through the CLI or
//! the console, with who, what and when. Callers record after the change
//! completed (the change itself is its own transaction; a change whose
//! audit line could not be written is reported by the caller).

use edgebind_protocol::messages::now_unix;

use super::{FleetHome, OpsError};
use crate::registry::{AuditEntry, Store};

/// Append `action` on `target` by `actor` to the audit log, stamped now.
pub fn record(
    store: &mut dyn Store,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<i64, OpsError> {
    Ok(store.record_audit(&AuditEntry {
        seq: 0,
        at: now_unix(),
        actor: actor.to_owned(),
        action: action.to_owned(),
        target: target.to_owned(),
        detail: detail.to_owned(),
    })?)
}

/// Who a CLI command acts as: the CN of the home's operator identity, else
/// `cli:$USER`.
pub fn cli_actor(home: &FleetHome) -> String {
    super::identity::identity_cn(&home.operator_dir()).unwrap_or_else(|| {
        format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        )
    })
}
