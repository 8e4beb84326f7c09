//! Running the real `edgebind` binary the way an operator does, for tests.

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use crate::bin_path;

/// `edgebind --home <home> <args>`, waiting for it to finish.
pub fn run(home: &Path, args: &[&str]) -> Output {
    Command::new(bin_path("edgebind"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .expect("run edgebind")
}

/// Exit code, stdout and stderr of a finished command, for assertion messages.
pub fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A loopback port that was free a moment ago (the OS picks it).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// A fresh fleet home in a tempdir that Mosquitto can traverse: started as
/// root it drops to user `mosquitto` and must reach `<home>/broker` (the PKI
/// directory inside stays 0700).
pub fn broker_home(prefix: &str) -> tempfile::TempDir {
    let home = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod tempdir");
    home
}
