//! Actions the image declares (`actions.d/NAME.toml`), through the real
//! broker and the real agent binary: they run with their declared arguments
//! and their output comes back, the time limit kills them, arguments outside
//! the schema and undeclared actions are rejected, the fallback sandbox holds
//! (as far as a test on one machine can show), a non-idempotent action runs
//! once even when the agent is killed mid-run, and the inventory lists them.

#[path = "../src/agent_support.rs"]
mod agent_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_support::{AGENT_DEADLINE, AgentBundle, AgentProcess, AgentSetup, Operator};
use edgebind_protocol::messages::{CommandStatus, Inventory, Presence};
use edgebind_tests::{TestFleet, wait_for};

/// A directory everyone may read and enter (programs run as `nobody` when
/// the agent is root), holding the test programs.
struct Programs {
    dir: tempfile::TempDir,
}

impl Programs {
    fn new() -> Programs {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Programs { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A shell script (run as a program: the agent itself uses no shell).
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// A directory anyone may write to (so that only the sandbox stops a write).
    fn open_dir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        p
    }
}

fn me() -> String {
    // SAFETY: getpwuid of our own uid; the name is copied at once.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        std::ffi::CStr::from_ptr((*pw).pw_name)
            .to_string_lossy()
            .into_owned()
    }
}

fn define(bundle: &AgentBundle, name: &str, toml: &str) {
    std::fs::create_dir_all(&bundle.actions_dir).unwrap();
    std::fs::write(bundle.actions_dir.join(format!("{name}.toml")), toml).unwrap();
}

fn start(bundle: &AgentBundle, op: &Operator) -> AgentProcess {
    let agent = AgentProcess::spawn(&bundle.config);
    op.wait_status(|s, _| s.state == Presence::Online)
        .unwrap_or_else(|| panic!("agent not online; stderr:\n{}", agent.stderr()));
    agent
}

fn count_lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn a_declared_action_runs_with_its_arguments_and_is_listed_while_bad_ones_are_refused() {
    let fleet = TestFleet::start();
    let progs = Programs::new();
    let work = progs.open_dir("work");
    let prog = progs.script(
        "selftest",
        &format!(
            "for a in \"$@\"; do echo \"arg:$a\"; done\necho warn >&2\necho ran >> {}/count",
            work.display()
        ),
    );
    let bundle = AgentBundle::new(
        &fleet.pki,
        &fleet.broker,
        "dev-decl",
        &AgentSetup::default(),
    );
    define(
        &bundle,
        "selftest",
        &format!(
            r#"description = "Check the sensors"
program = "{prog}"
user = "{me}"
timeout_s = 10
writable_paths = ["{work}"]
positional = ["target"]

[args.level]
type = "string"
allowed = ["quick", "full"]
required = true

[args.count]
type = "integer"
min = 1
max = 5

[args.target]
type = "string"
"#,
            prog = prog.display(),
            me = me(),
            work = work.display(),
        ),
    );
    // A broken file and one naming a program that is not there: skipped,
    // never fatal.
    define(&bundle, "broken", "program = [");
    define(&bundle, "ghost", "program = \"/nonexistent/ghost\"\n");
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let agent = start(&bundle, &op);

    op.send(
        "s1",
        "selftest",
        r#","args":{"level":"full","count":3,"target":"a b; rm -rf /"}"#,
    );
    let done = op
        .wait_final("s1")
        .unwrap_or_else(|| panic!("no result; stderr:\n{}", agent.stderr()));
    assert_eq!(done.status, CommandStatus::Succeeded, "{done:?}");
    let out = done.output.unwrap();
    assert_eq!(
        out["stdout"], "arg:--count=3\narg:--level=full\narg:--\narg:a b; rm -rf /\n",
        "only declared arguments, each one word, no shell"
    );
    assert_eq!(out["stderr"], "warn\n");
    assert_eq!(out["exit_code"], 0);
    assert_eq!(out["sandbox"], "fallback");
    assert_eq!(
        op.results("s1").first().map(|r| r.status),
        Some(CommandStatus::Accepted)
    );

    // Outside the schema, or not declared at all: rejected, nothing runs.
    for (id, extra, needle) in [
        (
            "b1",
            r#","args":{"level":"slow"}"#,
            "not one of: quick, full",
        ),
        (
            "b2",
            r#","args":{"level":"quick","count":9}"#,
            "outside 1..=5",
        ),
        (
            "b3",
            r#","args":{"level":"quick","shell":"x"}"#,
            "\"shell\" is not declared",
        ),
        ("b4", r#","args":{"count":1}"#, "\"level\" is required"),
    ] {
        op.send(id, "selftest", extra);
        let r = op.wait_final(id).expect("answered");
        assert_eq!(r.status, CommandStatus::Rejected, "{id}");
        assert!(r.reason.as_deref().unwrap().contains(needle), "{id}: {r:?}");
    }
    for (id, action) in [("u1", "ghost"), ("u2", "broken"), ("u3", "format-disk")] {
        op.send(id, action, "");
        let r = op.wait_final(id).expect("answered");
        assert_eq!(r.status, CommandStatus::Rejected, "{action}");
        assert!(
            r.reason.as_deref().unwrap().contains("unknown action"),
            "{r:?}"
        );
    }
    assert_eq!(
        count_lines(&work.join("count")),
        1,
        "ran once, only when valid"
    );

    // The inventory lists built-ins and the declared action with its schema.
    op.send("i1", "inventory", "");
    let inv = op
        .wait_result("i1", CommandStatus::Succeeded)
        .expect("inventory");
    assert!(inv.facts);
    let inv: Inventory = serde_json::from_value(inv.output.unwrap()).unwrap();
    let names: Vec<&str> = inv.actions.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "inventory",
            "ping",
            "reboot",
            "renew",
            "restart-agent",
            "selftest"
        ]
    );
    let selftest = inv
        .actions
        .iter()
        .find(|a| a.name.as_str() == "selftest")
        .unwrap();
    assert!(!selftest.idempotent);
    assert_eq!(selftest.timeout_s, 10);
    assert_eq!(selftest.args.len(), 3);
    assert!(agent.stderr().contains("skipping action definition"));
}

#[test]
fn the_time_limit_kills_the_action_with_its_children_and_reports_timed_out() {
    let fleet = TestFleet::start();
    let progs = Programs::new();
    let work = progs.open_dir("work");
    let late = work.join("late");
    let prog = progs.script(
        "hang",
        &format!(
            "echo started\n(sleep 3; echo late > {late}) &\nsleep 30",
            late = late.display()
        ),
    );
    let bundle = AgentBundle::new(
        &fleet.pki,
        &fleet.broker,
        "dev-hang",
        &AgentSetup::default(),
    );
    define(
        &bundle,
        "hang",
        &format!(
            "program = \"{}\"\ntimeout_s = 1\nidempotent = true\nwritable_paths = [\"{}\"]\n",
            prog.display(),
            work.display()
        ),
    );
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let _agent = start(&bundle, &op);
    let t0 = std::time::Instant::now();
    op.send("h1", "hang", "");
    let r = op.wait_final("h1").expect("a final result");
    assert_eq!(r.status, CommandStatus::TimedOut, "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(r.reason.unwrap().contains("timed out after 1 s"));
    assert_eq!(r.output.unwrap()["stdout"], "started\n");
    // The background child went with the process group.
    std::thread::sleep(Duration::from_secs(4));
    assert!(!late.exists(), "a child outlived the time limit");
}

#[test]
fn the_fallback_sandbox_drops_to_the_user_sets_no_new_privs_and_confines_writes() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: dropping to another user needs a root test runner");
        return;
    }
    let fleet = TestFleet::start();
    let progs = Programs::new();
    let allowed = progs.open_dir("allowed");
    let forbidden = progs.open_dir("forbidden");
    // A set-uid-root copy of `id`: without no_new_privs it would say euid 0.
    let suid_id = progs.path("suid-id");
    std::fs::copy("/usr/bin/id", &suid_id).unwrap();
    std::fs::set_permissions(&suid_id, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let prog = progs.script(
        "probe",
        &format!(
            "echo uid=$(id -u)\n\
             echo suid=$({suid} -u)\n\
             grep NoNewPrivs /proc/self/status\n\
             echo a > {allowed}/f && echo allowed-ok\n\
             echo b > {forbidden}/f 2>/dev/null && echo forbidden-written\n\
             echo c > /tmp/edgebind-sandbox-probe-$$ 2>/dev/null && echo tmp-written\n\
             true",
            suid = suid_id.display(),
            allowed = allowed.display(),
            forbidden = forbidden.display(),
        ),
    );
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-box", &AgentSetup::default());
    // No `user`: a root agent runs it as nobody.
    define(
        &bundle,
        "probe",
        &format!(
            "program = \"{}\"\nwritable_paths = [\"{}\"]\n",
            prog.display(),
            allowed.display()
        ),
    );
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let _agent = start(&bundle, &op);
    op.send("x1", "probe", "");
    let r = op.wait_final("x1").expect("a final result");
    assert_eq!(r.status, CommandStatus::Succeeded, "{r:?}");
    let out = r.output.unwrap();
    let stdout = out["stdout"].as_str().unwrap();
    assert!(stdout.contains("uid=65534"), "runs as nobody: {stdout}");
    assert!(
        stdout.contains("suid=65534"),
        "set-uid gains nothing: {stdout}"
    );
    assert!(stdout.contains("NoNewPrivs:\t1"), "{stdout}");
    assert!(stdout.contains("allowed-ok"), "{stdout}");
    if out["landlock"] == true {
        assert!(!stdout.contains("forbidden-written"), "{stdout}");
        assert!(!stdout.contains("tmp-written"), "{stdout}");
        assert!(!forbidden.join("f").exists());
    } else {
        eprintln!(
            "this kernel has no Landlock: writes are limited by permissions only, not checked"
        );
    }
}

#[test]
fn a_non_idempotent_action_runs_once_when_the_agent_is_killed_mid_run_and_the_command_comes_again()
{
    let fleet = TestFleet::start();
    let progs = Programs::new();
    let work = progs.open_dir("work");
    let count = work.join("count");
    let pid = work.join("pid");
    let prog = progs.script(
        "flash",
        &format!(
            "echo run >> {count}\necho $$ > {pid}\nsleep 30",
            count = count.display(),
            pid = pid.display()
        ),
    );
    let bundle = AgentBundle::new(
        &fleet.pki,
        &fleet.broker,
        "dev-flash",
        &AgentSetup::default(),
    );
    define(
        &bundle,
        "flash",
        &format!(
            "program = \"{}\"\nuser = \"{}\"\ntimeout_s = 60\nwritable_paths = [\"{}\"]\n",
            prog.display(),
            me(),
            work.display()
        ),
    );
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let mut agent = start(&bundle, &op);
    op.send("f1", "flash", "");
    op.wait_result("f1", CommandStatus::Accepted)
        .expect("accepted");
    assert!(wait_for(AGENT_DEADLINE, || (count_lines(&count) == 1).then_some(())).is_some());

    // Killed mid-run (no chance to clean up); its program is stopped too,
    // as a power cut would.
    agent.kill9();
    if let Ok(p) = std::fs::read_to_string(&pid)
        && let Ok(p) = p.trim().parse::<i32>()
    {
        // SAFETY: kill(2) of the program's process group.
        unsafe {
            libc::kill(-p, libc::SIGKILL);
        }
    }
    op.client.clear();
    let agent = AgentProcess::spawn(&bundle.config);
    let r = op
        .wait_final("f1")
        .unwrap_or_else(|| panic!("no final result; stderr:\n{}", agent.stderr()));
    assert_eq!(r.status, CommandStatus::Failed);
    assert!(
        r.reason.as_deref().unwrap().contains("interrupted"),
        "{r:?}"
    );
    assert!(
        r.reason.as_deref().unwrap().contains("not idempotent"),
        "{r:?}"
    );

    // The broker delivers the same command id again: the answer, no run.
    op.client.clear();
    op.send("f1", "flash", "");
    let again = op.wait_final("f1").expect("answer repeated");
    assert_eq!(again.status, CommandStatus::Failed);
    op.send("barrier", "ping", "");
    op.wait_result("barrier", CommandStatus::Succeeded)
        .expect("serving");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count_lines(&count), 1, "the program ran exactly once");
}
