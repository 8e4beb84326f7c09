//! Console login codes: `edgebind console login --operator NAME` issues a
//! single-use code for a named operator principal; the console exchanges it
//! for a session. Only someone who can read the fleet home (its PKI and
//! registry) can issue one, which is who may operate the fleet anyway.
//!
//! The registry keeps the SHA-256 of each code, never the code, with an
//! expiry; exchanging a code marks it used in the same transaction.

use edgebind_protocol::messages::now_unix;
use edgebind_protocol::{DeviceId, Principal};
use serde::Serialize;

use super::{FleetHome, OpsError};
use crate::registry::{LoginCode, Store};

/// How long a login code is valid by default.
pub const LOGIN_CODE_TTL_S: u64 = 10 * 60;

/// A code just issued: `code` is shown once and stored only hashed.
#[derive(Debug, Clone, Serialize)]
pub struct LoginCodeIssued {
    pub operator: String,
    pub code: String,
    pub expires_at: u64,
}

/// SHA-256 (hex) of a login code, as the registry stores it.
pub fn login_code_hash(code: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, code.trim().as_bytes());
    hex(digest.as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fails unless `operator:NAME` holds a usable (unexpired, unrevoked)
/// certificate in the fleet PKI: the console's operators are the fleet's.
fn check_operator(home: &FleetHome, name: &str) -> Result<DeviceId, OpsError> {
    let id = DeviceId::new(name)?;
    let principal = Principal::Operator(id.clone());
    let pki = home.open_pki()?;
    let active = pki
        .inventory()?
        .active_principals(time::OffsetDateTime::now_utc());
    if !active.contains(&principal) {
        return Err(OpsError::Identity(format!(
            "{principal} is not an operator of this fleet (no usable certificate in {}; \
             issue one with `edgebind pki issue operator {name}`)",
            pki.dir().display()
        )));
    }
    Ok(id)
}

/// Issue a single-use login code for operator `name`, valid `ttl_s` seconds.
pub fn issue_login_code(
    home: &FleetHome,
    store: &mut dyn Store,
    name: &str,
    ttl_s: u64,
) -> Result<LoginCodeIssued, OpsError> {
    let id = check_operator(home, name)?;
    let code = hex(&rand::random::<[u8; 20]>());
    let now = now_unix();
    let row = LoginCode {
        hash: login_code_hash(&code),
        operator: id.to_string(),
        created_at: now,
        expires_at: now + ttl_s.max(1),
        used_at: None,
    };
    store.add_login_code(&row)?;
    Ok(LoginCodeIssued {
        operator: row.operator,
        code,
        expires_at: row.expires_at,
    })
}

/// Exchange a login code: the operator it was issued to, if the code is
/// known, unused and unexpired and the operator is still one (an operator
/// revoked since the code was issued is refused). The code is used up.
pub fn redeem_login_code(
    home: &FleetHome,
    store: &mut dyn Store,
    code: &str,
) -> Result<DeviceId, OpsError> {
    let operator = store.redeem_login_code(&login_code_hash(code), now_unix())?;
    check_operator(home, &operator)
}
