//! Logging: journald when systemd runs the agent, readable stderr otherwise.
//! The level comes from the configuration, may be changed at run time by the
//! fleet (`desired` → `log_level`), and `EDGEBIND_LOG` (a filter such as
//! `debug` or `warn,edgebind_agent=trace`) overrides both.
//!
//! Nothing logs key material: the identity module never formats key bytes.

use std::io::IsTerminal;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Registry, reload};

use crate::config::LogLevel;

pub const LOG_ENV: &str = "EDGEBIND_LOG";

/// Changes the level of the installed subscriber.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<Targets, Registry>,
    pinned_by_env: bool,
}

impl LogControl {
    pub fn set_level(&self, level: LogLevel) {
        if self.pinned_by_env {
            return;
        }
        let _ = self.handle.reload(targets_for(level));
    }
}

/// Our crate at `level`; libraries (rumqttc, rustls) never below warn
/// unless asked through `EDGEBIND_LOG`, they are chatty.
fn targets_for(level: LogLevel) -> Targets {
    format!("warn,edgebind_agent={level}")
        .parse()
        .unwrap_or_default()
}

/// Install the global subscriber. Returns how the output is routed for the
/// first log line.
pub fn init(level: LogLevel, journald: bool) -> (LogControl, &'static str) {
    let env = std::env::var(LOG_ENV)
        .ok()
        .and_then(|s| s.parse::<Targets>().ok());
    let pinned_by_env = env.is_some();
    let (filter, handle) = reload::Layer::new(env.unwrap_or_else(|| targets_for(level)));
    let journal = journald.then(tracing_journald::layer).and_then(Result::ok);
    let route = if journal.is_some() {
        "journald"
    } else {
        "stderr"
    };
    let stderr = journal.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journal)
        .with(stderr)
        .try_init();
    (
        LogControl {
            handle,
            pinned_by_env,
        },
        route,
    )
}
