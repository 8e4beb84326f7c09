//! One QEMU virtual machine boot. Always TCG: /dev/kvm on these machines is
//! a PVM nested-virtualisation device that cannot run a stock Debian kernel.
//! `-no-reboot` turns a guest reboot into a QEMU exit; the harness then boots
//! the same disk again (faster under TCG than an in-place reset).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Address the guest uses for host services; QEMU's guestfwd forwards each
/// guest connection to a port on the host's 127.0.0.1.
pub const GUEST_HOST_ADDR: &str = "10.0.2.100";
/// Guest-side port of the control channel.
pub const CONTROL_GUEST_PORT: u16 = 47001;
/// Guest-side port of the broker (the identity bundle names this).
pub const BROKER_GUEST_PORT: u16 = 8883;
/// Guest-side port of the broker's provisioning listener (claim bundles name this).
pub const PROVISIONING_GUEST_PORT: u16 = 8884;

pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub root_disk: PathBuf,
    pub boot_disk: PathBuf,
    /// Host loopback ports behind the guestfwd addresses.
    pub control_port: u16,
    pub broker_port: u16,
    /// The broker's provisioning listener, forwarded to
    /// [`PROVISIONING_GUEST_PORT`] (claim first boot only).
    pub provisioning_port: Option<u16>,
    /// The machine's serial number in its firmware (SMBIOS type 1, read in
    /// the guest at /sys/class/dmi/id/product_serial), as on a real unit.
    pub serial: Option<String>,
    /// Where pid files go so that tests/boot/run can kill leftovers.
    pub workdir: PathBuf,
}

pub struct Vm {
    child: Option<Child>,
    /// Removed once QEMU is reaped, so that run's trap never kills a reused pid.
    pid_file: PathBuf,
    pub started: Instant,
    pub console: PathBuf,
    pub name: String,
}

impl Vm {
    /// Starts QEMU; `name` labels this boot's console log.
    pub fn start(cfg: &VmConfig, name: &str) -> anyhow::Result<Vm> {
        let console = cfg.workdir.join(format!("console-{name}.log"));
        let fwd = |guest_port: u16, host_port: u16| {
            format!(
                "guestfwd=tcp:{GUEST_HOST_ADDR}:{guest_port}-cmd:socat - TCP:127.0.0.1:{host_port}"
            )
        };
        // restrict=on: the guest reaches nothing but the two guestfwds (DHCP
        // still works); no host port is forwarded into the guest.
        let mut netdev = format!(
            "user,id=n0,restrict=on,{},{}",
            fwd(CONTROL_GUEST_PORT, cfg.control_port),
            fwd(BROKER_GUEST_PORT, cfg.broker_port)
        );
        if let Some(port) = cfg.provisioning_port {
            netdev.push(',');
            netdev.push_str(&fwd(PROVISIONING_GUEST_PORT, port));
        }
        let append = format!(
            "root=/dev/vda rw console=ttyS0 \
             edgebind.testctl={GUEST_HOST_ADDR}:{CONTROL_GUEST_PORT}"
        );
        let drive = |p: &Path| format!("file={},format=raw,if=virtio", p.display());
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-nodefaults", "-no-user-config", "-no-reboot"])
            .args([
                "-machine",
                "q35,accel=tcg",
                "-cpu",
                "max",
                "-m",
                "1024",
                "-smp",
                "2",
            ])
            .arg("-kernel")
            .arg(&cfg.kernel)
            .arg("-initrd")
            .arg(&cfg.initrd)
            .args(["-append", &append])
            .args(["-drive", &drive(&cfg.root_disk)])
            .args(["-drive", &drive(&cfg.boot_disk)])
            .args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"])
            .args(["-device", "virtio-rng-pci"])
            .args(
                cfg.serial
                    .iter()
                    .flat_map(|s| ["-smbios".to_owned(), format!("type=1,serial={s}")]),
            )
            .args(["-display", "none", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                cfg.workdir.join(format!("qemu-{name}.stderr")),
            )?);
        let child = cmd.spawn().context("starting qemu-system-x86_64")?;
        let pid_file = cfg.workdir.join(format!("qemu-{name}.pid"));
        std::fs::write(&pid_file, child.id().to_string())?;
        Ok(Vm {
            child: Some(child),
            pid_file,
            started: Instant::now(),
            console,
            name: name.to_owned(),
        })
    }

    /// Fails if QEMU has already exited (used while waiting for the guest).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self
            .child
            .as_mut()
            .map(|c| c.try_wait())
            .transpose()?
            .flatten()
        {
            bail!("QEMU ({} boot) exited unexpectedly: {status}", self.name);
        }
        Ok(())
    }

    /// Whether QEMU is still running.
    pub fn running(&mut self) -> bool {
        self.check_running().is_ok()
    }

    /// Waits for QEMU to exit by itself (guest reboot or poweroff).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            bail!("QEMU ({} boot) was already reaped", self.name);
        };
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                let _ = std::fs::remove_file(&self.pid_file);
                if !status.success() {
                    bail!("QEMU ({} boot) exited with {status}", self.name);
                }
                return Ok(self.started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("QEMU ({} boot) did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&self.pid_file);
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}
