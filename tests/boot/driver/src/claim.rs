//! Claim first boot in the VM (issue #13 §2): the root disk is assembled as
//! `EDGEBIND_PROVISIONING = "claim"` builds the image, the boot partition
//! holds only the batch's claim bundle (`edgebind factory claim-identity`,
//! written by `edgebind image personalize`), and QEMU gives the machine a
//! firmware serial number (SMBIOS) that is on the batch's allow-list
//! (`edgebind factory allow`). `edgebind fleet serve` answers on the broker's
//! provisioning listener, which the guest reaches through its own guestfwd.
//!
//! What it proves:
//! 1. the agent makes its key in the VM, claims over the provisioning
//!    listener and comes `online` (mTLS, retained) under the id its serial
//!    names, and answers a command as that device;
//! 2. the key is the agent's, mode 0600, under the state directory; the
//!    enrollment directory is gone and the claim key kept 0600 (for
//!    re-provisioning after an expiry); the certificate in the VM is the one
//!    the registry holds;
//! 3. the key never left: no private key anywhere on the fleet side (fleet
//!    home, registry, logs, what the operator received) is the VM's key, and
//!    the registry holds no private key at all;
//! 4. the claim bundle is erased from the boot partition, key bytes included.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use edgebind_protocol::UnitSerial;
use edgebind_protocol::messages::CommandStatus;

use crate::control::ControlListener;
use crate::fleet::{Fleet, FleetOptions};
use crate::vm::{BROKER_GUEST_PORT, GUEST_HOST_ADDR, PROVISIONING_GUEST_PORT};
use crate::{
    ACTION_TIMEOUT, Args, BOOT_TIMEOUT, Booted, SHUTDOWN_TIMEOUT, Scenario,
    check_boot_partition_erased, check_under_systemd, indent, run_host, vm_config,
};

/// The production batch and the unit's firmware serial (on its allow-list).
const BATCH: &str = "qemu-line";
const SERIAL: &str = "SN-QEMU-0001";
/// Where an x86 unit's serial is (the claim bundle names it; the layer's
/// udev rule makes it readable to the agent).
const SERIAL_FILE: &str = "/sys/class/dmi/id/product_serial";
/// File names of this scenario in the run's directory.
const TAG: &str = "claim-";

/// `edgebind fleet serve`, killed on Drop (pid file for tests/boot/run's trap).
struct Service {
    child: Child,
    pid_file: PathBuf,
    log: PathBuf,
}

impl Service {
    fn start(fleet: &Fleet, edgebind: &Path, workdir: &Path) -> anyhow::Result<Service> {
        let log = workdir.join(format!("{TAG}fleet-service.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(edgebind)
            .arg("--home")
            .arg(fleet.home())
            .args(["fleet", "serve", "--log-level", "info"])
            .args(["--broker", &format!("127.0.0.1:{}", fleet.broker_port)])
            .args(["--claim-board", "qemux86-64"])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting `edgebind fleet serve`")?;
        let pid_file = workdir.join(format!("{TAG}fleet-service.pid"));
        std::fs::write(&pid_file, child.id().to_string())?;
        let mut service = Service {
            child,
            pid_file,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = service.log();
            if text.contains("fleet service connected")
                && text.contains("provisioning listener connected")
            {
                return Ok(service);
            }
            if let Some(status) = service.child.try_wait()? {
                bail!("`edgebind fleet serve` exited ({status}):\n{text}");
            }
            if Instant::now() > deadline {
                bail!("`edgebind fleet serve` did not connect both listeners within 60 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// Boots the claim image once, checks, powers off.
pub fn run(args: &Args, root_disk: &Path) -> anyhow::Result<()> {
    let t0 = Instant::now();
    println!("[claim] claim first boot: batch {BATCH}, unit serial {SERIAL}");
    let serial = UnitSerial::new(SERIAL).map_err(anyhow::Error::msg)?;
    let device = serial.device_id();
    let fleet = Fleet::start_with(
        &args.edgebind,
        device.as_str(),
        &args.workdir,
        &FleetOptions {
            tag: TAG,
            provisioning: true,
        },
    )?;
    let service = Service::start(&fleet, &args.edgebind, &args.workdir)?;
    let ctl = ControlListener::bind()?;
    let mut cfg = vm_config(args, &ctl, fleet.broker_port);
    cfg.root_disk = root_disk.to_owned();
    cfg.boot_disk = args.workdir.join(format!("{TAG}boot.img"));
    cfg.provisioning_port = fleet.provisioning_port;
    cfg.serial = Some(SERIAL.to_owned());
    let result = Scenario::new(args, fleet, cfg, ctl).execute(|s, current| s.claim_steps(current));
    if result.is_err() {
        let log = service.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("----- fleet service log (last 40 lines) -----");
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
        eprintln!("----- end fleet service log -----");
    } else {
        ensure!(
            service.log().contains("unit provisioned"),
            "the fleet service logged no `unit provisioned`"
        );
        println!(
            "boot test: claim scenario (fleet, factory, boot, checks, poweroff): {:.0}s",
            t0.elapsed().as_secs_f64()
        );
    }
    result
}

impl Scenario<'_> {
    fn claim_steps(&mut self, current: &mut Option<Booted>) -> anyhow::Result<()> {
        // Factory: the batch's claim bundle and allow-list; the golden
        // image's boot partition gets the claim bundle, nothing per unit.
        let home = self.fleet.home().to_owned();
        let bundle_dir = home.join(format!("claim-{BATCH}"));
        self.fleet.cli(&[
            "factory",
            "claim-identity",
            "--batch",
            BATCH,
            "--out",
            path_str(&bundle_dir)?,
            "--broker",
            &format!("{GUEST_HOST_ADDR}:{BROKER_GUEST_PORT}"),
            "--provisioning-port",
            &PROVISIONING_GUEST_PORT.to_string(),
            "--serial-file",
            SERIAL_FILE,
        ])?;
        let serials = home.join("serials.txt");
        std::fs::write(&serials, format!("# batch {BATCH}\n{SERIAL}\n"))?;
        self.fleet.cli(&[
            "factory",
            "allow",
            "--batch",
            BATCH,
            "--serials",
            path_str(&serials)?,
        ])?;
        let tar = bundle_dir.with_extension("tar");
        bootdisk_with_claim(self, &tar)?;

        // First boot: import, key generation, claim, online as the device.
        let b = current.insert(self.boot("claim-first")?);
        let t_online = self
            .fleet
            .wait_online(&b.guest.boot_id, BOOT_TIMEOUT, || b.vm.check_running())
            .context("claim first boot: waiting for the provisioned device's `online`")?;
        let online = t_online - b.vm.started;
        println!(
            "[claim-first] {} `online` (retained, mTLS, its own certificate) {:.1}s after QEMU start",
            self.fleet.device,
            online.as_secs_f64()
        );
        let boot_id = b.guest.boot_id.clone();
        let retained = self.fleet.retained_online(&boot_id)?;
        self.findings.check(
            retained,
            "a new subscriber gets the provisioned device's `online` as a retained message",
            || "no retained `online` for this boot within 10 s".to_owned(),
        );

        // The agent under systemd as on the bundle image (user, key 0600,
        // bundle gone, state dir, sysctl, reboot path, journal, exposure).
        check_under_systemd(&mut b.guest, &mut self.findings)?;
        // The kernel makes the DMI serial root-only (0400); the layer's udev
        // rule opens it to the agent, which claimed with what it read there.
        let serial = b
            .guest
            .run(&format!("stat -c %a {SERIAL_FILE}; cat {SERIAL_FILE}"))?;
        self.findings.check(
            serial.text.split_whitespace().collect::<Vec<_>>() == ["444", SERIAL],
            &format!(
                "the firmware serial {SERIAL_FILE} is {SERIAL}, mode 0444 (the layer's udev rule)"
            ),
            || serial.text.clone(),
        );
        // What is left of the claim: its identity, kept 0600 for the agent
        // alone (it re-provisions the device if its certificate expires
        // offline; the batch key is in every unit's image anyway). The
        // enrollment directory (where the key waited for its certificate)
        // is gone from the existing state dir.
        let left = b.guest.run(
            "ls -A /var/lib/edgebind/identity; stat -c '%U %a' /var/lib/edgebind/identity/claim.key; \
             test -d /var/lib/edgebind/state && test ! -e /var/lib/edgebind/state/enroll",
        )?;
        let mut words: Vec<&str> = left.text.split_whitespace().collect();
        let mode: Vec<&str> = words.split_off(words.len().saturating_sub(2));
        words.sort_unstable();
        self.findings.check(
            left.rc == 0
                && words
                    == [
                        "agent.toml",
                        "ca.crt",
                        "claim.crt",
                        "claim.key",
                        "device.crt",
                        "device.key",
                    ]
                && mode == ["edgebind", "600"],
            "the enrollment directory is gone; the identity is the device's own, the claim identity kept (claim.key edgebind 0600)",
            || format!("rc {}: {}", left.rc, left.text),
        );
        let journal = b
            .guest
            .run("journalctl -b -u edgebind-agent -u edgebind-identity-import --no-pager -o cat")?;
        self.findings.check(
            journal.text.contains("claim bundle")
                && journal.text.contains("claiming a device identity"),
            "the journal shows the claim bundle imported and the agent claiming its identity",
            || journal.text.clone(),
        );

        // The key made in the VM is the certified one (the mTLS `online`
        // proves the VM holds the key of the certificate it presented); the
        // certificate in the VM is the registry's.
        let guest_key = sha256_line(&b.guest.check(
            "grep -v -- ----- /var/lib/edgebind/identity/device.key | base64 -d | sha256sum",
        )?)?;
        let guest_cert = sha256_line(&b.guest.check(
            "awk '/BEGIN CERTIFICATE/{f=1;next} /END CERTIFICATE/{exit} f' \
             /var/lib/edgebind/identity/device.crt | base64 -d | sha256sum",
        )?)?;
        let shown: serde_json::Value = serde_json::from_str(&self.fleet.cli(&[
            "device",
            "show",
            self.fleet.device.as_str(),
            "--json",
        ])?)
        .context("`edgebind device show --json`")?;
        let registry_cert =
            find_key(&shown, "fingerprint_sha256").map(|f| f.replace(':', "").to_ascii_lowercase());
        self.findings.check(
            registry_cert.as_deref() == Some(guest_cert.as_str()),
            "the registry holds the certificate the VM's agent installed",
            || format!("VM certificate sha256 {guest_cert}, registry: {shown}"),
        );
        let allowed = self
            .fleet
            .cli(&["factory", "allow", "--batch", BATCH, "--list", "--json"])?;
        self.findings.check(
            allowed.contains(SERIAL) && allowed.contains(self.fleet.device.as_str()),
            &format!(
                "the allow-list records {SERIAL} as provisioned ({})",
                self.fleet.device
            ),
            || allowed.clone(),
        );
        check_key_stayed_in_vm(self, &guest_key)?;

        // A command, answered by the device under its own id.
        let ping = self
            .fleet
            .send("claim-ping-0001", edgebind_protocol::actions::PING, false)?;
        let r = self.fleet.wait_final(&ping, ACTION_TIMEOUT)?;
        self.findings.check(
            r.status == CommandStatus::Succeeded,
            &format!("{} answered `ping` as itself", self.fleet.device),
            || format!("{r:?}"),
        );

        println!(
            "[claim-first] agent journal, last lines:\n{}",
            indent(
                &b.guest
                    .run("journalctl -b -u edgebind-agent --no-pager -o cat | tail -n 5")?
                    .text
            )
        );
        let Booted { mut vm, guest } = current.take().expect("booted");
        guest.send_detached("systemctl poweroff")?;
        vm.wait_exit(SHUTDOWN_TIMEOUT)?;
        check_boot_partition_erased(&self.cfg.boot_disk, &mut self.findings)?;
        println!(
            "boot test: claim first boot, QEMU start -> `online` as {}: {:.1}s",
            self.fleet.device,
            online.as_secs_f64()
        );
        Ok(())
    }
}

/// A blank boot disk with the claim bundle put on it by the factory tool.
fn bootdisk_with_claim(s: &Scenario<'_>, tar: &Path) -> anyhow::Result<()> {
    crate::bootdisk::create_blank(&s.cfg.boot_disk, &s.args.workdir)?;
    run_host(
        Command::new(&s.args.edgebind)
            .args(["image", "personalize", "--image"])
            .arg(&s.cfg.boot_disk)
            .arg("--bundle")
            .arg(tar),
    )?;
    ensure!(
        crate::bootdisk::has_identity(&s.cfg.boot_disk)?,
        "personalize left no identity.tar (the claim bundle)"
    );
    Ok(())
}

/// Every private key on the fleet's side (its home with the PKI, registry
/// and bundles, the broker's and the service's logs, what the operator
/// received) is one of the fleet's own: none is the key made in the VM. The
/// registry holds no private key at all.
fn check_key_stayed_in_vm(s: &mut Scenario<'_>, guest_key: &str) -> anyhow::Result<()> {
    let mut files = Vec::new();
    collect_files(s.fleet.home(), &mut files)?;
    for name in ["broker.log", "fleet-service.log"] {
        files.push(s.args.workdir.join(format!("{TAG}{name}")));
    }
    let mut keys = 0;
    let mut same = Vec::new();
    for file in &files {
        let Ok(bytes) = std::fs::read(file) else {
            continue;
        };
        for der in private_keys(&bytes) {
            keys += 1;
            if sha256_hex(&der) == guest_key {
                same.push(file.display().to_string());
            }
        }
    }
    for der in private_keys(s.fleet.transcript().as_bytes()) {
        if sha256_hex(&der) == guest_key {
            same.push("(what the operator received)".into());
        }
    }
    s.findings.check(
        same.is_empty() && keys > 0,
        &format!(
            "the VM's private key is nowhere on the fleet side ({} files, {keys} private keys of the fleet's own)",
            files.len()
        ),
        || format!("found in: {same:?} (private keys seen: {keys})"),
    );
    let registry =
        std::fs::read(s.fleet.home().join("registry.db")).context("reading the registry")?;
    let needle = b"PRIVATE KEY";
    s.findings.check(
        !registry.windows(needle.len()).any(|w| w == needle),
        "the registry holds no private key",
        || "registry.db contains a PEM private key".to_owned(),
    );
    Ok(())
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect_files(&entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

/// The DER of every PEM private key (PKCS#8, SEC1, PKCS#1) in `bytes`.
fn private_keys(bytes: &[u8]) -> Vec<Vec<u8>> {
    use rustls_pemfile::Item;
    rustls_pemfile::read_all(&mut &bytes[..])
        .filter_map(|item| match item.ok()? {
            Item::Pkcs8Key(k) => Some(k.secret_pkcs8_der().to_vec()),
            Item::Sec1Key(k) => Some(k.secret_sec1_der().to_vec()),
            Item::Pkcs1Key(k) => Some(k.secret_pkcs1_der().to_vec()),
            _ => None,
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `sha256sum`'s "HEX  -" line -> HEX.
fn sha256_line(line: &str) -> anyhow::Result<String> {
    let hex = line.split_whitespace().next().unwrap_or_default();
    ensure!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "not a sha256sum line: {line:?}"
    );
    Ok(hex.to_owned())
}

/// The first string value under `key` anywhere in `v`.
fn find_key(v: &serde_json::Value, key: &str) -> Option<String> {
    match v {
        serde_json::Value::Object(map) => map
            .get(key)
            .and_then(|x| x.as_str().map(str::to_owned))
            .or_else(|| map.values().find_map(|x| find_key(x, key))),
        serde_json::Value::Array(items) => items.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_kind_of_pem_private_key_and_nothing_else() {
        let key = dummy_pkcs8_pem();
        let text = format!(
            "log line\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n{key}trailer\n"
        );
        let found = private_keys(text.as_bytes());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0], [0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(private_keys(b"no keys here").is_empty());
    }

    /// A syntactically PEM PKCS#8 block (DER 30 03 02 01 00).
    fn dummy_pkcs8_pem() -> String {
        "-----BEGIN PRIVATE KEY-----\nMAMCAQA=\n-----END PRIVATE KEY-----\n".to_owned()
    }

    #[test]
    fn reads_sha256sum_lines() {
        let hex = "a".repeat(64);
        assert_eq!(sha256_line(&format!("{hex}  -\n")).unwrap(), hex);
        assert!(sha256_line("sha256sum: missing\n").is_err());
    }
}
