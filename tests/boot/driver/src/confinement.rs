//! What a declared action may do on the device, checked with the test-only
//! probe (tests/boot/guest/edgebind-probe): it writes where its definition
//! allows and nowhere else its user could write, runs as its own
//! unprivileged user with `NoNewPrivs` and no capability, and its output
//! comes back. Twice: through the real agent (not root on the image, so its
//! fallback sandbox with Landlock, inside its hardened unit), and as a real
//! transient systemd unit made with the exact `systemd-run` line the agent's
//! runner builds (what a root agent uses), started as root.

use std::time::Duration;

use edgebind_agent::runner::{ProgramSpec, RunAs, Sandbox, systemd_run_argv};
use edgebind_protocol::CommandId;
use edgebind_protocol::actions::Action;
use edgebind_protocol::messages::CommandStatus;
use serde_json::json;

use crate::control::Guest;
use crate::fleet::Fleet;
use crate::{ACTION_TIMEOUT, Findings, indent};

/// The probe's program, where tests/boot/assemble-image installs it.
const PROBE: &str = "/usr/local/libexec/edgebind-actions/probe";

pub fn check(guest: &mut Guest, fleet: &Fleet, findings: &mut Findings) -> anyhow::Result<()> {
    through_the_agent(guest, fleet, findings)?;
    as_a_transient_unit(guest, findings)
}

/// The agent's unit may write /var/lib/edgebind and /run/edgebind; the
/// probe's definition declares only /var/lib/edgebind/probe.
fn through_the_agent(
    guest: &mut Guest,
    fleet: &Fleet,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    guest.check("install -d -o edgebind -g edgebind -m 0700 /var/lib/edgebind/probe")?;
    let agent_uid = guest.check("id -u edgebind")?.trim().to_owned();
    let args = json!({
        "allowed": "/var/lib/edgebind/probe",
        "outside": "/var/lib/edgebind",
        "outside2": "/run/edgebind",
    });
    let id = fleet.send_with_args(
        "probe-0001",
        Action::new("probe").map_err(anyhow::Error::msg)?,
        args.as_object().cloned().unwrap_or_default(),
        false,
    )?;
    let r = fleet.wait_final(&id, ACTION_TIMEOUT)?;
    let out = r.output.clone().unwrap_or_default();
    let report = out["stdout"].as_str().unwrap_or_default().to_owned();
    println!(
        "[first] probe through the agent ({}: {}, sandbox {}, landlock {}):\n{}",
        r.status.as_str(),
        r.reason.as_deref().unwrap_or("-"),
        out["sandbox"],
        out["landlock"],
        indent(&report)
    );
    findings.check(
        r.status == CommandStatus::Succeeded && out["sandbox"] == "fallback",
        "the probe ran through the agent in its fallback sandbox and its output came back",
        || format!("{r:?}"),
    );
    findings.check(
        out["landlock"] == true,
        "the agent's fallback sandbox has Landlock on the VM (kernel LSM list and the unit's syscall filter)",
        || format!("{r:?}"),
    );
    check_probe(
        findings,
        "through the agent",
        &report,
        "/var/lib/edgebind/probe",
        &["/var/lib/edgebind", "/run/edgebind"],
        &agent_uid,
    );
    Ok(())
}

/// World-writable directories, so only the sandbox can refuse a write.
fn as_a_transient_unit(guest: &mut Guest, findings: &mut Findings) -> anyhow::Result<()> {
    guest.check("install -d -m 0777 /var/lib/edgebind-probe /var/lib/edgebind-probe-outside")?;
    let spec = ProgramSpec {
        action: "probe".into(),
        argv: [
            PROBE,
            "--allowed=/var/lib/edgebind-probe",
            "--",
            "/var/lib/edgebind-probe-outside",
            "/etc",
        ]
        .map(String::from)
        .to_vec(),
        run_as: RunAs::User("nobody".into()),
        timeout: Duration::from_secs(30),
        output_limit: 8192,
        writable: vec!["/var/lib/edgebind-probe".into()],
        sandbox: Sandbox::SystemdRun,
        require_landlock: false,
    };
    let argv = systemd_run_argv(&spec, &CommandId::new("boot-probe")?, Some("nobody"));
    let line: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
    let unit = guest.run(&line.join(" "))?;
    println!(
        "[first] probe as a transient systemd unit (rc {}):\n{}",
        unit.rc,
        indent(&unit.text)
    );
    findings.check(
        unit.rc == 0,
        "systemd-run started the probe as a transient unit and its output came back",
        || unit.text.clone(),
    );
    check_probe(
        findings,
        "as a transient systemd unit",
        &unit.text,
        "/var/lib/edgebind-probe",
        &["/var/lib/edgebind-probe-outside", "/etc"],
        "65534",
    );
    Ok(())
}

/// The probe's report: the declared directory written, every other refused,
/// its own uid (never root), NoNewPrivs set and no capability at all.
fn check_probe(
    findings: &mut Findings,
    how: &str,
    report: &str,
    allowed: &str,
    outside: &[&str],
    uid: &str,
) {
    let has = |line: String| report.lines().any(|l| l.trim() == line);
    findings.check(
        has(format!("write {allowed}: ok")),
        &format!("{how}, an action writes where its definition allows ({allowed})"),
        || report.to_owned(),
    );
    findings.check(
        outside.iter().all(|d| has(format!("write {d}: denied"))),
        &format!(
            "{how}, an action cannot write outside its allowed paths ({})",
            outside.join(", ")
        ),
        || report.to_owned(),
    );
    findings.check(
        uid != "0"
            && has(format!("uid: {uid}"))
            && has("NoNewPrivs: 1".into())
            && ["CapEff:", "CapPrm:", "CapAmb:"]
                .iter()
                .all(|c| has(format!("{c} 0000000000000000"))),
        &format!(
            "{how}, an action runs as its own user (uid {uid}) and cannot gain privileges (NoNewPrivs, no capabilities)"
        ),
        || report.to_owned(),
    );
}

/// One shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_report_passes_only_when_every_line_is_right() {
        let good = "write /a: ok\nwrite /b: denied\nwrite /c: denied\nuid: 65534\n\
                    NoNewPrivs: 1\nCapEff: 0000000000000000\nCapPrm: 0000000000000000\n\
                    CapAmb: 0000000000000000\n";
        let mut f = Findings::default();
        check_probe(&mut f, "t", good, "/a", &["/b", "/c"], "65534");
        assert!(f.0.is_empty(), "{:?}", f.0);
        for bad in [
            good.replace("write /c: denied", "write /c: ok"),
            good.replace("write /a: ok", "write /a: denied"),
            good.replace("NoNewPrivs: 1", "NoNewPrivs: 0"),
            good.replace("CapEff: 0000000000000000", "CapEff: 0000000000000400"),
            good.replace("uid: 65534", "uid: 0"),
        ] {
            let mut f = Findings::default();
            check_probe(&mut f, "t", &bad, "/a", &["/b", "/c"], "65534");
            assert!(!f.0.is_empty(), "{bad}");
        }
        let mut f = Findings::default();
        check_probe(
            &mut f,
            "t",
            &good.replace("65534", "0"),
            "/a",
            &["/b", "/c"],
            "0",
        );
        assert!(!f.0.is_empty(), "root is never an action's own user");
    }

    #[test]
    fn shell_words_survive_quotes() {
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    }
}
