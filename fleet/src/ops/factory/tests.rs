//! The flashing station against a real PKI, a real SQLite registry and real
//! disk images (FAT made by mkfs.vfat), in temporary fleet homes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use edgebind_certs::{InitOptions, Pki};

use super::*;
use crate::registry::SqliteStore;

struct Station {
    tmp: tempfile::TempDir,
    home: FleetHome,
    store: SqliteStore,
}

impl Station {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let home = FleetHome::new(tmp.path().join("home"));
        Pki::init(&home.pki_dir(), &InitOptions::new("factory-test")).unwrap();
        let store = crate::registry::open_or_create(&home.registry_db()).unwrap();
        Station { tmp, home, store }
    }

    fn out(&self) -> PathBuf {
        self.tmp.path().join("out")
    }

    fn batch(&self, csv: &str, output: FactoryOutput) -> FactoryRun {
        FactoryRun {
            units: manifest::parse_manifest("m.csv", csv.as_bytes()).unwrap(),
            output,
            out: self.out(),
            station: "line-1".into(),
            operator: "alice".into(),
            validity_days: 30,
            broker: Some(AgentBroker::from_addr("broker.test:8883").unwrap()),
            reissue: false,
        }
    }

    fn run(&mut self, batch: &FactoryRun) -> FactoryReport {
        run(&self.home, &mut self.store, batch, |_| {}).unwrap()
    }

    fn inventory_len(&self) -> usize {
        self.home
            .open_pki()
            .unwrap()
            .inventory()
            .unwrap()
            .entries
            .len()
    }

    fn out_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.out())
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

const THREE: &str = "serial,device_id,board,tags\n\
    SN-1,,qemux86-64,line\n\
    SN-2,kitchen-2,qemux86-64,\n\
    SN-3,,raspberrypi3-64,eu;line\n";

/// A 40 MiB MBR image with a 16 MiB FAT partition at 1 MiB.
fn golden(dir: &Path) -> PathBuf {
    const MIB: u64 = 1 << 20;
    let path = dir.join("golden.wic");
    let mut f = File::create(&path).unwrap();
    f.set_len(40 * MIB).unwrap();
    let mut mbr = mbrman::MBR::new_from(&mut f, 512, [1, 2, 3, 4]).unwrap();
    mbr[1] = mbrman::MBRPartitionEntry {
        boot: mbrman::BOOT_INACTIVE,
        first_chs: mbrman::CHS::empty(),
        sys: 0x0c,
        last_chs: mbrman::CHS::empty(),
        starting_lba: (MIB / 512) as u32,
        sectors: (16 * MIB / 512) as u32,
    };
    mbr.write_into(&mut f).unwrap();
    drop(f);
    let out = Command::new("mkfs.vfat")
        .args(["-n", "BOOT", "--offset", "2048"])
        .arg(&path)
        .arg((16 * 1024).to_string())
        .output()
        .expect("mkfs.vfat (dosfstools) must be installed");
    assert!(out.status.success(), "{out:?}");
    path
}

/// Leave one free cluster on the golden image's boot partition (for the
/// identity directory), so no bundle fits.
fn fill_boot_partition(golden: &Path) {
    use std::io::Write;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(golden)
        .unwrap();
    let slice = fscommon::StreamSlice::new(f, 1 << 20, 17 << 20).unwrap();
    let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).unwrap();
    let cluster = u64::from(fs.cluster_size());
    let free = u64::from(fs.stats().unwrap().free_clusters()) * cluster;
    {
        let mut filler = fs.root_dir().create_file("filler.bin").unwrap();
        filler
            .write_all(&vec![0u8; (free - cluster) as usize])
            .unwrap();
    }
    fs.unmount().unwrap();
}

#[test]
fn a_batch_registers_records_and_writes_each_unit_and_a_rerun_issues_nothing() {
    let mut s = Station::new();
    let batch = s.batch(THREE, FactoryOutput::Bundles);
    let first = s.run(&batch);
    assert!(first.all_done(), "{first:?}");
    assert_eq!(first.made, 3);
    assert_eq!(s.out_files(), ["kitchen-2.tar", "sn-1.tar", "sn-3.tar"]);
    let records = s.store.manufacturing_records().unwrap();
    assert_eq!(records.len(), 3);
    for (rec, unit) in records.iter().zip(&first.units) {
        let device = s.store.device(&rec.device).unwrap();
        assert_eq!(rec.serial, unit.serial);
        assert_eq!(Some(&rec.cert_serial), unit.cert_serial.as_ref());
        assert_eq!(device.cert.unwrap().serial, rec.cert_serial);
        assert_eq!(
            (rec.station.as_str(), rec.operator.as_str()),
            ("line-1", "alice")
        );
        assert_eq!(rec.image_sha256, None, "bundle mode has no image");
    }
    assert_eq!(
        s.store
            .device(&DeviceId::new("sn-3").unwrap())
            .unwrap()
            .tags
            .len(),
        2
    );

    // Again: every unit skipped, no certificate issued, nothing rewritten.
    let inventory = s.inventory_len();
    let tar = std::fs::read(s.out().join("sn-1.tar")).unwrap();
    let again = s.run(&batch);
    assert_eq!((again.skipped, again.made, again.failed), (3, 0, 0));
    assert_eq!(s.inventory_len(), inventory);
    assert_eq!(std::fs::read(s.out().join("sn-1.tar")).unwrap(), tar);
    assert_eq!(s.store.manufacturing_records().unwrap(), records);

    // --reissue: a new certificate for each, recorded with the device.
    let reissue = FactoryRun {
        reissue: true,
        ..batch
    };
    let third = s.run(&reissue);
    assert_eq!(third.reissued, 3, "{third:?}");
    assert_eq!(s.inventory_len(), inventory + 3);
    let after = s.store.manufacturing_records().unwrap();
    for (old, new) in records.iter().zip(&after) {
        assert_ne!(old.cert_serial, new.cert_serial);
        let device = s.store.device(&new.device).unwrap();
        assert_eq!(device.cert.unwrap().serial, new.cert_serial);
    }
    assert_ne!(std::fs::read(s.out().join("sn-1.tar")).unwrap(), tar);
}

#[test]
fn a_failing_unit_is_reported_undone_and_the_batch_goes_on() {
    let mut s = Station::new();
    // sn-2's id is revoked; sn-4 clashes with a unit made under another serial.
    let mut first = s.batch(
        "serial,board\nSN-2,qemux86-64\nSN-4,qemux86-64\n",
        FactoryOutput::Bundles,
    );
    s.run(&first);
    let pki = s.home.open_pki().unwrap();
    crate::ops::revoke(
        &s.home,
        &mut s.store,
        &DeviceId::new("sn-2").unwrap(),
        crate::ops::Policy::Leave,
    )
    .unwrap();
    std::fs::remove_file(s.out().join("sn-2.tar")).unwrap();
    let records_before = s.store.manufacturing_records().unwrap();
    first.units = manifest::parse_manifest(
        "m.csv",
        "serial,device_id,board\nSN-1,,qemux86-64\nSN-9,sn-2,qemux86-64\nSN-5,sn-4,qemux86-64\nSN-6,,qemux86-64\n"
            .as_bytes(),
    )
    .unwrap();
    let inventory = s.inventory_len();
    let report = s.run(&first);
    assert_eq!((report.made, report.failed), (2, 2), "{report:?}");
    let revoked = &report.units[1];
    assert_eq!(revoked.outcome, Outcome::Failed);
    assert!(
        revoked.error.as_ref().unwrap().contains("sn-2 is revoked"),
        "{revoked:?}"
    );
    assert_eq!(revoked.label(), "line 3 (unit \"SN-9\", device sn-2)");
    assert!(
        report.units[2]
            .error
            .as_ref()
            .unwrap()
            .contains("already registered")
    );
    // Nothing issued for the two failures, nothing written for them.
    assert_eq!(s.inventory_len(), inventory + 2);
    assert_eq!(s.out_files(), ["sn-1.tar", "sn-4.tar", "sn-6.tar"]);
    let records = s.store.manufacturing_records().unwrap();
    assert_eq!(records.len(), records_before.len() + 2);
    assert!(
        records
            .iter()
            .all(|r| r.serial != "SN-9" && r.serial != "SN-5")
    );
    drop(pki);

    // A serial made as another device than the manifest now says.
    first.units = manifest::parse_manifest(
        "m.csv",
        "serial,device_id,board\nSN-1,other-1,qemux86-64\n".as_bytes(),
    )
    .unwrap();
    let report = s.run(&first);
    assert!(
        report.units[0]
            .error
            .as_ref()
            .unwrap()
            .contains("already made as device sn-1")
    );
}

#[test]
fn image_mode_writes_a_personalized_copy_per_unit_and_records_the_golden_digest() {
    let mut s = Station::new();
    let golden = golden(s.tmp.path());
    let before = std::fs::read(&golden).unwrap();
    let batch = s.batch(
        THREE,
        FactoryOutput::Image {
            golden: golden.clone(),
            partition: None,
        },
    );
    let report = s.run(&batch);
    assert!(report.all_done(), "{report:?}");
    assert_eq!(s.out_files(), ["kitchen-2.wic", "sn-1.wic", "sn-3.wic"]);
    let digest = sha256_file(&golden).unwrap();
    assert_eq!(report.image_sha256.as_deref(), Some(digest.as_str()));
    assert_eq!(
        std::fs::read(&golden).unwrap(),
        before,
        "the golden image is never written"
    );
    for r in s.store.manufacturing_records().unwrap() {
        assert_eq!(r.image_sha256.as_deref(), Some(digest.as_str()));
    }
    assert_ne!(std::fs::read(s.out().join("sn-1.wic")).unwrap(), before);
}

#[test]
fn an_image_that_cannot_take_a_bundle_stops_the_batch_and_leaves_nothing() {
    let mut s = Station::new();
    let golden = golden(s.tmp.path());
    fill_boot_partition(&golden);
    let batch = s.batch(
        THREE,
        FactoryOutput::Image {
            golden: golden.clone(),
            partition: None,
        },
    );
    let inventory = s.inventory_len();
    let report = s.run(&batch);
    assert_eq!(report.failed, 1, "{report:?}");
    assert!(
        report.units[0].error.as_ref().unwrap().contains("is full"),
        "{report:?}"
    );
    assert_eq!(report.units[1].outcome, Outcome::NotAttempted);
    assert!(report.stopped.is_some());
    assert!(s.out_files().is_empty(), "{:?}", s.out_files());
    assert!(s.store.manufacturing_records().unwrap().is_empty());
    assert!(matches!(
        s.store.device(&DeviceId::new("sn-1").unwrap()),
        Err(RegistryError::UnknownDevice(_))
    ));
    // The one certificate issued is revoked.
    let inv = s.home.open_pki().unwrap().inventory().unwrap();
    assert_eq!(inv.entries.len(), inventory + 1);
    assert!(inv.entries.last().unwrap().is_revoked());

    // No FAT boot partition at all: refused before anything is issued.
    let plain = s.tmp.path().join("plain.img");
    File::create(&plain).unwrap().set_len(1 << 20).unwrap();
    let batch = s.batch(
        THREE,
        FactoryOutput::Image {
            golden: plain,
            partition: None,
        },
    );
    let err = run(&s.home, &mut s.store, &batch, |_| {}).unwrap_err();
    assert!(err.to_string().contains("plain.img"), "{err}");
    assert_eq!(
        s.home
            .open_pki()
            .unwrap()
            .inventory()
            .unwrap()
            .entries
            .len(),
        inventory + 1
    );
}

#[test]
fn a_station_kit_without_the_root_key_makes_units_that_import_into_the_fleet_once() {
    let mut fleet = Station::new();
    let kit_dir = fleet.tmp.path().join("kit");
    let broker = AgentBroker::from_addr("broker.acme:8883").unwrap();
    let kit = station_kit(&fleet.home, &kit_dir, Some("line-7"), Some(&broker)).unwrap();
    assert!(kit_dir.join("pki").join(ISSUING_KEY).is_file());
    assert!(!kit_dir.join("pki").join(ROOT_KEY).exists(), "{kit:?}");
    assert!(
        station_kit(&fleet.home, &kit_dir, None, None).is_err(),
        "not over a kit"
    );

    let station = FleetHome::new(&kit_dir);
    assert_eq!(kit_station_name(&station).as_deref(), Some("line-7"));
    let mut local = station.open_registry().unwrap();
    let batch = FactoryRun {
        broker: None,
        ..fleet.batch(THREE, FactoryOutput::Bundles)
    };
    let report = run(&station, local.as_mut(), &batch, |_| {}).unwrap();
    assert_eq!(report.made, 3, "{report:?}");
    let tar = std::fs::read(fleet.out().join("sn-1.tar")).unwrap();
    assert!(
        String::from_utf8_lossy(&tar).contains("broker.acme"),
        "the kit's broker"
    );

    let exported = export(&station, local.as_ref()).unwrap();
    assert_eq!(exported.units.len(), 3);
    let fleet_inventory = fleet.inventory_len();
    let done = import(&fleet.home, &mut fleet.store, &exported).unwrap();
    assert_eq!(done.registry.added.len(), 3);
    assert_eq!(done.certificates_added, 3);
    assert_eq!(fleet.inventory_len(), fleet_inventory + 3);
    assert_eq!(
        fleet.store.manufacturing_records().unwrap(),
        local.manufacturing_records().unwrap()
    );
    // Again: nothing.
    let again = import(&fleet.home, &mut fleet.store, &exported).unwrap();
    assert_eq!(
        (again.registry.unchanged.len(), again.certificates_added),
        (3, 0)
    );
    // An imported device can be revoked in the fleet.
    crate::ops::revoke(
        &fleet.home,
        &mut fleet.store,
        &DeviceId::new("sn-1").unwrap(),
        crate::ops::Policy::Leave,
    )
    .unwrap();

    // A unit reissued at the station no longer matches: refused whole.
    let reissue = FactoryRun {
        reissue: true,
        broker: None,
        units: manifest::parse_manifest("m.csv", "serial,board\nSN-1,qemux86-64\n".as_bytes())
            .unwrap(),
        ..fleet.batch(THREE, FactoryOutput::Bundles)
    };
    run(&station, local.as_mut(), &reissue, |_| {}).unwrap();
    let changed = export(&station, local.as_ref()).unwrap();
    let before = fleet.store.manufacturing_records().unwrap();
    let err = import(&fleet.home, &mut fleet.store, &changed).unwrap_err();
    assert!(err.to_string().contains("\"SN-1\""), "{err}");
    assert_eq!(fleet.store.manufacturing_records().unwrap(), before);
}
