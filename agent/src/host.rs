//! Facts about the device read from /proc, /sys and /etc: boot id, uptime,
//! OS release, kernel, board model, serial. Every reader degrades to `None`
//! rather than failing: boards differ in what they expose.

use std::path::{Path, PathBuf};

use edgebind_protocol::messages::Inventory;

/// Where the kernel publishes the id of the current boot.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";
/// Overrides [`BOOT_ID_PATH`]: for containers and tests that need to
/// simulate a reboot (the id is read once at start).
pub const BOOT_ID_ENV: &str = "EDGEBIND_BOOT_ID_FILE";

/// Paths of the files the readers use (overridable for tests).
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub boot_id: PathBuf,
    pub os_release: Vec<PathBuf>,
    pub kernel_release: PathBuf,
    pub uptime: PathBuf,
    pub dt_model: PathBuf,
    pub dmi_product: PathBuf,
    pub dt_serial: PathBuf,
    pub cpuinfo: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            boot_id: std::env::var_os(BOOT_ID_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| BOOT_ID_PATH.into()),
            os_release: vec!["/etc/os-release".into(), "/usr/lib/os-release".into()],
            kernel_release: "/proc/sys/kernel/osrelease".into(),
            uptime: "/proc/uptime".into(),
            dt_model: "/proc/device-tree/model".into(),
            dmi_product: "/sys/class/dmi/id/product_name".into(),
            dt_serial: "/proc/device-tree/serial-number".into(),
            cpuinfo: "/proc/cpuinfo".into(),
        }
    }
}

/// A file's content without trailing NULs (device-tree strings) and blanks.
fn read_trimmed(path: &Path) -> Option<String> {
    let raw = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let t = text.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!t.is_empty()).then(|| t.to_owned())
}

impl HostPaths {
    /// The boot id, or "unknown" (the journal then cannot tell reboots apart,
    /// so a reboot command stays `accepted`; it never runs twice).
    pub fn boot_id(&self) -> String {
        read_trimmed(&self.boot_id).unwrap_or_else(|| "unknown".into())
    }

    pub fn uptime_s(&self) -> u64 {
        read_trimmed(&self.uptime)
            .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
            .map(|s| s as u64)
            .unwrap_or(0)
    }

    pub fn os_release(&self) -> Option<String> {
        self.os_release.iter().find_map(|p| {
            let text = std::fs::read_to_string(p).ok()?;
            text.lines().find_map(|l| {
                let v = l.strip_prefix("PRETTY_NAME=")?;
                Some(v.trim().trim_matches('"').trim_matches('\'').to_owned())
            })
        })
    }

    pub fn board_model(&self) -> Option<String> {
        read_trimmed(&self.dt_model).or_else(|| read_trimmed(&self.dmi_product))
    }

    pub fn serial(&self) -> Option<String> {
        read_trimmed(&self.dt_serial).or_else(|| {
            let text = std::fs::read_to_string(&self.cpuinfo).ok()?;
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                let v = v.trim();
                (k.trim() == "Serial" && !v.is_empty()).then(|| v.to_owned())
            })
        })
    }

    pub fn inventory(&self, agent_version: &str, boot_id: &str) -> Inventory {
        Inventory {
            agent_version: agent_version.to_owned(),
            os_release: self.os_release(),
            kernel: read_trimmed(&self.kernel_release),
            board_model: self.board_model(),
            serial: self.serial(),
            boot_id: Some(boot_id.to_owned()),
            // Filled in by the core from its action set.
            actions: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_device_tree_strings_and_cpuinfo_serial() {
        let d = tempfile::tempdir().unwrap();
        let w = |name: &str, body: &[u8]| {
            let p = d.path().join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let paths = HostPaths {
            boot_id: w("boot_id", b"1234-abcd\n"),
            os_release: vec![
                d.path().join("missing"),
                w(
                    "os-release",
                    b"NAME=X\nPRETTY_NAME=\"Edgebind Linux 1.0\"\n",
                ),
            ],
            kernel_release: w("osrelease", b"6.6.1\n"),
            uptime: w("uptime", b"123.45 400.00\n"),
            dt_model: w("model", b"Raspberry Pi 3 Model B Rev 1.2\0"),
            dmi_product: d.path().join("nope"),
            dt_serial: d.path().join("nope"),
            cpuinfo: w("cpuinfo", b"processor\t: 0\nSerial\t\t: 00000000deadbeef\n"),
        };
        let inv = paths.inventory("0.1.0", "1234-abcd");
        assert_eq!(paths.boot_id(), "1234-abcd");
        assert_eq!(paths.uptime_s(), 123);
        assert_eq!(inv.os_release.as_deref(), Some("Edgebind Linux 1.0"));
        assert_eq!(inv.kernel.as_deref(), Some("6.6.1"));
        assert_eq!(
            inv.board_model.as_deref(),
            Some("Raspberry Pi 3 Model B Rev 1.2")
        );
        assert_eq!(inv.serial.as_deref(), Some("00000000deadbeef"));
    }
}
