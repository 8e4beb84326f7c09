//! Running an action's program: no shell, only the argv the action built,
//! under a time limit, with bounded output, sandboxed.
//!
//! Two sandboxes:
//! - **systemd-run** (`systemd-run --wait --pipe --collect` with
//!   `NoNewPrivileges`, `User=`, `ProtectSystem=strict`, `ReadWritePaths=`,
//!   `PrivateTmp`, `RuntimeMaxSec`): used when systemd is PID 1 and the agent
//!   is root (an unprivileged agent may not start system units).
//! - **fallback**, in the agent's own process tree: a new session (so the
//!   whole process group is killed at the time limit and after the program
//!   ends), core dumps off and at most 1024 open files (rlimits, best
//!   effort: a seccomp filter without `@resources` refuses them), all
//!   supplementary groups dropped and another user when the agent is root,
//!   `PR_SET_NO_NEW_PRIVS` (set-uid programs gain nothing), and Landlock
//!   (Linux ≥ 5.13) allowing writes only beneath the declared writable
//!   paths and to /dev/null.
//!
//! What the fallback does **not** protect: reads (the program can read
//! whatever its user can), the network, other processes of the same user
//! (signals, ptrace where the kernel allows it), IPC, memory and CPU use
//! (only the time limit bounds it). Without Landlock (kernel without it, or
//! a seccomp filter hiding it) writes would be limited only by the user's
//! file permissions: declared actions are then refused ([`Confinement`])
//! unless the configuration opts out, and the result says
//! `"landlock": false`. Run as the agent's
//! own user (not root), a program has exactly the agent's rights, which on
//! the Edgebind image are those of its hardened unit.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use edgebind_protocol::CommandId;
use edgebind_protocol::messages::CommandStatus;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::actions::JobOutcome;
use crate::config::SandboxMode;

/// Which sandbox a program runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sandbox {
    SystemdRun,
    Fallback,
}

impl Sandbox {
    pub fn as_str(self) -> &'static str {
        match self {
            Sandbox::SystemdRun => "systemd-run",
            Sandbox::Fallback => "fallback",
        }
    }

    /// [`Sandbox::choose`] for this process on this host.
    pub fn resolve(mode: SandboxMode) -> Sandbox {
        Sandbox::choose(mode, &HostFacts::probe())
    }

    /// `auto`: systemd-run when systemd is PID 1, the agent is root and the
    /// system bus is there (`systemd-run --wait --pipe` follows the unit over
    /// the bus; without one it cannot start anything), else the fallback.
    pub fn choose(mode: SandboxMode, host: &HostFacts) -> Sandbox {
        match mode {
            SandboxMode::SystemdRun => Sandbox::SystemdRun,
            SandboxMode::Fallback => Sandbox::Fallback,
            SandboxMode::Auto if host.root && host.systemd && host.system_bus => {
                Sandbox::SystemdRun
            }
            SandboxMode::Auto => Sandbox::Fallback,
        }
    }
}

/// What decides the sandbox, read from the host once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    /// The agent's effective uid is 0.
    pub root: bool,
    /// systemd is PID 1 (`/run/systemd/system` exists).
    pub systemd: bool,
    /// The D-Bus system bus socket exists.
    pub system_bus: bool,
}

/// Where the D-Bus system bus listens (dbus-daemon and dbus-broker alike).
const SYSTEM_BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

impl HostFacts {
    pub fn probe() -> HostFacts {
        use std::os::unix::fs::FileTypeExt;
        HostFacts {
            // SAFETY: geteuid has no preconditions.
            root: unsafe { libc::geteuid() } == 0,
            systemd: std::path::Path::new("/run/systemd/system").is_dir(),
            system_bus: std::fs::metadata(SYSTEM_BUS_SOCKET)
                .is_ok_and(|m| m.file_type().is_socket()),
        }
    }
}

/// How the program of a declared action is confined on this device,
/// decided once at start from the sandbox and what the kernel offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confinement {
    /// A transient systemd unit (`ReadWritePaths=` and the rest).
    TransientUnit,
    /// The fallback sandbox with Landlock limiting writes.
    Landlock,
    /// The fallback sandbox without Landlock: writes limited by file
    /// permissions only. Only when the device's configuration opts out
    /// (`actions.allow_unconfined = true`).
    Unconfined,
    /// No confinement available: declared actions are refused, with this reason.
    Refused(String),
}

impl Confinement {
    /// The rule: a declared action runs only where its writes can be held
    /// to its definition (a transient unit, or Landlock), unless the
    /// configuration explicitly allows it to run without.
    /// `landlock_abi`: what `landlock_create_ruleset`'s version query
    /// answered (< 1: none, e.g. kernel without it or a seccomp filter
    /// refusing the call).
    pub fn decide(sandbox: Sandbox, landlock_abi: i64, allow_unconfined: bool) -> Confinement {
        match sandbox {
            Sandbox::SystemdRun => Confinement::TransientUnit,
            Sandbox::Fallback if landlock_abi >= 1 => Confinement::Landlock,
            Sandbox::Fallback if allow_unconfined => Confinement::Unconfined,
            Sandbox::Fallback => Confinement::Refused(
                "refused: this device cannot confine declared actions (no transient systemd \
                 unit: the agent is not root, systemd is not PID 1 or there is no system bus; \
                 and no Landlock: the kernel lacks it, or `landlock` is not in its LSM list, or \
                 a seccomp filter hides it); set actions.allow_unconfined = true in agent.toml \
                 to run them limited by file permissions only"
                    .into(),
            ),
        }
    }

    /// The sandbox that carries it out.
    pub fn sandbox(&self) -> Sandbox {
        match self {
            Confinement::TransientUnit => Sandbox::SystemdRun,
            _ => Sandbox::Fallback,
        }
    }
}

/// The Landlock ABI version the kernel offers this process (< 1: none).
pub fn landlock_abi() -> i64 {
    landlock::abi()
}

/// Whose rights the program runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    /// The agent's own user (built-ins that need what the agent may do).
    Agent,
    /// This user; an agent that is not root can only run as itself.
    User(String),
    /// `nobody` when the agent is root, else the agent's own user.
    Unprivileged,
}

/// Everything needed to run one program.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgramSpec {
    /// The action's name (logs, unit names).
    pub action: String,
    /// Program and arguments; no shell ever sees them.
    pub argv: Vec<String>,
    pub run_as: RunAs,
    pub timeout: Duration,
    /// Bytes kept of stdout and of stderr each; the rest is read and dropped.
    pub output_limit: usize,
    /// The only places the program may write (beside /dev/null).
    pub writable: Vec<PathBuf>,
    pub sandbox: Sandbox,
    /// The fallback must not start the program without Landlock (declared
    /// actions, see [`Confinement`]); built-ins run the agent's own tools.
    pub require_landlock: bool,
}

/// How the process ended.
#[derive(Debug)]
enum Ended {
    Exited(i32),
    Signaled(i32),
    TimedOut,
}

/// Run `p` to its end or its time limit; never panics.
pub async fn run(p: &ProgramSpec, id: &CommandId) -> JobOutcome {
    match prepare(p, id) {
        Ok(prepared) => execute(p, prepared).await,
        Err(why) => JobOutcome::failed(format!("not started: {why}")),
    }
}

struct Prepared {
    command: tokio::process::Command,
    /// The Landlock ruleset the child applies; closed once it is spawned.
    ruleset: Option<OwnedFd>,
}

fn prepare(p: &ProgramSpec, id: &CommandId) -> Result<Prepared, String> {
    if p.argv.is_empty() {
        return Err("empty argv".into());
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let target = match &p.run_as {
        RunAs::Agent => None,
        RunAs::User(name) => Some((name.as_str(), lookup_user(name)?)),
        RunAs::Unprivileged if euid == 0 => Some(("nobody", lookup_user("nobody")?)),
        RunAs::Unprivileged => None,
    };
    match p.sandbox {
        Sandbox::SystemdRun => {
            let user = target.map(|(n, _)| n.to_owned());
            let argv = systemd_run_argv(p, id, user.as_deref());
            let mut command = tokio::process::Command::new(&argv[0]);
            command.args(&argv[1..]);
            Ok(Prepared {
                command,
                ruleset: None,
            })
        }
        Sandbox::Fallback => {
            let drop_to = match target {
                Some((_, (uid, _))) if uid == euid => None,
                Some((_, ids)) if euid == 0 => Some(ids),
                Some((name, _)) => {
                    return Err(format!(
                        "cannot run as user {name:?}: the agent runs as uid {euid} without the right to change user"
                    ));
                }
                None => None,
            };
            let ruleset = landlock::ruleset(&p.writable)?;
            if ruleset.is_none() && p.require_landlock {
                tracing::error!(
                    action = %p.action,
                    "not starting {}: Landlock is not available to confine its writes",
                    p.argv[0]
                );
                return Err(
                    "refused: Landlock is not available to confine the action's writes".into(),
                );
            }
            let mut command = tokio::process::Command::new(&p.argv[0]);
            command.args(&p.argv[1..]);
            let ruleset_fd = ruleset.as_ref().map(|f| f.as_raw_fd());
            // SAFETY: the closure runs in the child between fork and exec and
            // only makes async-signal-safe system calls on values computed
            // before the fork (no allocation, no locks).
            unsafe {
                command.pre_exec(move || child_setup(drop_to, ruleset_fd));
            }
            Ok(Prepared { command, ruleset })
        }
    }
}

/// In the child, before exec.
fn child_setup(drop_to: Option<(u32, u32)>, ruleset: Option<i32>) -> std::io::Result<()> {
    let check = |r: libc::c_int| {
        if r == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain system calls with valid arguments.
    unsafe {
        check(libc::setsid())?;
        let core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // Best effort: a seccomp filter without @resources (the agent's own
        // unit on the image) refuses setrlimit; the limits are a nicety.
        libc::setrlimit(libc::RLIMIT_CORE, &core);
        let files = libc::rlimit {
            rlim_cur: 1024,
            rlim_max: 1024,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &files);
        if let Some((uid, gid)) = drop_to {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        if let Some(fd) = ruleset {
            landlock::restrict_self(fd)?;
        }
    }
    Ok(())
}

async fn execute(p: &ProgramSpec, prepared: Prepared) -> JobOutcome {
    let Prepared {
        mut command,
        ruleset,
    } = prepared;
    let landlock = ruleset.is_some();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8")
        .current_dir("/")
        .kill_on_drop(true);
    let started = Instant::now();
    let spawned = command.spawn();
    // The child has its copy (closed at exec); ours is no longer needed.
    drop(ruleset);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return JobOutcome::failed(format!("cannot start {:?}: {e}", p.argv[0]));
        }
    };
    let pgid = child.id().map(|pid| pid as libc::pid_t);
    let limit = p.output_limit;
    let stdout = tokio::spawn(read_bounded(child.stdout.take(), limit));
    let stderr = tokio::spawn(read_bounded(child.stderr.take(), limit));
    // systemd-run gets a little longer: the unit's own RuntimeMaxSec ends it.
    let grace = match p.sandbox {
        Sandbox::SystemdRun => Duration::from_secs(5),
        Sandbox::Fallback => Duration::ZERO,
    };
    let ended = match tokio::time::timeout(p.timeout + grace, child.wait()).await {
        Ok(Ok(status)) => {
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(code), _) => Ended::Exited(code),
                (None, Some(sig)) => Ended::Signaled(sig),
                (None, None) => Ended::Exited(-1),
            }
        }
        Ok(Err(e)) => return JobOutcome::failed(format!("waiting for the program: {e}")),
        Err(_) => Ended::TimedOut,
    };
    // Whatever the program left behind in its session goes with it.
    if p.sandbox == Sandbox::Fallback
        && let Some(pgid) = pgid
    {
        // SAFETY: kill(2) of the process group our child leads.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    if matches!(ended, Ended::TimedOut) {
        let _ = child.kill().await;
        if p.sandbox == Sandbox::SystemdRun {
            let _ = tokio::process::Command::new("systemctl")
                .args(["kill", "--signal=SIGKILL", &unit_name(p)])
                .status()
                .await;
        }
    }
    let collect = |h: tokio::task::JoinHandle<(String, bool)>| async move {
        tokio::time::timeout(Duration::from_secs(2), h)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    let (out, out_cut) = collect(stdout).await;
    let (err, err_cut) = collect(stderr).await;
    let elapsed = started.elapsed();
    let mut output = json!({
        "stdout": out,
        "stderr": err,
        "duration_ms": elapsed.as_millis() as u64,
        "sandbox": p.sandbox.as_str(),
    });
    if p.sandbox == Sandbox::Fallback {
        output["landlock"] = landlock.into();
    }
    if out_cut {
        output["stdout_truncated"] = true.into();
    }
    if err_cut {
        output["stderr_truncated"] = true.into();
    }
    let (status, reason) = match ended {
        Ended::Exited(0) => (CommandStatus::Succeeded, None),
        Ended::Exited(code) => {
            output["exit_code"] = code.into();
            // systemd-run exits like the unit; past the limit it failed on time.
            if p.sandbox == Sandbox::SystemdRun && elapsed >= p.timeout {
                (
                    CommandStatus::TimedOut,
                    Some(format!("timed out after {} s", p.timeout.as_secs())),
                )
            } else {
                (
                    CommandStatus::Failed,
                    Some(format!("{} exited with status {code}", p.argv[0])),
                )
            }
        }
        Ended::Signaled(sig) => {
            output["signal"] = sig.into();
            (
                CommandStatus::Failed,
                Some(format!("{} was killed by signal {sig}", p.argv[0])),
            )
        }
        Ended::TimedOut => (
            CommandStatus::TimedOut,
            Some(format!(
                "timed out after {} s; its process group was killed",
                p.timeout.as_secs()
            )),
        ),
    };
    if status == CommandStatus::Succeeded {
        output["exit_code"] = 0.into();
    }
    JobOutcome {
        status,
        reason,
        output: Some(output),
    }
}

/// Read all of `r`, keeping the first `limit` bytes (as lossy UTF-8).
async fn read_bounded<R: AsyncRead + Unpin>(r: Option<R>, limit: usize) -> (String, bool) {
    let Some(mut r) = r else {
        return (String::new(), false);
    };
    let mut kept = Vec::new();
    let mut cut = false;
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = limit.saturating_sub(kept.len());
                if n > room {
                    cut = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (String::from_utf8_lossy(&kept).into_owned(), cut)
}

fn unit_name(p: &ProgramSpec) -> String {
    format!("edgebind-action-{}", p.action)
}

/// The systemd-run command line for `p` (public for its test).
pub fn systemd_run_argv(p: &ProgramSpec, id: &CommandId, user: Option<&str>) -> Vec<String> {
    let mut argv: Vec<String> = [
        "systemd-run",
        "--wait",
        "--pipe",
        "--collect",
        "--quiet",
        "--service-type=exec",
    ]
    .map(String::from)
    .to_vec();
    argv.push(format!(
        "--unit={}-{}",
        unit_name(p),
        id.as_str().replace('.', "_")
    ));
    let mut prop = |s: String| {
        argv.push("-p".into());
        argv.push(s);
    };
    prop("NoNewPrivileges=yes".into());
    prop("ProtectSystem=strict".into());
    prop("ProtectHome=read-only".into());
    prop("PrivateTmp=yes".into());
    prop("PrivateDevices=yes".into());
    prop("CapabilityBoundingSet=".into());
    prop(format!("RuntimeMaxSec={}", p.timeout.as_secs().max(1)));
    prop("KillMode=control-group".into());
    if let Some(u) = user {
        prop(format!("User={u}"));
    }
    if !p.writable.is_empty() {
        let paths: Vec<String> = p.writable.iter().map(|w| w.display().to_string()).collect();
        prop(format!("ReadWritePaths={}", paths.join(" ")));
    }
    argv.push("--".into());
    argv.extend(p.argv.iter().cloned());
    argv
}

/// (uid, gid) of a user name.
fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    let c_name = std::ffi::CString::new(name).map_err(|_| format!("bad user name {name:?}"))?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the sizes given.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(format!("no such user {name:?}"));
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

/// Landlock through raw system calls (libc has the numbers, not the API).
mod landlock {
    use super::*;

    const CREATE_RULESET_VERSION: u32 = 1;
    const RULE_PATH_BENEATH: libc::c_int = 1;
    const WRITE_FILE: u64 = 1 << 1;
    const REMOVE_DIR: u64 = 1 << 4;
    const REMOVE_FILE: u64 = 1 << 5;
    const MAKE_CHAR: u64 = 1 << 6;
    const MAKE_DIR: u64 = 1 << 7;
    const MAKE_REG: u64 = 1 << 8;
    const MAKE_SOCK: u64 = 1 << 9;
    const MAKE_FIFO: u64 = 1 << 10;
    const MAKE_BLOCK: u64 = 1 << 11;
    const MAKE_SYM: u64 = 1 << 12;
    const TRUNCATE: u64 = 1 << 14;

    /// The ABI version (< 1: no Landlock for this process).
    pub fn abi() -> i64 {
        // SAFETY: the documented ABI-version query.
        unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<RulesetAttr>(),
                0usize,
                CREATE_RULESET_VERSION,
            )
        }
    }

    #[repr(C)]
    struct RulesetAttr {
        handled_access_fs: u64,
    }

    #[repr(C, packed)]
    struct PathBeneath {
        allowed_access: u64,
        parent_fd: i32,
    }

    /// A ruleset that handles every kind of write and allows them beneath
    /// `writable` (and to /dev/null); `None` when the kernel has no Landlock.
    pub fn ruleset(writable: &[PathBuf]) -> Result<Option<OwnedFd>, String> {
        let abi = abi();
        if abi < 1 {
            tracing::debug!(
                "Landlock is not available; writes are limited by file permissions only"
            );
            return Ok(None);
        }
        let mut handled = WRITE_FILE
            | REMOVE_DIR
            | REMOVE_FILE
            | MAKE_CHAR
            | MAKE_DIR
            | MAKE_REG
            | MAKE_SOCK
            | MAKE_FIFO
            | MAKE_BLOCK
            | MAKE_SYM;
        if abi >= 3 {
            handled |= TRUNCATE;
        }
        let attr = RulesetAttr {
            handled_access_fs: handled,
        };
        // SAFETY: attr is a valid ruleset attribute of the size given.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                std::mem::size_of::<RulesetAttr>(),
                0u32,
            )
        };
        if fd < 0 {
            return Err(format!(
                "cannot create a Landlock ruleset: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a fresh fd we own.
        let ruleset = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let file_rights = WRITE_FILE | (handled & TRUNCATE);
        let mut rules: Vec<(PathBuf, u64)> =
            writable.iter().map(|p| (p.clone(), handled)).collect();
        rules.push(("/dev/null".into(), file_rights));
        for (path, rights) in rules {
            let file = match std::fs::File::options()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) => {
                    return Err(format!("writable path {}: {e}", path.display()));
                }
            };
            let is_dir = file.metadata().map(|m| m.is_dir()).unwrap_or(false);
            let rule = PathBeneath {
                allowed_access: if is_dir { rights } else { rights & file_rights },
                parent_fd: file.as_raw_fd(),
            };
            // SAFETY: a valid rule for a valid ruleset fd.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_landlock_add_rule,
                    ruleset.as_raw_fd(),
                    RULE_PATH_BENEATH,
                    &rule as *const PathBeneath,
                    0u32,
                )
            };
            if rc != 0 {
                return Err(format!(
                    "Landlock rule for {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(Some(ruleset))
    }

    /// In the child, after PR_SET_NO_NEW_PRIVS.
    ///
    /// # Safety
    /// `fd` must be a Landlock ruleset fd.
    pub unsafe fn restrict_self(fd: i32) -> std::io::Result<()> {
        // SAFETY: the caller passes a ruleset fd.
        let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    use std::os::unix::fs::OpenOptionsExt;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(argv: &[&str], timeout_ms: u64) -> ProgramSpec {
        ProgramSpec {
            action: "t".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            run_as: RunAs::Agent,
            timeout: Duration::from_millis(timeout_ms),
            output_limit: 16,
            writable: vec![],
            sandbox: Sandbox::Fallback,
            require_landlock: false,
        }
    }

    fn id() -> CommandId {
        CommandId::new("c1").unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn output_is_captured_bounded_and_the_exit_status_decides() {
        let o = run(
            &spec(&["/bin/sh", "-c", "echo hello; echo oops >&2"], 5000),
            &id(),
        )
        .await;
        assert_eq!(o.status, CommandStatus::Succeeded, "{o:?}");
        let out = o.output.unwrap();
        assert_eq!(out["stdout"], "hello\n");
        assert_eq!(out["stderr"], "oops\n");
        let o = run(&spec(&["/bin/sh", "-c", "seq 1 1000; exit 3"], 5000), &id()).await;
        assert_eq!(o.status, CommandStatus::Failed);
        let out = o.output.unwrap();
        assert_eq!(out["exit_code"], 3);
        assert_eq!(out["stdout_truncated"], true);
        assert_eq!(out["stdout"].as_str().unwrap().len(), 16);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_time_limit_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let started = Instant::now();
        let mut p = spec(&["/bin/sh", "-c", &script], 300);
        p.writable = vec![dir.path().to_owned()];
        let o = run(&p, &id()).await;
        assert_eq!(o.status, CommandStatus::TimedOut, "{o:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        assert!(!alive, "the background child survived the time limit");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_missing_program_fails_without_panicking() {
        let o = run(&spec(&["/nonexistent/prog"], 1000), &id()).await;
        assert_eq!(o.status, CommandStatus::Failed);
        assert!(o.reason.unwrap().contains("/nonexistent/prog"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writes_outside_the_writable_paths_fail_where_landlock_exists() {
        let allowed = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let script = format!(
            "echo ok > {a}/f && echo no > {o}/f; grep NoNewPrivs /proc/self/status",
            a = allowed.path().display(),
            o = other.path().display()
        );
        let mut p = spec(&["/bin/sh", "-c", &script], 5000);
        p.output_limit = 4096;
        p.writable = vec![allowed.path().to_owned()];
        let o = run(&p, &id()).await;
        let out = o.output.unwrap();
        assert!(
            out["stdout"].as_str().unwrap().contains("NoNewPrivs:\t1"),
            "{out}"
        );
        assert!(allowed.path().join("f").exists());
        if out["landlock"] == true {
            assert!(!other.path().join("f").exists(), "{out}");
            assert!(out["stderr"].as_str().unwrap().contains("denied"), "{out}");
        }
    }

    #[test]
    fn auto_picks_a_transient_unit_only_for_a_root_agent_under_systemd_with_a_system_bus() {
        let all = HostFacts {
            root: true,
            systemd: true,
            system_bus: true,
        };
        assert_eq!(
            Sandbox::choose(SandboxMode::Auto, &all),
            Sandbox::SystemdRun
        );
        for host in [
            HostFacts { root: false, ..all },
            HostFacts {
                systemd: false,
                ..all
            },
            HostFacts {
                system_bus: false,
                ..all
            },
        ] {
            assert_eq!(
                Sandbox::choose(SandboxMode::Auto, &host),
                Sandbox::Fallback,
                "{host:?}"
            );
            // An explicit choice is kept (systemd-run then fails, closed).
            assert_eq!(
                Sandbox::choose(SandboxMode::SystemdRun, &host),
                Sandbox::SystemdRun
            );
        }
        assert_eq!(
            Sandbox::choose(SandboxMode::Fallback, &all),
            Sandbox::Fallback
        );
    }

    #[test]
    fn a_declared_action_without_unit_or_landlock_is_refused_unless_the_device_opts_out() {
        use Confinement::*;
        for allow in [false, true] {
            assert_eq!(
                Confinement::decide(Sandbox::SystemdRun, 0, allow),
                TransientUnit
            );
            assert_eq!(
                Confinement::decide(Sandbox::SystemdRun, 7, allow),
                TransientUnit
            );
            assert_eq!(Confinement::decide(Sandbox::Fallback, 1, allow), Landlock);
            assert_eq!(Confinement::decide(Sandbox::Fallback, 7, allow), Landlock);
        }
        // No Landlock: a disabled LSM answers EOPNOTSUPP, a kernel without it
        // or a seccomp filter ENOSYS/EPERM; the query returns -1 for each.
        for abi in [-1, 0] {
            let Refused(why) = Confinement::decide(Sandbox::Fallback, abi, false) else {
                panic!("abi {abi} without opt-out must refuse");
            };
            assert!(why.contains("actions.allow_unconfined"), "{why}");
            assert!(why.contains("Landlock"), "{why}");
            assert_eq!(
                Confinement::decide(Sandbox::Fallback, abi, true),
                Unconfined
            );
        }
        assert_eq!(TransientUnit.sandbox(), Sandbox::SystemdRun);
        for c in [Landlock, Unconfined, Refused("x".into())] {
            assert_eq!(c.sandbox(), Sandbox::Fallback);
        }
    }

    #[test]
    fn systemd_run_gets_the_hardening_properties_and_no_shell() {
        let mut p = spec(&["/usr/libexec/x", "--level=full"], 30_000);
        p.writable = vec!["/var/lib/x".into()];
        p.sandbox = Sandbox::SystemdRun;
        let argv = systemd_run_argv(&p, &id(), Some("nobody"));
        let s = argv.join(" ");
        for want in [
            "systemd-run --wait --pipe --collect",
            "-p NoNewPrivileges=yes",
            "-p User=nobody",
            "-p ProtectSystem=strict",
            "-p ReadWritePaths=/var/lib/x",
            "-p PrivateTmp=yes",
            "-p RuntimeMaxSec=30",
            "-- /usr/libexec/x --level=full",
        ] {
            assert!(s.contains(want), "{want}: {s}");
        }
    }
}
