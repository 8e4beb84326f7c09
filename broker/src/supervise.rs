//! `edgebind broker run`: Mosquitto as a child process, with the CRL kept fresh.
//!
//! A CRL past its nextUpdate makes Mosquitto refuse EVERY client, valid ones
//! too. So instead of replacing itself with Mosquitto, `broker run` stays
//! as a small supervisor:
//!
//! * it starts `mosquitto -c <dir>/mosquitto.conf` as its child and records
//!   its OWN pid in `<dir>/mosquitto.pid` (what `edgebind broker reload` and
//!   a service manager signal);
//! * SIGTERM / SIGINT are forwarded (Mosquitto stops cleanly; after
//!   [`STOP_GRACE`] it is killed), SIGHUP is forwarded (reload ACL + CRL);
//! * every [`RunOptions::check_every`] it reads the broker's CRL: once less
//!   than [`RunOptions::refresh_below`] remains it re-issues the CRL with the
//!   issuing CA, replaces the broker's copy atomically and sends Mosquitto
//!   SIGHUP (no connection is dropped); it warns on stderr when that fails
//!   and while the CRL is inside the warning window;
//! * when Mosquitto exits, the supervisor exits with its status; if it
//!   exits without having been asked to, the supervisor says so and exits
//!   non-zero (no respawn loop: restarting is the service manager's job);
//! * a tiny `sh` watchdog stops Mosquitto (SIGTERM) if the supervisor itself
//!   is killed with SIGKILL, so no orphan keeps the port. (PR_SET_PDEATHSIG
//!   cannot do that: the kernel clears it when Mosquitto drops root.)

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use edgebind_certs::{CrlStatus, Pki};
use time::{Duration, OffsetDateTime};

use crate::layout::{CRL, PID};
use crate::settings::BrokerSettings;
use crate::{Error, config, process};

/// How long Mosquitto gets to stop after a forwarded SIGTERM/SIGINT before SIGKILL.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Default interval between two CRL checks.
pub const DEFAULT_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// How `broker run` keeps the CRL fresh.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The PKI (issuing CA) that re-issues the CRL; `None` = this host has
    /// no PKI: the CRL is only checked and warned about.
    pub pki_dir: Option<PathBuf>,
    /// Lifetime of each CRL the loop issues.
    pub crl_lifetime: Duration,
    /// Re-issue once less than this remains.
    pub refresh_below: Duration,
    /// Warn on stderr once less than this remains (normally only reached
    /// when refreshing fails).
    pub warn_below: Duration,
    /// Interval between two checks of the broker's CRL.
    pub check_every: std::time::Duration,
    /// What the supervisor knows, for `broker run --metrics`.
    pub stats: Arc<SupervisorStats>,
}

/// The supervisor's own figures: whether Mosquitto runs, the reloads it
/// forwarded and the state of the CRL it keeps. Mosquitto's message
/// counters are not here: they live in `$SYS`, which only the fleet
/// service may read (its `edgebind_broker_*` metrics).
#[derive(Debug, Default)]
pub struct SupervisorStats {
    pub up: AtomicBool,
    /// When Mosquitto was started (Unix seconds).
    pub started_unix: AtomicU64,
    /// SIGHUPs forwarded to Mosquitto (ACL and CRL reloads), the CRL
    /// refreshes' own included.
    pub reloads: AtomicU64,
    /// The broker CRL's nextUpdate (Unix seconds); 0 while unreadable.
    pub crl_next_update_unix: AtomicI64,
    pub crl_refreshes: AtomicU64,
    pub crl_refresh_failures: AtomicU64,
}

impl SupervisorStats {
    fn saw_crl(&self, status: &CrlStatus) {
        self.crl_next_update_unix
            .store(status.next_update.unix_timestamp(), Ordering::Relaxed);
    }
}

impl RunOptions {
    /// From the broker settings: CRLs live `crl_days`; refresh once less
    /// than half of that remains, or at the latest when the CRL enters the
    /// `crl_warn_days` window; check every 10 minutes.
    pub fn from_settings(settings: &BrokerSettings, pki_dir: Option<PathBuf>) -> RunOptions {
        let lifetime = Duration::days(i64::from(settings.crl_days));
        let warn = Duration::days(i64::from(settings.crl_warn_days));
        RunOptions {
            pki_dir,
            crl_lifetime: lifetime,
            refresh_below: std::cmp::max(lifetime / 2_i32, warn),
            warn_below: warn,
            check_every: DEFAULT_CHECK_EVERY,
            stats: Arc::default(),
        }
    }

    /// TEST/EXPERT: CRLs that live `seconds` instead of days (refresh below
    /// half of it, warn below a quarter), so a test can watch a refresh.
    pub fn with_test_crl_lifetime(mut self, seconds: u32) -> RunOptions {
        self.crl_lifetime = Duration::seconds(i64::from(seconds.max(1)));
        self.refresh_below = self.crl_lifetime / 2_i32;
        self.warn_below = self.crl_lifetime / 4_i32;
        self
    }
}

/// Format a time for the log (RFC 3339, UTC).
pub fn ts(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

macro_rules! say {
    ($($arg:tt)*) => { eprintln!("edgebind broker run: {}", format_args!($($arg)*)) };
}

/// Run Mosquitto under supervision until it exits; returns the exit code
/// for this process (Mosquitto's own when it was asked to stop, non-zero
/// when it died by itself).
pub fn run(broker_dir: &Path, settings: &BrokerSettings, opts: &RunOptions) -> Result<u8, Error> {
    let mut cmd = process::command(broker_dir)?;
    cmd.stdin(Stdio::null());
    unblock_signals_in_child(&mut cmd);
    let signals = SignalSet::new(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD]);
    // Blocked before the spawn so that no signal is lost between the spawn
    // and the first wait.
    let previous_mask = signals.block()?;
    let result = supervise(cmd, broker_dir, settings, opts, &signals);
    signals.restore(&previous_mask);
    result
}

fn supervise(
    mut cmd: Command,
    broker_dir: &Path,
    settings: &BrokerSettings,
    opts: &RunOptions,
    signals: &SignalSet,
) -> Result<u8, Error> {
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(broker_dir.join(crate::layout::CONF), e))?;
    let pid = child.id();
    opts.stats.up.store(true, Ordering::Relaxed);
    opts.stats.started_unix.store(
        u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0),
        Ordering::Relaxed,
    );
    if let Ok(status) = edgebind_certs::pki::crl_status(&broker_dir.join(CRL)) {
        opts.stats.saw_crl(&status);
    }
    let mut watchdog = match Watchdog::start(pid) {
        Ok(w) => Some(w),
        Err(e) => {
            say!(
                "warning: no watchdog for mosquitto ({e}); if this process is SIGKILLed, stop mosquitto (pid {pid}) yourself"
            );
            None
        }
    };
    let pid_path = broker_dir.join(PID);
    let me = std::process::id();
    if let Err(e) = edgebind_certs::files::write_public(&pid_path, format!("{me}\n").as_bytes()) {
        say!(
            "warning: cannot record the pid ({e}); `edgebind broker reload` will not find the broker"
        );
    }
    say!(
        "mosquitto started (pid {pid}); this supervisor (pid {me}, recorded in {}) forwards SIGTERM/SIGINT/SIGHUP \
         and checks the CRL every {}s (re-issued when less than {} remains)",
        pid_path.display(),
        opts.check_every.as_secs(),
        opts.refresh_below
    );

    let mut crl = CrlKeeper {
        broker_dir,
        settings,
        opts,
        mosquitto: pid,
    };
    let mut next_check = Instant::now() + opts.check_every;
    let mut stop_requested: Option<(libc::c_int, Instant)> = None;
    let status = loop {
        if exited_without_reaping(pid) {
            // Disarm before reaping, so the watchdog can never hit a reused pid.
            if let Some(mut w) = watchdog.take() {
                w.disarm();
            }
            break child
                .wait()
                .map_err(|e| Error::io(broker_dir.join(crate::layout::CONF), e))?;
        }
        let now = Instant::now();
        let wake = match stop_requested {
            Some((_, deadline)) => deadline,
            None => next_check,
        };
        match signals.wait(wake.saturating_duration_since(now)) {
            Some(sig @ (libc::SIGTERM | libc::SIGINT)) => {
                forward(pid, sig);
                if stop_requested.is_none() {
                    say!("stopping mosquitto (pid {pid}) on {}", signal_name(sig));
                    stop_requested = Some((sig, Instant::now() + STOP_GRACE));
                }
            }
            Some(libc::SIGHUP) => {
                forward(pid, libc::SIGHUP);
                opts.stats.reloads.fetch_add(1, Ordering::Relaxed);
                say!("SIGHUP forwarded to mosquitto (pid {pid}): ACL and CRL reloaded");
                if stop_requested.is_none() {
                    // Look at the (probably just regenerated) CRL right away.
                    next_check = Instant::now();
                }
            }
            Some(_) => {} // SIGCHLD: checked at the top of the loop.
            None => match stop_requested {
                Some((_, deadline)) if Instant::now() >= deadline => {
                    say!(
                        "mosquitto (pid {pid}) did not stop within {}s; killing it",
                        STOP_GRACE.as_secs()
                    );
                    forward(pid, libc::SIGKILL);
                    stop_requested = Some((libc::SIGKILL, Instant::now() + STOP_GRACE));
                }
                Some(_) => {}
                None if Instant::now() >= next_check => {
                    crl.check();
                    next_check = Instant::now() + opts.check_every;
                }
                None => {}
            },
        }
    };
    opts.stats.up.store(false, Ordering::Relaxed);
    remove_pid_file(&pid_path, me);
    Ok(exit_code(pid, status, stop_requested.is_some()))
}

fn exit_code(pid: u32, status: ExitStatus, asked_to_stop: bool) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        _ => 1,
    };
    if asked_to_stop {
        say!("mosquitto (pid {pid}) stopped ({status})");
        return code;
    }
    say!(
        "error: mosquitto (pid {pid}) exited unexpectedly ({status}); the broker is DOWN. \
         Not restarting it: see mosquitto's log above, fix the cause and run `edgebind broker run` again \
         (or let the service manager restart it)"
    );
    if code == 0 { 1 } else { code }
}

/// Remove the pid file if it still names this process (another `broker
/// run` may have replaced it).
fn remove_pid_file(path: &Path, me: u32) {
    if std::fs::read_to_string(path).is_ok_and(|t| t.trim() == me.to_string()) {
        let _ = std::fs::remove_file(path);
    }
}

fn forward(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) on our own (not yet reaped) child.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// A child inherits the signal mask, and Mosquitto builds its own from the
/// inherited one: with SIGHUP still blocked it would never reload (measured:
/// no "Reloading config" after SIGHUP). So the child starts unblocked.
fn unblock_signals_in_child(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls (sigemptyset, pthread_sigmask)
    // run between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(())
        });
    }
}

/// True once the child has exited; it stays a zombie (its pid cannot be
/// reused) until `Child::wait` reaps it.
fn exited_without_reaping(pid: u32) -> bool {
    let id: libc::id_t = pid;
    // SAFETY: an all-zero siginfo_t is valid for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; WNOWAIT leaves the child waitable.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            id,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: si_pid is set by waitid (0 when no child changed state).
    rc != 0 || unsafe { info.si_pid() } != 0
}

/// The signals the supervisor waits for synchronously (blocked, then taken
/// with sigtimedwait: no handler, no race).
struct SignalSet(libc::sigset_t);

impl SignalSet {
    fn new(signals: &[libc::c_int]) -> SignalSet {
        // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &sig in signals {
                libc::sigaddset(&mut set, sig);
            }
            SignalSet(set)
        }
    }

    fn block(&self) -> Result<libc::sigset_t, Error> {
        // SAFETY: valid set pointers.
        unsafe {
            let mut old: libc::sigset_t = std::mem::zeroed();
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &self.0, &mut old);
            if rc != 0 {
                return Err(Error::Invalid(format!(
                    "cannot block signals: {}",
                    std::io::Error::from_raw_os_error(rc)
                )));
            }
            Ok(old)
        }
    }

    fn restore(&self, old: &libc::sigset_t) {
        // SAFETY: valid set pointer.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut());
        }
    }

    /// The next pending signal of the set, or None after `timeout`.
    fn wait(&self, timeout: std::time::Duration) -> Option<libc::c_int> {
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: valid pointers; a null siginfo is allowed.
        let sig = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
        (sig > 0).then_some(sig)
    }
}

/// `sh` blocked on a pipe only the supervisor holds: end of file (the
/// supervisor died, however) makes it send Mosquitto SIGTERM; "disarm"
/// lets it exit quietly. It ignores the terminal's INT/HUP and a group TERM
/// (the supervisor handles those).
struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Watchdog {
    fn start(pid: u32) -> std::io::Result<Watchdog> {
        let mut cmd = Command::new("/bin/sh");
        unblock_signals_in_child(&mut cmd);
        let mut child = cmd
            .arg("-c")
            .arg(format!(
                "trap '' INT HUP TERM; read line || true; [ \"$line\" = disarm ] || kill -TERM {pid} 2>/dev/null; exit 0"
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take();
        Ok(Watchdog { child, stdin })
    }

    fn disarm(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"disarm\n");
        }
        let _ = self.child.wait();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// The refresh loop's state: checks and re-issues the broker's CRL.
struct CrlKeeper<'a> {
    broker_dir: &'a Path,
    settings: &'a BrokerSettings,
    opts: &'a RunOptions,
    mosquitto: u32,
}

impl CrlKeeper<'_> {
    fn check(&mut self) {
        let path = self.broker_dir.join(CRL);
        let now = OffsetDateTime::now_utc();
        let mut status = edgebind_certs::pki::crl_status(&path).map_err(Error::from);
        let due = match &status {
            Ok(s) => s.remaining(now) < self.opts.refresh_below,
            Err(_) => true,
        };
        if due {
            let before = status.as_ref().ok().map(|s| s.next_update);
            match self.refresh() {
                Ok(new) => {
                    self.opts
                        .stats
                        .crl_refreshes
                        .fetch_add(1, Ordering::Relaxed);
                    self.opts.stats.reloads.fetch_add(1, Ordering::Relaxed);
                    say!(
                        "CRL refreshed: {} now valid until {} (was {}), {} revoked; mosquitto (pid {}) reloaded it, no client disconnected",
                        path.display(),
                        ts(new.next_update),
                        before.map_or_else(|| "unreadable".to_owned(), ts),
                        new.revoked,
                        self.mosquitto
                    );
                    status = Ok(new);
                }
                Err(e) => {
                    self.opts
                        .stats
                        .crl_refresh_failures
                        .fetch_add(1, Ordering::Relaxed);
                    say!(
                        "WARNING: could not refresh the broker's CRL {}: {e}. Mosquitto refuses EVERY client \
                         once it lapses; fix this or run `edgebind pki crl` where the issuing CA is",
                        path.display()
                    )
                }
            }
        }
        if let Ok(s) = &status {
            self.opts.stats.saw_crl(s);
        }
        let now = OffsetDateTime::now_utc();
        match status {
            Ok(s) if s.is_lapsed(now) => say!(
                "WARNING: the broker's CRL {} LAPSED at {}: mosquitto refuses EVERY client until it is refreshed",
                path.display(),
                ts(s.next_update)
            ),
            Ok(s) if s.remaining(now) < self.opts.warn_below => say!(
                "WARNING: the broker's CRL {} lapses at {} (in {}); after that mosquitto refuses EVERY client",
                path.display(),
                ts(s.next_update),
                s.remaining(now)
            ),
            Ok(_) => {}
            Err(e) => say!("WARNING: cannot read the broker's CRL: {e}"),
        }
    }

    /// Re-issue the CRL with the issuing CA, install the broker's copy and
    /// make Mosquitto load it.
    fn refresh(&self) -> Result<CrlStatus, Error> {
        let pki_dir = self.opts.pki_dir.as_deref().ok_or_else(|| {
            Error::Invalid(
                "no PKI on this host (the CRL can only be re-issued by the issuing CA)".into(),
            )
        })?;
        let pki = Pki::open(pki_dir)?;
        let status = config::install_fresh_crl(
            self.broker_dir,
            &pki,
            self.settings,
            self.opts.crl_lifetime,
        )?;
        process::send_hup(self.mosquitto)?;
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_at_half_life_or_at_the_warning_window_whichever_is_first() {
        let mut s = BrokerSettings::new(vec!["h".into()], vec![]);
        let o = RunOptions::from_settings(&s, None);
        assert_eq!(o.crl_lifetime, Duration::days(7));
        assert_eq!(o.refresh_below, Duration::hours(84));
        assert_eq!(o.warn_below, Duration::days(3));
        assert_eq!(o.check_every, DEFAULT_CHECK_EVERY);
        // A wide warning window: refresh when entering it, so a working
        // refresh never warns.
        s.crl_days = 5;
        s.crl_warn_days = 4;
        let o = RunOptions::from_settings(&s, None);
        assert_eq!(o.refresh_below, Duration::days(4));

        let o = o.with_test_crl_lifetime(20);
        assert_eq!(o.crl_lifetime, Duration::seconds(20));
        assert_eq!(o.refresh_below, Duration::seconds(10));
        assert_eq!(o.warn_below, Duration::seconds(5));
    }
}
