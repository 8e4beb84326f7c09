//! Pause points for the crash tests of renewal (`tests/tests/renewal_crash.rs`):
//! a test stops the agent at one named step, then kills it with SIGKILL
//! there (a power cut at that instant) or lets it go on.
//!
//! Guard: the points do anything only in a build with the cargo feature
//! `test-hooks`, which no default build, no release profile and no image
//! recipe turns on; only the binary `edgebind-agent-test-hooks` (which
//! requires the feature) is built with it, and it is a different file from
//! `edgebind-agent`. Even there a point is inert unless
//! `EDGEBIND_AGENT_TEST_PAUSE_AT` names it.
//!
//! With `EDGEBIND_AGENT_TEST_PAUSE_AT=STEP` and
//! `EDGEBIND_AGENT_TEST_PAUSE_FILE=PATH`, the first time the agent reaches
//! STEP it writes STEP into PATH and blocks (the whole agent: no keep-alive,
//! no I/O) until the file is removed. Each step pauses once per process.

/// Step names, in the order a renewal reaches them.
pub mod step {
    /// The renewal key was made and written to the enrollment directory,
    /// the request not yet sent.
    pub const KEY_WRITTEN: &str = "renewal-key-written";
    /// The renewed certificate arrived, verified and written as the trial.
    pub const CERT_RECEIVED: &str = "renewal-cert-received";
    /// The broker accepted the trial connection; nothing installed yet.
    pub const TRIAL_CONNECTED: &str = "renewal-trial-connected";
    /// The chain is accepted in the enrollment; the old pair is still in
    /// place (about to be replaced).
    pub const BEFORE_REPLACE: &str = "install-before-replace";
    /// The new key is written over the old one, the certificate not yet.
    pub const BETWEEN_RENAMES: &str = "install-between-renames";
}

/// Reached `step`: pause here if the test asked for it.
#[cfg(feature = "test-hooks")]
pub fn pause_point(step: &str) {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static DONE: Mutex<Option<HashSet<String>>> = Mutex::new(None);

    if std::env::var("EDGEBIND_AGENT_TEST_PAUSE_AT")
        .ok()
        .as_deref()
        != Some(step)
    {
        return;
    }
    let Some(file) = std::env::var_os("EDGEBIND_AGENT_TEST_PAUSE_FILE") else {
        return;
    };
    {
        let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
        if !done
            .get_or_insert_with(HashSet::new)
            .insert(step.to_owned())
        {
            return;
        }
    }
    let file = std::path::PathBuf::from(file);
    tracing::warn!(%step, file = %file.display(), "test hook: paused");
    if std::fs::write(&file, step).is_err() {
        return;
    }
    while file.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    tracing::warn!(%step, "test hook: released");
}

/// Reached `step` (no test hooks in this build).
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn pause_point(_step: &str) {}
