//! Child processes that cannot outlive the test process.
//!
//! Drop impls kill brokers and agents when a test ends normally or panics,
//! but not when the test process is killed (a timeout, Ctrl-C) or a
//! benchmark calls `std::process::exit`. Children spawned here get
//! `PR_SET_PDEATHSIG = SIGKILL`. The kernel sends that signal when the
//! *thread* that forked the child exits, so all spawning happens on one
//! spawner thread that lives as long as the process.

use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Mutex, OnceLock};

type Request = (Command, Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<Sender<Request>> {
    static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = channel::<Request>();
        std::thread::Builder::new()
            .name("tied-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(spawn_here(&mut cmd));
                }
            })
            .expect("start the spawner thread");
        Mutex::new(tx)
    })
}

fn spawn_here(cmd: &mut Command) -> io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Spawn `cmd` so that it is SIGKILLed when this process ends, however it ends.
pub fn spawn_tied(cmd: Command) -> io::Result<Child> {
    let (tx, rx) = channel();
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("spawner thread is gone"))?
}

/// Kills a process when this process dies, for children that change their
/// user id (Mosquitto started as root drops to `mosquitto`), which clears
/// `PR_SET_PDEATHSIG`: a tiny `sh` watchdog blocks reading a pipe only this
/// process holds; end of file (we died) makes it SIGKILL the target, while
/// [`Watchdog::disarm`] tells it to exit quietly.
pub struct Watchdog {
    child: Option<Child>,
}

impl Watchdog {
    pub fn watch(pid: u32) -> io::Result<Watchdog> {
        Self::on_death(&format!("kill -9 {pid} 2>/dev/null"))
    }

    /// Run the shell command `script` when this process dies (not when
    /// disarmed): for a server that needs more than a signal to go away,
    /// such as a PostgreSQL cluster and its directory.
    pub fn on_death(script: &str) -> io::Result<Watchdog> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "read line || true; [ \"$line\" = disarm ] || {{ {script}; }}; exit 0"
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        Ok(Watchdog {
            child: Some(cmd.spawn()?),
        })
    }

    /// The target ended normally: let the watchdog go without killing anything.
    pub fn disarm(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(mut stdin) = child.stdin.take() {
                use std::io::Write;
                let _ = stdin.write_all(b"disarm\n");
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.disarm();
    }
}
