//! `edgebind send DEV ACTION --arg k=v` against a real agent that declares the
//! layer's example action (meta-edgebind's `selftest`): the CLI checks the
//! arguments against the schema the device reported in its inventory, so an
//! argument outside it is refused before anything is sent (clear error,
//! exit 1, no command reaches the broker), and a valid one runs on the
//! device and its output comes back.

mod fleet_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::Inventory;
use fleet_support::{AgentTweaks, Fleet, LONG, stderr, stdout};
use serde_json::Value;

const EXAMPLE: &str = "../meta-edgebind/recipes-edgebind/edgebind-action-selftest/files";

/// The example recipe's definition and program, installed for a test agent:
/// the program into a directory every user may enter (the agent runs it as
/// `nobody` when it is root), the definition as the layer wrote it but for
/// `program`, which points there instead of /usr/libexec.
fn install_example(bundle: &Path, config: &Path) -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(EXAMPLE);
    let programs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(programs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = programs.path().join("selftest");
    std::fs::copy(root.join("edgebind-selftest"), &program).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();

    let text = std::fs::read_to_string(root.join("selftest.toml")).unwrap();
    let mut def: toml::Table = toml::from_str(&text).unwrap();
    def.insert("program".into(), program.display().to_string().into());
    let actions_dir = bundle.join("actions.d");
    std::fs::create_dir_all(&actions_dir).unwrap();
    std::fs::write(
        actions_dir.join("selftest.toml"),
        toml::to_string(&def).unwrap(),
    )
    .unwrap();

    let mut agent: toml::Table = toml::from_str(&std::fs::read_to_string(config).unwrap()).unwrap();
    agent
        .get_mut("actions")
        .and_then(|a| a.as_table_mut())
        .expect("the test config has an [actions] table")
        .insert("dir".into(), actions_dir.display().to_string().into());
    std::fs::write(config, toml::to_string(&agent).unwrap()).unwrap();
    programs
}

fn selftest_commands(fleet: &Fleet) -> usize {
    fleet
        .store()
        .commands_for(&DeviceId::new("dev-a").unwrap(), 1000)
        .unwrap()
        .iter()
        .filter(|c| c.action.as_deref() == Some("selftest"))
        .count()
}

#[test]
fn send_checks_arguments_against_the_devices_schema_and_runs_a_valid_declared_action() {
    let mut fleet = Fleet::start();
    fleet.start_service();
    let bundle = fleet.add_device("dev-a", &[]);
    let config = fleet.agent_config(&bundle, &AgentTweaks::default());
    let _programs = install_example(&bundle, &config);
    let agent = fleet.spawn_agent(&config);
    // The fleet asks for the inventory on connect; it lists the declared action.
    fleet.wait_device("dev-a", LONG, "inventory with selftest", |d| {
        d.inventory
            .clone()
            .and_then(|v| serde_json::from_value::<Inventory>(v).ok())
            .is_some_and(|inv| inv.actions.iter().any(|a| a.name.as_str() == "selftest"))
    });

    // Outside the schema: refused here, naming the argument and the allowed values.
    for (args, needle) in [
        (&["--arg", "level=slow"][..], "not one of: quick, full"),
        (
            &["--arg", "level=quick", "--arg", "colour=red"],
            "\"colour\" is not declared",
        ),
        (&[][..], "\"level\" is required"),
    ] {
        let mut argv = vec!["send", "dev-a", "selftest", "--timeout", "20"];
        argv.extend_from_slice(args);
        let out = fleet.cli(&argv);
        assert_eq!(out.status.code(), Some(1), "{argv:?}: {}", stdout(&out));
        let err = stderr(&out);
        assert!(
            err.contains("selftest") && err.contains(needle),
            "{argv:?}: {err}"
        );
    }

    // Within it: runs on the device, its output comes back (`quick`: `full`
    // also reads /var/lib/edgebind, which exists on an image, not here).
    let out = fleet.cli(&[
        "send",
        "dev-a",
        "selftest",
        "--arg",
        "level=quick",
        "--timeout",
        "30",
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\nagent log:\n{}",
        stderr(&out),
        agent.log()
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["outcome"], "succeeded", "{v}");
    let printed = v[0]["output"]["stdout"].as_str().unwrap_or_default();
    assert!(
        printed.contains("selftest level=quick") && printed.contains("selftest ok"),
        "{v}"
    );

    // The refused sends never reached the broker: the fleet service saw one
    // selftest command on the command topics, the one that ran.
    fleet.wait_device("dev-a", LONG, "the selftest result recorded", |_| {
        selftest_commands(&fleet) >= 1
    });
    assert_eq!(selftest_commands(&fleet), 1);
}
