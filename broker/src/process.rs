//! Finding and starting Mosquitto, and reloading it with SIGHUP.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;
use crate::layout::{CONF, PID};
use crate::settings::BrokerSettings;

/// The mosquitto executable: `$EDGEBIND_MOSQUITTO`, else `mosquitto` on
/// `$PATH`, else `/usr/sbin/mosquitto` (Debian puts it in sbin, which a
/// normal user's PATH often lacks).
pub fn find_mosquitto() -> Result<PathBuf, Error> {
    if let Some(explicit) = std::env::var_os("EDGEBIND_MOSQUITTO") {
        let path = PathBuf::from(explicit);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::MosquittoMissing {
                looked: format!("EDGEBIND_MOSQUITTO={}", path.display()),
            })
        };
    }
    let mut looked = Vec::new();
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path_dirs).chain([
        "/usr/sbin".into(),
        "/usr/local/sbin".into(),
        "/sbin".into(),
    ]);
    for dir in candidates {
        let candidate = dir.join("mosquitto");
        if candidate.is_file() {
            return Ok(candidate);
        }
        looked.push(candidate.display().to_string());
    }
    Err(Error::MosquittoMissing {
        looked: looked.join(", "),
    })
}

/// The command that runs the broker in the foreground with the generated config.
pub fn command(broker_dir: &Path) -> Result<Command, Error> {
    let conf = broker_dir.join(CONF);
    if !conf.exists() {
        return Err(Error::NotConfigured { path: conf });
    }
    let mut cmd = Command::new(find_mosquitto()?);
    cmd.arg("-c").arg(conf);
    Ok(cmd)
}

/// The pid from `<broker_dir>/mosquitto.pid` if that process is a running
/// mosquitto or an `edgebind broker run` supervisor (which forwards SIGHUP
/// to its mosquitto child).
pub fn running_pid(broker_dir: &Path) -> Result<u32, Error> {
    let pid_path = broker_dir.join(PID);
    let text = std::fs::read_to_string(&pid_path).map_err(|_| {
        Error::NotRunning(format!(
            "{} not found: is the broker running (`edgebind broker run`)?",
            pid_path.display()
        ))
    })?;
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| Error::NotRunning(format!("{} does not hold a pid", pid_path.display())))?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "mosquitto" && !is_broker_run(pid) {
        return Err(Error::NotRunning(format!(
            "process {pid} from {} is neither a running mosquitto nor `edgebind broker run` (stale pid file?)",
            pid_path.display()
        )));
    }
    Ok(pid)
}

/// Is `pid` an `edgebind ... broker run` process (its arguments contain
/// `broker` followed by `run`)?
fn is_broker_run(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"broker".as_slice() && w[1] == b"run".as_slice())
}

/// Send SIGHUP: Mosquitto re-reads the ACL file and the CRL without dropping
/// connections; the new ACL also applies to clients already connected.
pub fn send_hup(pid: u32) -> Result<(), Error> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| Error::Invalid(format!("bad pid {pid}")))?;
    // SAFETY: kill(2) with a valid signal number has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    if rc != 0 {
        return Err(Error::NotRunning(format!(
            "cannot signal mosquitto (pid {pid}): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// SIGHUP the broker recorded in `broker_dir`; returns its pid.
pub fn reload(broker_dir: &Path) -> Result<u32, Error> {
    let pid = running_pid(broker_dir)?;
    send_hup(pid)?;
    Ok(pid)
}

/// uid/gid Mosquitto will run as after dropping root, when we are root.
pub fn broker_user_ids(settings: &BrokerSettings) -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = settings.run_as.as_deref().unwrap_or("mosquitto");
    if name == "root" {
        return None;
    }
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value for getpwnam_r to fill.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and buf's length is passed
    // (getpwnam_r is the thread-safe variant; tests call this from many threads).
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some((pwd.pw_uid, pwd.pw_gid))
}
