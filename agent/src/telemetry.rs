//! Health samples from sysinfo, refreshing only what is reported: CPU usage,
//! memory, the state directory's filesystem, network counters, and the SoC
//! temperature where the board exposes one.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use edgebind_protocol::messages::{NetCounters, Telemetry, UnixSeconds};
use sysinfo::{Components, DiskRefreshKind, Disks, Networks, System};

pub struct Sampler {
    system: System,
    networks: Networks,
    /// Only the disk holding the state directory, refreshed by itself.
    disks: Disks,
    disk_index: Option<usize>,
    thermal: Option<PathBuf>,
    components: Option<Components>,
}

impl Sampler {
    pub fn new(state_dir: &Path) -> Sampler {
        let mut system = System::new();
        // CPU use is a difference between two readings: take the first now.
        system.refresh_cpu_usage();
        let disks =
            Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage());
        let dir = state_dir
            .canonicalize()
            .unwrap_or_else(|_| state_dir.to_owned());
        // The longest mount point that is a prefix of the directory.
        let disk_index = disks
            .list()
            .iter()
            .enumerate()
            .filter(|(_, d)| dir.starts_with(d.mount_point()))
            .max_by_key(|(_, d)| d.mount_point().as_os_str().len())
            .map(|(i, _)| i);
        let thermal = find_soc_thermal_zone(Path::new("/sys/class/thermal"));
        // hwmon via sysinfo only when no thermal zone exists (costs a scan).
        let components = thermal
            .is_none()
            .then(Components::new_with_refreshed_list)
            .filter(|c| c.list().iter().any(|c| c.temperature().is_some()));
        Sampler {
            system,
            networks: Networks::new_with_refreshed_list(),
            disks,
            disk_index,
            thermal,
            components,
        }
    }

    pub fn sample(&mut self, now: UnixSeconds) -> Telemetry {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.networks.refresh(true);
        let (disk_total, disk_used) = match self.disk_index {
            Some(i) => {
                let disk = &mut self.disks.list_mut()[i];
                disk.refresh_specifics(DiskRefreshKind::nothing().with_storage());
                let total = disk.total_space();
                (total, total.saturating_sub(disk.available_space()))
            }
            None => (0, 0),
        };
        let load = System::load_average();
        let mut net: Vec<NetCounters> = self
            .networks
            .list()
            .iter()
            .filter(|(name, _)| name.as_str() != "lo")
            .map(|(name, data)| NetCounters {
                iface: name.clone(),
                rx_bytes: data.total_received(),
                tx_bytes: data.total_transmitted(),
            })
            .collect();
        net.sort_by(|a, b| a.iface.cmp(&b.iface));
        Telemetry {
            ts: now,
            cpu_pct: self.system.global_cpu_usage(),
            load_avg: [load.one, load.five, load.fifteen],
            mem_total_bytes: self.system.total_memory(),
            mem_used_bytes: self.system.used_memory(),
            disk_total_bytes: disk_total,
            disk_used_bytes: disk_used,
            uptime_s: System::uptime(),
            soc_temp_c: self.soc_temp(),
            net,
        }
    }

    fn soc_temp(&mut self) -> Option<f32> {
        if let Some(zone) = &self.thermal {
            let milli: f32 = std::fs::read_to_string(zone).ok()?.trim().parse().ok()?;
            return Some(milli / 1000.0);
        }
        let comps = self.components.as_mut()?;
        comps.refresh(false);
        comps.list().iter().find_map(|c| c.temperature())
    }

    /// Non-loopback addresses of the device, for the `online` status.
    pub fn addresses(&mut self) -> Vec<String> {
        self.networks.refresh(true);
        let mut out: Vec<String> = self
            .networks
            .list()
            .values()
            .flat_map(|d| d.ip_networks().iter().map(|n| n.addr))
            .filter(|a: &IpAddr| !a.is_loopback())
            .map(|a| a.to_string())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// The `temp` file of the thermal zone that looks like the SoC/CPU
/// (type containing "cpu" or "soc"), else the first zone with a reading.
fn find_soc_thermal_zone(root: &Path) -> Option<PathBuf> {
    let mut zones: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("thermal_zone"))
        })
        .filter(|p| p.join("temp").exists())
        .collect();
    zones.sort();
    let kind = |p: &Path| {
        std::fs::read_to_string(p.join("type"))
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    zones
        .iter()
        .find(|p| {
            let k = kind(p);
            k.contains("cpu") || k.contains("soc")
        })
        .or(zones.first())
        .map(|p| p.join("temp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_reports_memory_disk_and_uptime() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sampler::new(dir.path());
        let t = s.sample(1);
        assert!(t.mem_total_bytes > 0);
        assert!(t.disk_total_bytes > 0, "the temp dir's filesystem is found");
        assert!(t.uptime_s > 0);
        assert!((0.0..=100.0).contains(&t.cpu_pct));
    }

    #[test]
    fn prefers_the_cpu_thermal_zone() {
        let root = tempfile::tempdir().unwrap();
        for (zone, kind) in [
            ("thermal_zone0", "acpitz"),
            ("thermal_zone1", "cpu-thermal"),
        ] {
            let z = root.path().join(zone);
            std::fs::create_dir(&z).unwrap();
            std::fs::write(z.join("type"), kind).unwrap();
            std::fs::write(z.join("temp"), "48500\n").unwrap();
        }
        let found = find_soc_thermal_zone(root.path()).unwrap();
        assert!(found.starts_with(root.path().join("thermal_zone1")));
    }
}
