//! The simulator's own cost and limits: resident memory, CPU time, and the
//! open-file limit (each simulated device holds a socket, its journal and
//! its outbox open).

use std::time::Duration;

/// Files each simulated device keeps open (measured with 200 devices): the
/// TLS socket, the journal and the outbox.
pub const FILES_PER_DEVICE: u64 = 3;
/// Files the process needs besides its devices (registry, PKI, runtime,
/// short-lived reads of settings files and `/proc` for telemetry samples).
pub const FILES_BASE: u64 = 512;

/// Resident set size of this process, from `/proc/self/statm`.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

/// User + system CPU time this process has used so far.
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Raise the soft open-file limit to the hard one (the default soft limit,
/// often 1024, stops a simulation at a few hundred devices). Returns the
/// soft limit now in force.
pub fn raise_open_files() -> std::io::Result<u64> {
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(lim.rlim_cur)
    }
}

/// How many devices fit in `open_files`.
pub fn devices_for(open_files: u64) -> u64 {
    open_files.saturating_sub(FILES_BASE) / FILES_PER_DEVICE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_measures_itself() {
        assert!(rss_bytes().unwrap() > 1024 * 1024);
        let before = cpu_time();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_time() >= before);
        let limit = raise_open_files().unwrap();
        assert!(limit >= 1024);
        assert_eq!(devices_for(FILES_BASE + 30), 10);
    }
}
