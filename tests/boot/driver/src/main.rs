//! QEMU boot test driver, run by tests/boot/run (which builds the disks).
//! What it proves, in order (see tests/boot/README.md):
//! 1. factory path: an identity bundle written by `edgebind image
//!    personalize` onto the FAT boot partition is imported on first boot and
//!    erased from the partition;
//! 2. the agent comes `online` over mTLS (retained status, seen by an
//!    operator) with the booted kernel's boot id;
//! 3. under systemd it runs as the non-root user `edgebind`, logs to the
//!    journal, and `systemd-analyze security` rates its unit <= 2.0;
//! 4. a `reboot` command reboots the guest exactly once: the device comes
//!    back online with a new boot id and the redelivered command does not
//!    run again;
//! 5. after revocation (CRL + broker reload) the rebooted device cannot
//!    reconnect;
//! 6. the layer's example action (`selftest`, from its recipe's files) runs on
//!    request and its output comes back, and an action can write only where
//!    it declared and gains no privileges: in the agent's own sandbox and as
//!    a transient systemd unit made with the agent's properties.
//!
//! Then, with `--claim-root-disk`, claim first boot ([`claim`]): a second VM
//! whose boot partition holds only its batch's claim bundle makes its own key
//! and comes online under its own id.

mod b64;
mod bootdisk;
mod claim;
mod confinement;
mod control;
mod fleet;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use edgebind_protocol::messages::CommandStatus;

use crate::control::{ControlListener, Guest};
use crate::fleet::{Fleet, normalize_boot_id};
use crate::vm::{Vm, VmConfig};

/// The device the VM becomes.
const DEVICE: &str = "qemu-0001";
/// Generous per-boot limit under TCG on a loaded 2-core machine (measured 18–35 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// A reboot request must have shut the guest down within this.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the device must stay up, online and un-rebooted after coming
/// back, for "the redelivered reboot did not run again".
const NO_SECOND_REBOOT_WINDOW: Duration = Duration::from_secs(40);
/// How long a revoked device is given to (fail to) reconnect.
const REVOKED_WINDOW: Duration = Duration::from_secs(40);
/// The hardening target from the layer's issue.
const MAX_EXPOSURE: f64 = 2.0;
/// A declared action's result (the definitions allow 30 s; TCG is slow).
const ACTION_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Parser)]
#[command(
    about = "Boot the Edgebind test VM under QEMU (TCG) and check the agent end to end",
    after_help = "Normally run through tests/boot/run, which builds the disks:\n  \
        sudo tests/boot/run          # full scenario\n  \
        sudo tests/boot/run --bare   # VM plumbing only"
)]
struct Args {
    /// Kernel (from the cached base rootfs).
    #[arg(long)]
    kernel: PathBuf,
    /// Its initramfs.
    #[arg(long)]
    initrd: PathBuf,
    /// Root disk image built by tests/boot/assemble-image (the boots modify it).
    #[arg(long)]
    root_disk: PathBuf,
    /// Scratch directory for this run (console logs, boot disk); pid files of
    /// what the driver starts land here so tests/boot/run can clean up.
    #[arg(long)]
    workdir: PathBuf,
    /// The `edgebind` CLI: PKI, broker config/run, bundle, revoke, and the
    /// factory step `image personalize`.
    #[arg(long)]
    edgebind: PathBuf,
    /// Only boot, talk over the control channel, reboot and power off (no agent).
    #[arg(long)]
    bare: bool,
    /// Root disk of an image assembled with EDGEBIND_PROVISIONING=claim: after
    /// the bundle scenario, boot it with only a claim bundle (claim first boot).
    #[arg(long, conflicts_with = "bare")]
    claim_root_disk: Option<PathBuf>,
    /// Run only the claim first-boot scenario (needs --claim-root-disk).
    #[arg(long, requires = "claim_root_disk")]
    claim_only: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = if args.bare {
        bare(&args)
    } else {
        let bundle = if args.claim_only {
            Ok(())
        } else {
            Scenario::run(&args)
        };
        // The claim VM runs even after a bundle failure: one run shows both.
        let claim = match &args.claim_root_disk {
            Some(disk) => claim::run(&args, disk),
            None => Ok(()),
        };
        match (bundle, claim) {
            (Ok(()), r) | (r, Ok(())) => r,
            (Err(b), Err(c)) => Err(anyhow::anyhow!("{b:#}\nclaim first boot: {c:#}")),
        }
    };
    match result {
        Ok(()) => {
            println!("boot test: PASS");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("boot test: FAIL: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn vm_config(args: &Args, ctl: &ControlListener, broker_port: u16) -> VmConfig {
    VmConfig {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        root_disk: args.root_disk.clone(),
        boot_disk: args.workdir.join("boot.img"),
        control_port: ctl.port(),
        broker_port,
        provisioning_port: None,
        serial: None,
        workdir: args.workdir.clone(),
    }
}

/// A booted VM with its control connection.
struct Booted {
    vm: Vm,
    guest: Guest,
}

fn boot(cfg: &VmConfig, ctl: &ControlListener, name: &str) -> anyhow::Result<Booted> {
    let mut vm = Vm::start(cfg, name)?;
    let guest = ctl
        .accept(Instant::now() + BOOT_TIMEOUT, || vm.check_running())
        .with_context(|| format!("{name} boot: waiting for the control channel"));
    match guest {
        Ok(guest) => {
            println!(
                "[{name}] control channel up {:.1}s after QEMU start (boot id {})",
                vm.started.elapsed().as_secs_f64(),
                guest.boot_id
            );
            Ok(Booted { vm, guest })
        }
        Err(e) => {
            print_console(&vm);
            Err(e)
        }
    }
}

struct Scenario<'a> {
    args: &'a Args,
    fleet: Fleet,
    cfg: VmConfig,
    ctl: ControlListener,
    /// Every boot so far, for the failure report.
    boots: Vec<String>,
    findings: Findings,
}

impl<'a> Scenario<'a> {
    fn run(args: &'a Args) -> anyhow::Result<()> {
        let fleet = Fleet::start(&args.edgebind, DEVICE, &args.workdir)?;
        let ctl = ControlListener::bind()?;
        let cfg = vm_config(args, &ctl, fleet.broker_port);
        Scenario::new(args, fleet, cfg, ctl).execute(Scenario::steps)
    }

    fn new(args: &'a Args, fleet: Fleet, cfg: VmConfig, ctl: ControlListener) -> Self {
        Scenario {
            args,
            fleet,
            cfg,
            ctl,
            boots: Vec::new(),
            findings: Findings::default(),
        }
    }

    /// Runs `steps`, then fails on any finding; on failure prints the report.
    fn execute(
        mut self,
        steps: impl FnOnce(&mut Self, &mut Option<Booted>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let s = &mut self;
        let mut current: Option<Booted> = None;
        let mut result = steps(s, &mut current);
        if result.is_ok() && !s.findings.0.is_empty() {
            result = Err(anyhow::anyhow!(
                "{} check(s) failed:\n- {}",
                s.findings.0.len(),
                s.findings.0.join("\n- ")
            ));
        }
        if let Err(e) = &result {
            s.report_failure(e, current.as_mut());
        }
        result
    }

    fn steps(&mut self, current: &mut Option<Booted>) -> anyhow::Result<()> {
        // Factory: bundle from the fleet PKI, onto the boot partition with the
        // real factory tool.
        let tar = self.fleet.device_bundle()?;
        bootdisk::create_blank(&self.cfg.boot_disk, &self.args.workdir)?;
        run_host(
            Command::new(&self.args.edgebind)
                .args(["image", "personalize", "--image"])
                .arg(&self.cfg.boot_disk)
                .arg("--bundle")
                .arg(&tar),
        )?;
        ensure!(
            bootdisk::has_identity(&self.cfg.boot_disk)?,
            "personalize left no identity.tar"
        );

        // Boot 1: first boot imports the identity; the agent comes online.
        let b = current.insert(self.boot("first")?);
        let t_online1 = self
            .fleet
            .wait_online(&b.guest.boot_id, BOOT_TIMEOUT, || b.vm.check_running())
            .context("first boot: waiting for the agent's `online`")?;
        let first_online = t_online1 - b.vm.started;
        println!(
            "[first] agent `online` (retained, mTLS) {:.1}s after QEMU start",
            first_online.as_secs_f64()
        );
        let first_boot_id = b.guest.boot_id.clone();
        let retained = self.fleet.retained_online(&first_boot_id)?;
        self.findings.check(
            retained,
            "a new subscriber gets the `online` status as a retained message",
            || "no retained `online` for this boot within 10 s".to_owned(),
        );
        check_under_systemd(&mut b.guest, &mut self.findings)?;
        check_declared_actions(&self.fleet, &mut self.findings)?;
        confinement::check(&mut b.guest, &self.fleet, &mut self.findings)?;

        // Reboot command, published retained so that the broker delivers it
        // again on every reconnect: the device must not run it twice.
        let t_cmd = Instant::now();
        let reboot_id = self
            .fleet
            .send("reboot-0001", edgebind_protocol::actions::REBOOT, true)?;
        println!("[first] sent `reboot` ({reboot_id}, QoS 1, retained)");
        let mut b = current.take().expect("booted");
        b.vm.wait_exit(SHUTDOWN_TIMEOUT)
            .inspect_err(|_| print_console(&b.vm))
            .context("the guest did not reboot after the `reboot` command")?;
        println!(
            "[first] guest rebooted (QEMU exited) {:.1}s after the command",
            t_cmd.elapsed().as_secs_f64()
        );
        drop(b);
        check_boot_partition_erased(&self.cfg.boot_disk, &mut self.findings)?;

        // Boot 2: back online with a new boot id; the command is not re-run.
        let b = current.insert(self.boot("second")?);
        ensure!(
            normalize_boot_id(&b.guest.boot_id) != normalize_boot_id(&first_boot_id),
            "the second boot reports the first boot's id"
        );
        let t_online2 = self
            .fleet
            .wait_online(&b.guest.boot_id, BOOT_TIMEOUT, || b.vm.check_running())
            .context("second boot: waiting for the agent's `online`")?;
        let reboot_to_online = t_online2 - t_cmd;
        println!(
            "[second] agent `online` again {:.1}s after the reboot command ({:.1}s after QEMU start)",
            reboot_to_online.as_secs_f64(),
            (t_online2 - b.vm.started).as_secs_f64()
        );
        let window_end = t_online2 + NO_SECOND_REBOOT_WINDOW;
        while Instant::now() < window_end {
            b.vm.check_running().context(
                "the guest went down again after coming back: the redelivered reboot ran twice?",
            )?;
            std::thread::sleep(Duration::from_millis(500));
        }
        println!(
            "[second] no second reboot within {}s of coming back",
            NO_SECOND_REBOOT_WINDOW.as_secs()
        );
        // The agent answers a redelivered id from its command journal by
        // repeating the recorded result: identical copies are one execution.
        let succeeded: Vec<_> = self
            .fleet
            .results(&reboot_id)
            .into_iter()
            .filter(|r| r.status == CommandStatus::Succeeded)
            .collect();
        let mut executions: Vec<String> = succeeded
            .iter()
            .map(|r| format!("{} {:?}", r.ts, r.output))
            .collect();
        executions.dedup();
        self.findings.check(
            executions.len() == 1,
            &format!("{reboot_id} succeeded exactly once (one recorded execution)"),
            || format!("`succeeded` results: {succeeded:?}"),
        );
        if let Some(out) = succeeded.first().and_then(|r| r.output.as_ref()) {
            let field = |k: &str| out.get(k).and_then(|v| v.as_str()).map(normalize_boot_id);
            self.findings.check(
                field("previous_boot_id") == Some(normalize_boot_id(&first_boot_id))
                    && field("boot_id") == Some(normalize_boot_id(&b.guest.boot_id)),
                "the `succeeded` result names the boot before and after the reboot",
                || format!("output {out}"),
            );
        }
        println!(
            "[second] redelivered {reboot_id} answered from the agent's journal {} time(s), not run",
            succeeded.len().saturating_sub(1)
        );
        let boots = b
            .guest
            .check("journalctl --list-boots --no-pager | tail -n +2 | wc -l")?;
        self.findings.check(
            boots.trim() == "2",
            "the guest's journal lists exactly 2 boots",
            || format!("it lists {}", boots.trim()),
        );
        println!(
            "[second] agent journal, last lines:\n{}",
            indent(
                &b.guest
                    .run("journalctl -b -u edgebind-agent --no-pager -o cat | tail -n 5")?
                    .text
            )
        );

        // Revoke, then reboot through the control channel: the new boot must
        // not get back in.
        let failures_before = tls_failures(&self.fleet.broker_log());
        self.fleet.revoke_device()?;
        println!("[second] device revoked (CRL + broker reload)");
        let b = current.take().expect("booted");
        let Booted { mut vm, guest } = b;
        guest.send_detached("systemctl reboot")?;
        vm.wait_exit(SHUTDOWN_TIMEOUT)
            .inspect_err(|_| print_console(&vm))?;
        drop(vm);
        let b = current.insert(self.boot("revoked")?);
        let until = Instant::now() + REVOKED_WINDOW;
        while Instant::now() < until {
            b.vm.check_running()?;
            ensure!(
                !self.fleet.saw_online(&b.guest.boot_id),
                "the revoked device came back online (boot {})",
                b.guest.boot_id
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let failures = tls_failures(&self.fleet.broker_log()) - failures_before;
        ensure!(
            failures > 0,
            "the broker logged no rejected TLS handshake from the revoked device"
        );
        println!(
            "[revoked] no `online` within {}s; broker rejected {failures} TLS handshake(s)",
            REVOKED_WINDOW.as_secs()
        );
        // tracing-journald stores the error as the F_ERROR field.
        let why = b.guest.run(
            "journalctl -b -u edgebind-agent --no-pager -o verbose \
             | grep -E '^ +(MESSAGE|F_ERROR|F_REASON)=' | tail -n 4",
        )?;
        println!(
            "[revoked] agent journal (message and structured error fields):\n{}",
            indent(&why.text)
        );
        self.findings.check(
            why.text.to_ascii_lowercase().contains("revoked"),
            "the agent's journal says the broker refused it as revoked",
            || why.text.clone(),
        );

        let Booted { mut vm, guest } = current.take().expect("booted");
        guest.send_detached("systemctl poweroff")?;
        vm.wait_exit(SHUTDOWN_TIMEOUT)?;
        check_boot_partition_erased(&self.cfg.boot_disk, &mut self.findings)?;

        println!(
            "boot test: QEMU start -> `online`: {:.1}s",
            first_online.as_secs_f64()
        );
        println!(
            "boot test: reboot command -> `online` again: {:.1}s",
            reboot_to_online.as_secs_f64()
        );
        Ok(())
    }

    fn boot(&mut self, name: &str) -> anyhow::Result<Booted> {
        self.boots.push(name.to_owned());
        boot(&self.cfg, &self.ctl, name)
    }

    /// Serial console of the last boot, the agent's journal (from the live
    /// guest, or read from the disk image when the VM is gone), what the
    /// operator received and the broker's log.
    fn report_failure(&mut self, e: &anyhow::Error, current: Option<&mut Booted>) {
        eprintln!("boot test: failure report ({e:#})\n");
        let mut journal = None;
        if let Some(b) = current {
            if b.vm.running() {
                journal = b
                    .guest
                    .run("journalctl -b --no-pager -u edgebind-agent -u edgebind-identity-import -u 'edgebind-reboot*'")
                    .ok()
                    .map(|o| o.text);
            }
            b.vm.kill();
        }
        if let Some(name) = self.boots.last() {
            print_console_file(&self.args.workdir.join(format!("console-{name}.log")), name);
        }
        let journal =
            journal.unwrap_or_else(|| journal_from_disk(&self.cfg.root_disk, &self.args.workdir));
        eprintln!("----- agent journal -----\n{journal}\n----- end journal -----");
        eprintln!(
            "----- operator received -----\n{}----- end -----",
            self.fleet.transcript()
        );
        if !self.fleet.broker_running() {
            eprintln!("(the broker is no longer running)");
        }
        let log = self.fleet.broker_log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!("----- broker log (last 60 lines) -----");
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
        eprintln!("----- end broker log -----");
    }
}

/// Failed checks that do not stop the scenario: all of them are reported
/// at the end (one run shows every problem), and any of them fails the test.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    /// Records `what` as passed (printed) or failed (kept for the verdict).
    fn check(&mut self, ok: bool, what: &str, detail: impl FnOnce() -> String) {
        if ok {
            println!("  ok: {what}");
        } else {
            let detail = detail();
            println!("  FAILED: {what}\n{}", indent(&detail));
            let finding = format!("{what}: {detail}");
            if !self.0.contains(&finding) {
                self.0.push(finding);
            }
        }
    }
}

/// Checks made inside the guest over the control channel on the first boot.
fn check_under_systemd(guest: &mut Guest, findings: &mut Findings) -> anyhow::Result<()> {
    let uid = guest.run(
        "pid=$(systemctl show -p MainPID --value edgebind-agent.service); \
         awk '/^Uid:/{print $2}' /proc/$pid/status; id -u edgebind",
    )?;
    let ids: Vec<&str> = uid.text.split_whitespace().collect();
    findings.check(
        ids.len() == 2 && ids[0] == ids[1] && ids[0] != "0",
        "the agent runs as the non-root user edgebind",
        || format!("process uid / edgebind uid: {}", uid.text.trim()),
    );

    let perms = guest.run(
        "stat -c '%U %a %n' /var/lib/edgebind/identity/device.key /var/lib/edgebind/identity/agent.toml",
    )?;
    findings.check(
        perms.rc == 0
            && perms
                .text
                .lines()
                .next()
                .is_some_and(|l| l.starts_with("edgebind 600 ")),
        "the identity was imported with the key owned by edgebind, mode 0600",
        || perms.text.clone(),
    );
    let left = guest.run("test ! -e /boot/edgebind/identity.tar || ls -la /boot/edgebind/")?;
    findings.check(
        left.rc == 0,
        "the identity bundle is gone from the mounted boot partition",
        || left.text.clone(),
    );

    // The layer's other pieces: tmpfiles (state dir), sysctl, the reboot path unit.
    let state = guest.run("stat -c '%U %a' /var/lib/edgebind")?;
    findings.check(
        state.text.trim() == "edgebind 700",
        "/var/lib/edgebind is edgebind's, mode 0700 (sysusers + tmpfiles)",
        || state.text.clone(),
    );
    let sysctl = guest.run(
        "sysctl -n kernel.kptr_restrict kernel.dmesg_restrict net.ipv4.conf.all.accept_redirects",
    )?;
    findings.check(
        sysctl.text.split_whitespace().collect::<Vec<_>>() == ["2", "1", "0"],
        "the layer's sysctl hardening is applied (kptr_restrict 2, dmesg_restrict 1, no redirects)",
        || sysctl.text.clone(),
    );
    let path = guest.run("systemctl is-active edgebind-reboot.path")?;
    findings.check(
        path.text.trim() == "active",
        "edgebind-reboot.path is watching for reboot requests",
        || path.text.clone(),
    );

    let journal = guest.run("journalctl -b -u edgebind-agent.service --no-pager -o cat")?;
    findings.check(
        journal.rc == 0 && journal.text.lines().count() >= 2,
        "the agent's logs are in the journal",
        || journal.text.clone(),
    );
    let lines: Vec<&str> = journal.text.lines().collect();
    println!(
        "  agent journal ({} lines this boot), last ones:\n{}",
        lines.len(),
        indent(&lines[lines.len().saturating_sub(3)..].join("\n"))
    );

    let security = guest.run("systemd-analyze security edgebind-agent.service --no-pager")?;
    let exposure = parse_exposure(&security.text);
    findings.check(
        exposure.is_some_and(|e| e <= MAX_EXPOSURE),
        &format!(
            "systemd-analyze security edgebind-agent.service: exposure {} <= {MAX_EXPOSURE}",
            exposure.map_or("?".to_owned(), |e| e.to_string())
        ),
        || security.text.clone(),
    );
    Ok(())
}

/// "→ Overall exposure level for edgebind-agent.service: 1.9 OK :-)" -> 1.9
/// (the verdict may end in an ASCII smiley with a colon of its own).
fn parse_exposure(text: &str) -> Option<f64> {
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for "))?;
    let (_, rest) = line.split_once(".service: ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// From the host, with the VM stopped: the bundle is not listed on the boot
/// partition and no private key bytes remain anywhere on it.
fn check_boot_partition_erased(disk: &Path, findings: &mut Findings) -> anyhow::Result<()> {
    let listing = bootdisk::listing(disk)?;
    findings.check(
        !bootdisk::has_identity(disk)?,
        "[host, mtools] edgebind/identity.tar is gone from the boot partition",
        || listing.clone(),
    );
    findings.check(
        !bootdisk::key_bytes_remain(disk)?,
        "[host] no private key bytes remain anywhere on the boot disk",
        || {
            "identity.tar was deleted, but its private key is still readable in the FAT \
             partition's free clusters (a plain rm on FAT only unlinks): the import must \
             overwrite the file before deleting it"
                .to_owned()
        },
    );
    Ok(())
}

/// Handshakes the broker refused (revoked/unknown certificates).
fn tls_failures(log: &str) -> usize {
    log.matches("certificate verify failed").count()
}

/// The guest's journal read from the (stopped) root disk with debugfs.
fn journal_from_disk(disk: &Path, workdir: &Path) -> String {
    let dir = workdir.join("journal-dump");
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return "(cannot create a journal dump directory)".into();
    }
    let dump = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump /var/log/journal {}", dir.display()))
        .arg(disk)
        .output();
    if let Err(e) = dump {
        return format!("(debugfs failed: {e})");
    }
    Command::new("journalctl")
        .arg("--directory")
        .arg(dir.join("journal"))
        .args([
            "--no-pager",
            "-u",
            "edgebind-agent",
            "-u",
            "edgebind-identity-import",
            "-n",
            "200",
        ])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_else(|e| format!("(journalctl failed: {e})"))
}

fn run_host(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

fn print_console(vm: &Vm) {
    print_console_file(&vm.console, &vm.name);
}

/// Prints a boot's serial console (on failure).
fn print_console_file(path: &Path, name: &str) {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            eprintln!("----- serial console ({name} boot) -----\n{text}\n----- end console -----")
        }
        Err(e) => eprintln!("(cannot read {}: {e})", path.display()),
    }
}

/// VM plumbing only: boot, run commands, reboot (= QEMU exit), boot again,
/// power off. Prints the timings.
fn bare(args: &Args) -> anyhow::Result<()> {
    let ctl = ControlListener::bind()?;
    let cfg = vm_config(args, &ctl, 9); // nothing listens: no broker here
    bootdisk::create_blank(&cfg.boot_disk, &args.workdir)?;
    let Booted { mut vm, mut guest } = boot(&cfg, &ctl, "bare1")?;
    for cmd in [
        "systemctl is-system-running --wait || systemctl --failed --no-pager",
        "systemd-analyze time",
        "findmnt /boot",
        "ip -br addr",
        "exec 3<>/dev/tcp/10.0.2.2/22 && echo reachable || echo 'host 10.0.2.2 unreachable (restrict=on)'",
    ] {
        let out = guest.run(cmd)?;
        println!("$ {cmd}  [rc {}]\n{}", out.rc, indent(&out.text));
    }
    let t = Instant::now();
    guest.send_detached("systemctl reboot")?;
    vm.wait_exit(SHUTDOWN_TIMEOUT)
        .inspect_err(|_| print_console(&vm))?;
    println!(
        "bare: QEMU exited {:.1}s after `systemctl reboot`",
        t.elapsed().as_secs_f64()
    );
    let Booted { mut vm, mut guest } = boot(&cfg, &ctl, "bare2")?;
    println!(
        "bare: reboot command -> control channel up again: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    println!("{}", guest.check("journalctl --list-boots --no-pager")?);
    guest.send_detached("systemctl poweroff")?;
    vm.wait_exit(SHUTDOWN_TIMEOUT)
        .inspect_err(|_| print_console(&vm))?;
    println!(
        "bare: boot partition listing after poweroff:\n{}",
        bootdisk::listing(&cfg.boot_disk)?
    );
    Ok(())
}

/// The image's declared actions through the real agent under systemd: the
/// inventory lists them, and the layer's example (`selftest`) runs with its
/// argument and its output comes back. What an action may write and which
/// privileges it has is `confinement::check`.
fn check_declared_actions(fleet: &Fleet, findings: &mut Findings) -> anyhow::Result<()> {
    use edgebind_protocol::actions::{Action, INVENTORY};
    use edgebind_protocol::messages::Inventory;
    use serde_json::{Map, Value, json};

    let args = |v: Value| -> Map<String, Value> { v.as_object().cloned().unwrap_or_default() };
    let inv = fleet.send("inventory-actions", INVENTORY, false)?;
    let inv = fleet.wait_final(&inv, ACTION_TIMEOUT)?;
    let names: Vec<String> = inv
        .output
        .clone()
        .and_then(|o| serde_json::from_value::<Inventory>(o).ok())
        .map(|i| i.actions.iter().map(|a| a.name.to_string()).collect())
        .unwrap_or_default();
    findings.check(
        names.iter().any(|n| n == "selftest") && names.iter().any(|n| n == "probe"),
        "the inventory lists the declared actions selftest (the layer's example) and probe",
        || format!("actions: {names:?}"),
    );

    let id = fleet.send_with_args(
        "selftest-0001",
        Action::new("selftest").map_err(anyhow::Error::msg)?,
        args(json!({"level": "full"})),
        false,
    )?;
    let r = fleet.wait_final(&id, ACTION_TIMEOUT)?;
    let out = r.output.clone().unwrap_or_default();
    let stdout = out["stdout"].as_str().unwrap_or_default();
    findings.check(
        r.status == CommandStatus::Succeeded
            && stdout.contains("selftest level=full")
            && stdout.contains("selftest ok"),
        "the layer's selftest action ran with level=full and its output came back",
        || format!("{r:?}"),
    );
    println!(
        "[first] selftest: {} in the {} sandbox, stdout:\n{}",
        r.status.as_str(),
        out["sandbox"],
        indent(stdout)
    );

    // What the probe may write and which privileges it has: confinement.rs.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_overall_exposure_line() {
        let text = "  NAME  DESCRIPTION  EXPOSURE\n✓ PrivateNetwork= ...\n\
                    → Overall exposure level for edgebind-agent.service: 1.9 OK 🙂\n";
        assert_eq!(parse_exposure(text), Some(1.9));
        assert_eq!(
            parse_exposure("→ Overall exposure level for x.service: 9.6 UNSAFE 😨"),
            Some(9.6)
        );
        assert_eq!(
            parse_exposure("→ Overall exposure level for edgebind-agent.service: 1.1 OK :-)"),
            Some(1.1)
        );
        assert_eq!(parse_exposure("nothing here"), None);
    }
}
