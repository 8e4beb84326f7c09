//! The flashing station end to end with the real `edgebind` binary: a batch
//! of units on MBR and GPT golden images (FAT made by mkfs.vfat, each unit's
//! bundle read back with mtools' `mcopy`), re-runs that issue nothing twice,
//! `--reissue`, each bad input leaving nothing behind, an offline station
//! kit without the root key, and its export imported into the fleet once.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use edgebind_fleet::ops::FleetHome;
use edgebind_fleet::registry::ManufacturingRecord;
use edgebind_image::Scheme;
use edgebind_tests::TestPki;
use edgebind_tests::cli::show;
use serde_json::Value;

// The image crate's golden-table writer, shared rather than written again.
#[path = "../../image/tests/common/mod.rs"]
mod common;

const MIB: u64 = 1024 * 1024;
const BOOT_START: u64 = MIB;
const BOOT_LEN: u64 = 16 * MIB;
const BROKER: &str = "broker.factory.test:8883";

/// A 40 MiB sparse golden image: partition 1 FAT (mkfs.vfat) at 1 MiB,
/// partition 2 Linux, as `image/tests/personalize.rs` builds them.
fn golden(dir: &Path, scheme: Scheme) -> PathBuf {
    let size = 40 * MIB;
    let path = dir.join(format!("golden-{scheme:?}.wic"));
    let mut f = File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let boot = (BOOT_START / 512, BOOT_LEN / 512);
    let linux = (boot.0 + boot.1, size / 512 - (boot.0 + boot.1) - 64);
    common::write_table(&mut f, scheme, boot, linux);
    drop(f);
    let out = Command::new("mkfs.vfat")
        .args(["-n", "BOOT", "--offset"])
        .arg((BOOT_START / 512).to_string())
        .arg(&path)
        .arg((BOOT_LEN / 1024).to_string())
        .output()
        .expect("mkfs.vfat (dosfstools) must be installed");
    assert!(out.status.success(), "{out:?}");
    path
}

/// A file of the boot partition as mtools reads it, or None when absent.
fn mtools_read(img: &Path, file: &str) -> Option<Vec<u8>> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-n", "-i"])
        .arg(format!("{}@@{BOOT_START}", img.display()))
        .arg(format!("::/{file}"))
        .arg(out.path())
        .output()
        .expect("mtools must be installed");
    status
        .status
        .success()
        .then(|| std::fs::read(out.path()).unwrap())
}

/// The files of a bundle tar.
fn tar_files(bytes: &[u8]) -> Vec<(String, String)> {
    let mut archive = tar::Archive::new(bytes);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            (name, text)
        })
        .collect()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn edgebind(home: &Path, args: &[&str]) -> Output {
    edgebind_tests::cli::run(home, args)
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", show(&o));
    o
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(o)))
}

fn records(home: &Path) -> Vec<ManufacturingRecord> {
    serde_json::from_slice(&ok(edgebind(home, &["factory", "records", "--json"])).stdout).unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const UNITS: &str = "serial,device_id,board,tags\n\
    ACME-0001,,raspberrypi3-64,line-1\n\
    ACME-0002,kitchen-2,raspberrypi3-64,\n\
    ACME/2024:0003,,qemux86-64,eu;line-1\n";

fn image_batch(scheme: Scheme) {
    let fleet = TestPki::new();
    let home = fleet.home();
    let work = tempfile::tempdir().unwrap();
    let golden = golden(work.path(), scheme);
    let before = std::fs::read(&golden).unwrap();
    let manifest = write(work.path(), "devices.csv", UNITS);
    let out = work.path().join("images");
    let run = ok(edgebind(
        home,
        &[
            "factory",
            "run",
            "--manifest",
            s(&manifest),
            "--image",
            s(&golden),
            "--out",
            s(&out),
            "--broker",
            BROKER,
            "--station",
            "line-1",
            "--operator",
            "alice",
            "--json",
        ],
    ));
    let report = json(&run);
    assert_eq!(report["made"], 3, "{report}");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("[3/3] line 4 (unit \"ACME/2024:0003\", device acme-2024-0003): made"),
        "{stderr}"
    );
    assert_eq!(
        files_in(&out),
        ["acme-0001.wic", "acme-2024-0003.wic", "kitchen-2.wic"],
        "no staging copy left"
    );
    assert_eq!(std::fs::read(&golden).unwrap(), before, "golden untouched");
    let digest = sha256(&golden);
    let recs = records(home);
    assert_eq!(recs.len(), 3);
    let registry = FleetHome::new(home).open_registry().unwrap();
    for r in &recs {
        assert_eq!(
            (r.station.as_str(), r.operator.as_str()),
            ("line-1", "alice")
        );
        assert_eq!(r.image_sha256.as_deref(), Some(digest.as_str()));
        let device = registry.device(&r.device).unwrap();
        assert_eq!(device.cert.as_ref().unwrap().serial, r.cert_serial);
        // The unit's image carries its own bundle, read back by mtools.
        let tar = mtools_read(
            &out.join(format!("{}.wic", r.device)),
            "edgebind/identity.tar",
        )
        .expect("identity.tar on the boot partition");
        let files = tar_files(&tar);
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["agent.toml", "device.crt", "device.key", "ca.crt"]);
        assert!(
            files[0].1.contains(&format!("\"{}\"", r.device)),
            "{}",
            files[0].1
        );
        assert!(files[0].1.contains("broker.factory.test"), "{}", files[0].1);
        let cn =
            edgebind_certs::inspect::first_cert_cn(&write(work.path(), "leaf.pem", &files[1].1))
                .unwrap();
        assert_eq!(cn, r.device.as_str());
    }
    assert_eq!(
        registry
            .device(&"acme-2024-0003".parse().unwrap())
            .unwrap()
            .tags
            .len(),
        2
    );
}

#[test]
fn a_batch_on_an_mbr_golden_image_personalizes_registers_and_records_every_unit() {
    image_batch(Scheme::Mbr);
}

#[test]
fn a_batch_on_a_gpt_golden_image_personalizes_registers_and_records_every_unit() {
    image_batch(Scheme::Gpt);
}

#[test]
fn a_rerun_issues_nothing_twice_and_reissue_gives_each_unit_a_new_certificate() {
    let fleet = TestPki::new();
    let home = fleet.home();
    let work = tempfile::tempdir().unwrap();
    let manifest = write(work.path(), "devices.csv", UNITS);
    let out = work.path().join("bundles");
    let args = [
        "factory",
        "run",
        "--manifest",
        s(&manifest),
        "--out",
        s(&out),
        "--broker",
        BROKER,
    ];
    ok(edgebind(home, &args));
    assert_eq!(
        files_in(&out),
        ["acme-0001.tar", "acme-2024-0003.tar", "kitchen-2.tar"]
    );
    let issued = fleet.pki_dir().join("issued.pem");
    let issued_before = std::fs::read(&issued).unwrap();
    let inventory_before = std::fs::read(fleet.pki_dir().join("inventory.json")).unwrap();
    let tar_before = std::fs::read(out.join("acme-0001.tar")).unwrap();
    let first = records(home);

    let again = ok(edgebind(home, &[&args[..], &["--json"]].concat()));
    let report = json(&again);
    assert_eq!(
        (report["skipped"].as_u64(), report["made"].as_u64()),
        (Some(3), Some(0))
    );
    assert_eq!(
        std::fs::read(&issued).unwrap(),
        issued_before,
        "nothing issued"
    );
    assert_eq!(
        std::fs::read(fleet.pki_dir().join("inventory.json")).unwrap(),
        inventory_before
    );
    assert_eq!(
        std::fs::read(out.join("acme-0001.tar")).unwrap(),
        tar_before
    );
    assert_eq!(records(home), first, "records unchanged");

    let reissued = ok(edgebind(
        home,
        &[&args[..], &["--reissue", "--json"]].concat(),
    ));
    assert_eq!(json(&reissued)["reissued"], 3);
    let after = records(home);
    let registry = FleetHome::new(home).open_registry().unwrap();
    for (old, new) in first.iter().zip(&after) {
        assert_eq!(old.device, new.device);
        assert_ne!(old.cert_serial, new.cert_serial);
        assert_eq!(
            registry.device(&new.device).unwrap().cert.unwrap().serial,
            new.cert_serial
        );
    }
    assert!(std::fs::read(&issued).unwrap().len() > issued_before.len());
    assert_ne!(
        std::fs::read(out.join("acme-0001.tar")).unwrap(),
        tar_before
    );
}

/// Fill the golden image's boot partition but one cluster (for the
/// identity directory), so no bundle fits.
fn fill_boot_partition(golden: &Path) {
    use std::io::Write;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(golden)
        .unwrap();
    let slice = fscommon::StreamSlice::new(f, BOOT_START, BOOT_START + BOOT_LEN).unwrap();
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
fn each_bad_input_is_a_clear_error_naming_unit_and_line_and_leaves_nothing_behind() {
    let fleet = TestPki::new();
    let home = fleet.home();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let issued = fleet.pki_dir().join("issued.pem");
    let issued_len = || std::fs::read(&issued).map(|b| b.len()).unwrap_or(0);
    let run = |manifest: &Path, extra: &[&str]| {
        edgebind(
            home,
            &[
                &[
                    "factory",
                    "run",
                    "--manifest",
                    s(manifest),
                    "--out",
                    s(&out),
                    "--broker",
                    BROKER,
                ][..],
                extra,
            ]
            .concat(),
        )
    };

    // Bad lines: refused whole, every one named.
    let bad = write(
        work.path(),
        "bad.csv",
        "serial,device_id,board\nGOOD-1,,qemux86-64\nBAD 2,,qemux86-64\nBAD-3,Bad/Id,qemux86-64\nGOOD-1,,qemux86-64\n",
    );
    let before = issued_len();
    let o = run(&bad, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for want in [
        "line 3 (unit \"BAD 2\")",
        "line 4 (unit \"BAD-3\")",
        "line 5 (unit \"GOOD-1\"): serial number appears again (first on line 2)",
        "nothing was made",
    ] {
        assert!(err.contains(want), "{want:?} in {err}");
    }
    assert_eq!(issued_len(), before);
    assert!(files_in(&out).is_empty());
    assert!(records(home).is_empty());

    // An image with no FAT boot partition: refused before anything is issued.
    let plain = work.path().join("plain.img");
    let mut f = File::create(&plain).unwrap();
    f.set_len(8 * MIB).unwrap();
    let mut mbr = mbrman::MBR::new_from(&mut f, 512, [5; 4]).unwrap();
    mbr[1] = mbrman::MBRPartitionEntry {
        boot: mbrman::BOOT_INACTIVE,
        first_chs: mbrman::CHS::empty(),
        sys: 0x83,
        last_chs: mbrman::CHS::empty(),
        starting_lba: 2048,
        sectors: 8192,
    };
    mbr.write_into(&mut f).unwrap();
    drop(f);
    let units = write(work.path(), "units.csv", UNITS);
    let o = run(&units, &["--image", s(&plain)]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("plain.img") && err.contains("no FAT boot partition"),
        "{err}"
    );
    assert_eq!(issued_len(), before);
    assert!(files_in(&out).is_empty());

    // A full boot partition: the first unit fails and is undone, the rest is not attempted.
    let full = golden(work.path(), Scheme::Mbr);
    fill_boot_partition(&full);
    let o = run(&units, &["--image", s(&full), "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let report = json(&o);
    assert_eq!(report["units"][0]["outcome"], "failed", "{report}");
    assert!(
        report["units"][0]["error"]
            .as_str()
            .unwrap()
            .contains("is full"),
        "{report}"
    );
    assert_eq!(report["units"][1]["outcome"], "not_attempted");
    assert!(files_in(&out).is_empty(), "{:?}", files_in(&out));
    assert!(records(home).is_empty());
    let pki = fleet.pki();
    let now = time::OffsetDateTime::now_utc();
    let inv = pki.inventory().unwrap();
    let of_unit: Vec<_> = inv.by_cn("acme-0001").collect();
    assert_eq!(of_unit.len(), 1);
    assert!(
        !of_unit[0].is_active(now),
        "the one certificate issued is revoked"
    );
    let registry = FleetHome::new(home).open_registry().unwrap();
    assert!(registry.device(&"acme-0001".parse().unwrap()).is_err());
    drop(registry);

    // A revoked id, and a serial already made as another device: those units
    // fail, the others are made, exit 1.
    ok(edgebind(
        home,
        &[
            "device",
            "add",
            "old-1",
            "--board",
            "qemux86-64",
            "--broker",
            BROKER,
        ],
    ));
    ok(edgebind(home, &["revoke", "old-1"]));
    let first = write(work.path(), "first.csv", "serial,board\nSN-7,qemux86-64\n");
    ok(run(&first, &[]));
    let mixed = write(
        work.path(),
        "mixed.csv",
        "serial,device_id,board\nSN-5,old-1,qemux86-64\nSN-6,,qemux86-64\nSN-7,other-7,qemux86-64\n",
    );
    let before = issued_len();
    let o = run(&mixed, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("line 2 (unit \"SN-5\", device old-1): FAILED: device id old-1 is revoked"),
        "{err}"
    );
    assert!(
        err.contains("line 4 (unit \"SN-7\", device other-7): FAILED: unit \"SN-7\" was already made as device sn-7"),
        "{err}"
    );
    assert!(
        err.contains("line 3 (unit \"SN-6\", device sn-6): made"),
        "{err}"
    );
    assert!(issued_len() > before);
    assert_eq!(files_in(&out), ["sn-6.tar", "sn-7.tar"]);
    let serials: Vec<String> = records(home).into_iter().map(|r| r.serial).collect();
    assert_eq!(serials, ["SN-6", "SN-7"]);
}

#[test]
fn a_station_kit_without_the_root_key_makes_units_whose_export_imports_into_the_fleet_once() {
    let fleet = TestPki::new();
    let home = fleet.home();
    let work = tempfile::tempdir().unwrap();
    let kit = work.path().join("kit");
    let o = ok(edgebind(
        home,
        &[
            "factory",
            "station-kit",
            "--out",
            s(&kit),
            "--station",
            "line-7",
            "--broker",
            BROKER,
        ],
    ));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no root CA key"));
    assert!(fleet.pki_dir().join("root-ca.key").is_file());
    assert!(!kit.join("pki/root-ca.key").exists());
    assert!(kit.join("pki/issuing-ca.key").is_file());

    // At the station: the kit alone, no --broker, no --station.
    let golden = golden(work.path(), Scheme::Gpt);
    let manifest = write(work.path(), "devices.csv", UNITS);
    let out = work.path().join("images");
    ok(edgebind(
        &kit,
        &[
            "factory",
            "run",
            "--manifest",
            s(&manifest),
            "--image",
            s(&golden),
            "--out",
            s(&out),
        ],
    ));
    let station_records = records(&kit);
    assert_eq!(station_records.len(), 3);
    assert!(station_records.iter().all(|r| r.station == "line-7"));
    let tar = mtools_read(&out.join("kitchen-2.wic"), "edgebind/identity.tar").unwrap();
    assert!(tar_files(&tar)[0].1.contains("broker.factory.test"));
    // The fleet knows nothing of them yet.
    assert!(records(home).is_empty());

    let export = work.path().join("line-7.json");
    ok(edgebind(&kit, &["factory", "export", "--out", s(&export)]));
    let first = json(&ok(edgebind(
        home,
        &["factory", "import", s(&export), "--json"],
    )));
    assert_eq!(
        first["registry"]["added"].as_array().unwrap().len(),
        3,
        "{first}"
    );
    assert_eq!(first["certificates_added"], 3);
    assert_eq!(records(home), station_records);
    let inventory = std::fs::read(fleet.pki_dir().join("inventory.json")).unwrap();
    let again = json(&ok(edgebind(
        home,
        &["factory", "import", s(&export), "--json"],
    )));
    assert_eq!(again["registry"]["unchanged"].as_array().unwrap().len(), 3);
    assert_eq!(again["certificates_added"], 0);
    assert_eq!(records(home), station_records);
    assert_eq!(
        std::fs::read(fleet.pki_dir().join("inventory.json")).unwrap(),
        inventory
    );
    // An imported unit is a fleet device like any other: it can be revoked here.
    ok(edgebind(home, &["revoke", "kitchen-2"]));

    // A unit reissued at the station conflicts: nothing of that import lands.
    let more = write(
        work.path(),
        "more.csv",
        "serial,board\nACME-0001,raspberrypi3-64\nNEW-9,qemux86-64\n",
    );
    ok(edgebind(
        &kit,
        &[
            "factory",
            "run",
            "--manifest",
            s(&more),
            "--out",
            s(&work.path().join("b")),
            "--reissue",
        ],
    ));
    let changed = work.path().join("changed.json");
    ok(edgebind(&kit, &["factory", "export", "--out", s(&changed)]));
    let before = records(home);
    let o = edgebind(home, &["factory", "import", s(&changed)]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("nothing imported") && err.contains("\"ACME-0001\""),
        "{err}"
    );
    assert_eq!(records(home), before, "NEW-9 not imported either");
    let registry = FleetHome::new(home).open_registry().unwrap();
    assert!(registry.device(&"new-9".parse().unwrap()).is_err());
}
