//! `reboot`: restart the device as configured (`[actions.reboot]`).
//! Accepted with the boot id; succeeded once the agent starts in another boot.

use std::io::Write;
use std::time::Duration;

use edgebind_protocol::CommandId;
use edgebind_protocol::actions::{ActionSpec, Origin, REBOOT};
use edgebind_protocol::messages::now_unix;
use serde_json::{Map, Value};

use super::{Builtin, Facts, Job, Plan};
use crate::config::{RebootConfig, RebootMethod};

#[derive(Debug)]
pub struct Reboot(pub RebootConfig);

impl Builtin for Reboot {
    fn spec(&self) -> ActionSpec {
        ActionSpec {
            name: REBOOT,
            origin: Origin::Builtin,
            description: Some("restart the device".into()),
            args: Default::default(),
            // Never again for the same id: the journal keeps the boot id.
            idempotent: false,
            timeout_s: REBOOT_COMMAND_TIMEOUT.as_secs(),
            result: Some("{previous_boot_id, boot_id} once the device is back".into()),
        }
    }

    fn plan(&self, _: &Facts, _: &Map<String, Value>) -> Result<Plan, String> {
        Ok(Plan::RunUntilReboot(Job::Reboot(self.0.clone())))
    }
}

/// How long a `command` reboot method may run before it counts as failed.
pub const REBOOT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Request the reboot; `Err` carries the reason reported as `failed`.
pub async fn request(cfg: &RebootConfig, id: &CommandId) -> Result<(), String> {
    match cfg.method {
        RebootMethod::RequestFile => request_file(cfg, id),
        RebootMethod::Command => run_command(&cfg.command).await,
    }
}

/// Create the request file (durably) that the layer's root-owned path unit
/// turns into `systemctl reboot`; the agent needs no privilege for it.
fn request_file(cfg: &RebootConfig, id: &CommandId) -> Result<(), String> {
    let path = &cfg.path;
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::File::create(path)?;
        writeln!(f, "command={id} ts={}", now_unix())?;
        f.sync_all()
    };
    write().map_err(|e| format!("cannot create reboot request file {}: {e}", path.display()))
}

async fn run_command(argv: &[String]) -> Result<(), String> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| "actions.reboot.command is empty".to_owned())?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start reboot command {program:?}: {e}"))?;
    let out = tokio::time::timeout(REBOOT_COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            format!("reboot command {program:?} did not finish within {REBOOT_COMMAND_TIMEOUT:?}")
        })?
        .map_err(|e| format!("reboot command {program:?}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .trim()
        .chars()
        .rev()
        .take(200)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(format!(
        "reboot command {program:?} failed ({}): {tail}",
        out.status
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> CommandId {
        CommandId::new("r1").unwrap()
    }

    #[test]
    fn a_reboot_waits_for_the_next_boot_and_is_not_idempotent() {
        let r = Reboot(RebootConfig::default());
        assert!(!r.spec().idempotent);
        let plan = r.plan(&super::super::tests::facts(), &Map::new()).unwrap();
        assert!(matches!(plan, Plan::RunUntilReboot(Job::Reboot(_))));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn request_file_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RebootConfig {
            method: RebootMethod::RequestFile,
            path: dir.path().join("sub/reboot-request"),
            command: vec![],
        };
        request(&cfg, &id()).await.unwrap();
        let body = std::fs::read_to_string(&cfg.path).unwrap();
        assert!(body.contains("command=r1"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn command_failure_carries_its_stderr() {
        let cfg = RebootConfig {
            method: RebootMethod::Command,
            path: "/unused".into(),
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo nope >&2; exit 3".into(),
            ],
        };
        let err = request(&cfg, &id()).await.unwrap_err();
        assert!(err.contains("nope"), "{err}");
        let ok = RebootConfig {
            command: vec!["/bin/true".into()],
            ..cfg
        };
        request(&ok, &id()).await.unwrap();
    }
}
