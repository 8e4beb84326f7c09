use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Build the workspace binary `name` (package of the same name: `edgebind`,
/// `edgebind-agent`) once per test process, with the profile the tests were
/// built with, and return its path. Panics with cargo's output on failure.
pub fn bin_path(name: &str) -> PathBuf {
    build_bin(name, name, None)
}

/// The agent with the crash tests' pause points (`edgebind-agent-test-hooks`,
/// feature `test-hooks`: see `edgebind_agent::test_hooks`), a file of its
/// own, so `edgebind-agent` itself never has them.
pub fn agent_with_test_hooks() -> PathBuf {
    build_bin(
        "edgebind-agent",
        "edgebind-agent-test-hooks",
        Some("edgebind-agent/test-hooks"),
    )
}

fn build_bin(package: &str, name: &str, features: Option<&str>) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    // Tests run from <target>/<profile>/deps/, benchmark binaries from <target>/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let mut profile_dir = exe.parent().expect("binary has a directory").to_owned();
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir.pop();
    }
    let target_dir = profile_dir.parent().expect("target dir").to_owned();
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .unwrap_or("debug")
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", package, "--bin", name]);
    if let Some(f) = features {
        cmd.args(["--features", f]);
    }
    cmd.env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd.output().expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build -p {package} --bin {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = profile_dir.join(name);
    assert!(path.is_file(), "{} was not built", path.display());
    built.insert(name.to_owned(), path.clone());
    path
}
