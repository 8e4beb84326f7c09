use std::fs;
use std::process::Command;

use super::crates_inc::{self, Crate};
use super::{PersonalizeArgs, personalize_cmd, tarball};

const LOCK: &str = r#"
version = 4

[[package]]
name = "edgebind-agent"
version = "0.1.0"
dependencies = ["figlet-rs"]

[[package]]
name = "figlet-rs"
version = "0.1.5"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "4742a071cd9694fc86f9fa1a08fa3e53d40cc899d7ee532295da2d085639fbc5"

[[package]]
name = "zeroize"
version = "1.8.1"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "ced3678a2879b30306d323f4542626697a464a97c0a07c9aebf7ebca65cd4dde"
"#;

#[test]
fn crate_list_has_oe_core_layout_and_skips_workspace_members() {
    let crates = crates_inc::crates_from_lock(LOCK).unwrap();
    let expected = format!(
        "{}\n\n# from Cargo.lock\nSRC_URI += \" \\\n    crate://crates.io/figlet-rs/0.1.5 \\\n    \
         crate://crates.io/zeroize/1.8.1 \\\n\"\n\n\
         SRC_URI[figlet-rs-0.1.5.sha256sum] = \"4742a071cd9694fc86f9fa1a08fa3e53d40cc899d7ee532295da2d085639fbc5\"\n\
         SRC_URI[zeroize-1.8.1.sha256sum] = \"ced3678a2879b30306d323f4542626697a464a97c0a07c9aebf7ebca65cd4dde\"\n",
        crates_inc::HEADER
    );
    assert_eq!(crates_inc::render(&crates), expected);
}

#[test]
fn git_dependencies_are_refused_with_the_package_name() {
    let lock = format!(
        "{LOCK}\n[[package]]\nname = \"forked\"\nversion = \"0.2.0\"\n\
         source = \"git+https://example.org/forked.git#abc\"\n"
    );
    let err = crates_inc::crates_from_lock(&lock).unwrap_err();
    assert!(format!("{err:#}").contains("forked 0.2.0"), "{err:#}");
}

#[test]
fn differences_name_missing_and_stale_crates() {
    let old = crates_inc::render(&[Crate {
        name: "figlet-rs".into(),
        version: "0.1.4".into(),
        checksum: Some("00".into()),
    }]);
    let new = crates_inc::render(&crates_inc::crates_from_lock(LOCK).unwrap());
    let diff = crates_inc::describe_differences(&old, &new).join("\n");
    assert!(
        diff.contains("missing: crate://crates.io/figlet-rs/0.1.5"),
        "{diff}"
    );
    assert!(
        diff.contains("stale:   crate://crates.io/figlet-rs/0.1.4"),
        "{diff}"
    );
}

fn identity_entries() -> Vec<tarball::Entry> {
    tarball::IDENTITY_FILES
        .iter()
        .map(|n| tarball::Entry {
            name: n.to_string(),
            mode: edgebind_protocol::bundle::mode_of(n).unwrap(),
            data: format!("contents of {n}\n").into_bytes(),
        })
        .collect()
}

#[test]
fn bundle_tar_round_trips_and_system_tar_reads_it() {
    let entries = identity_entries();
    let bytes = tarball::write(&entries).unwrap();
    assert_eq!(tarball::read(&bytes).unwrap(), entries);
    tarball::check_identity_files(&entries).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.tar");
    fs::write(&path, &bytes).unwrap();
    let out = Command::new("tar")
        .arg("-tvf")
        .arg(&path)
        .output()
        .expect("tar must be installed");
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("-rw------- 0/0") && listing.contains("device.key"),
        "{listing}"
    );
}

#[test]
fn bundles_made_by_gnu_tar_are_read() {
    let dir = tempfile::tempdir().unwrap();
    for e in identity_entries() {
        fs::write(dir.path().join(&e.name), &e.data).unwrap();
    }
    let tar = dir.path().join("gnu.tar");
    let status = Command::new("tar")
        .arg("--format=gnu")
        .arg("-C")
        .arg(dir.path())
        .arg("-cf")
        .arg(&tar)
        .args(["./agent.toml", "./device.crt", "./device.key", "./ca.crt"])
        .status()
        .expect("tar must be installed");
    assert!(status.success());
    let entries = tarball::read(&fs::read(&tar).unwrap()).unwrap();
    tarball::check_identity_files(&entries).unwrap();
    assert_eq!(entries[0].name, "./agent.toml");
    assert_eq!(entries[0].data, b"contents of agent.toml\n");
}

#[test]
fn bundle_with_extra_or_missing_files_is_refused() {
    let mut entries = identity_entries();
    entries.pop();
    let err = tarball::check_identity_files(&entries).unwrap_err();
    assert!(
        err.to_string()
            .contains("found: agent.toml, device.crt, device.key"),
        "{err}"
    );
    let mut entries = identity_entries();
    entries.push(tarball::Entry {
        name: "extra".into(),
        mode: 0o644,
        data: b"x".to_vec(),
    });
    assert!(tarball::check_identity_files(&entries).is_err());
}

/// An MBR sector with the given (type, start LBA, sectors) entries, written
/// by hand so the fixture does not share code with the reader under test.
fn mbr_sector(entries: &[(u8, u32, u32)]) -> Vec<u8> {
    let mut s = vec![0u8; 512];
    for (i, (kind, start, len)) in entries.iter().enumerate() {
        let e = 446 + 16 * i;
        s[e + 4] = *kind;
        s[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        s[e + 12..e + 16].copy_from_slice(&len.to_le_bytes());
    }
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// A 12 MiB disk image laid out like wic's: FAT boot partition at 1 MiB,
/// a Linux partition after it. Needs mkfs.vfat (dosfstools) and mtools.
fn disk_image(dir: &std::path::Path) -> std::path::PathBuf {
    let img = dir.join("disk.wic");
    let mut bytes = vec![0u8; 12 * 1024 * 1024];
    bytes[..512].copy_from_slice(&mbr_sector(&[(0x0c, 2048, 16384), (0x83, 18432, 6144)]));
    fs::write(&img, &bytes).unwrap();
    let fat = dir.join("fat.img");
    let status = Command::new("mkfs.vfat")
        .args(["-C", "-n", "boot"])
        .arg(&fat)
        .arg("8192") // KiB
        .stdout(std::process::Stdio::null())
        .status()
        .expect("mkfs.vfat (dosfstools) must be installed");
    assert!(status.success());
    let fat = fs::read(&fat).unwrap();
    bytes[2048 * 512..2048 * 512 + fat.len()].copy_from_slice(&fat);
    fs::write(&img, &bytes).unwrap();
    img
}

fn read_back(img: &std::path::Path, offset: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.tar");
    let status = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{offset}", img.display()))
        .arg("::/edgebind/identity.tar")
        .arg(&out)
        .status()
        .expect("mcopy (mtools) must be installed");
    assert!(
        status.success(),
        "edgebind/identity.tar is not on the FAT partition"
    );
    fs::read(out).unwrap()
}

#[test]
fn personalize_puts_the_bundle_on_the_fat_partition_and_can_redo_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path());
    let bundle_dir = dir.path().join("bundle");
    fs::create_dir(&bundle_dir).unwrap();
    for e in identity_entries() {
        fs::write(bundle_dir.join(&e.name), &e.data).unwrap();
    }

    // A directory bundle, written into a copy: the original stays untouched.
    let copy = dir.path().join("dev-a.wic");
    let args = PersonalizeArgs {
        image: img.clone(),
        bundle: bundle_dir.clone(),
        output: Some(copy.clone()),
        partition: None,
    };
    personalize_cmd(&args).unwrap();
    let on_disk = read_back(&copy, 2048 * 512);
    let entries = tarball::read(&on_disk).unwrap();
    tarball::check_identity_files(&entries).unwrap();
    assert_eq!(
        entries
            .iter()
            .find(|e| e.name == "device.key")
            .unwrap()
            .mode,
        0o600
    );

    // A tar bundle, in place, twice (a factory line may retry a station).
    let tar = dir.path().join("dev-b.tar");
    let mut b = identity_entries();
    b[0].data = b"device_id = \"dev-b\"\n".to_vec();
    fs::write(&tar, tarball::write(&b).unwrap()).unwrap();
    let args = PersonalizeArgs {
        image: img.clone(),
        bundle: tar.clone(),
        output: None,
        partition: Some(1),
    };
    personalize_cmd(&args).unwrap();
    personalize_cmd(&args).unwrap();
    assert_eq!(read_back(&img, 2048 * 512), fs::read(&tar).unwrap());

    // Partition 2 is Linux: refused, naming it.
    let args = PersonalizeArgs {
        image: img,
        bundle: tar,
        output: None,
        partition: Some(2),
    };
    let err = personalize_cmd(&args).unwrap_err();
    assert!(
        format!("{err:#}").contains("partition 2 holds no FAT file system"),
        "{err:#}"
    );
}

#[test]
fn personalize_refuses_a_bundle_that_is_not_an_identity() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path());
    let tar = dir.path().join("bad.tar");
    let mut entries = identity_entries();
    entries.truncate(2);
    fs::write(&tar, tarball::write(&entries).unwrap()).unwrap();
    let args = PersonalizeArgs {
        image: img,
        bundle: tar,
        output: None,
        partition: None,
    };
    let err = personalize_cmd(&args).unwrap_err();
    assert!(
        format!("{err:#}").contains("is not an identity bundle"),
        "{err:#}"
    );
}

/// The image's import script is shell (it runs before the agent, on the
/// device): it cannot link the contract, so this holds it to it.
#[test]
fn the_identity_import_script_follows_the_bundle_contract() {
    use edgebind_protocol::bundle::{self, FILES, IDENTITY_TAR_ON_BOOT, NAMES};
    let script = include_str!(
        "../../../meta-edgebind/recipes-edgebind/edgebind-agent/files/edgebind-identity-import"
    );
    assert!(
        script.contains(&format!("FILES=\"{}\"\n", NAMES.join(" "))),
        "FILES= in the import script differs from {NAMES:?}"
    );
    assert!(
        script.contains(&format!("BUNDLE=$BOOT/{IDENTITY_TAR_ON_BOOT}\n")),
        "the import script looks elsewhere than {IDENTITY_TAR_ON_BOOT}"
    );
    assert!(script.contains(&format!("chmod {:04o} \"$staging\"\n", bundle::DIR_MODE)));
    // The certificate and key are named through $CERT and $KEY (a claim
    // image imports claim.crt/claim.key instead): a bundle image's defaults.
    assert!(script.contains(&format!("CERT={}\n", bundle::DEVICE_CERT)));
    assert!(script.contains(&format!("KEY={}\n", bundle::DEVICE_KEY)));
    assert!(script.contains(&format!("CERT={}\n", bundle::CLAIM_CERT)));
    assert!(script.contains(&format!("KEY={}\n", bundle::CLAIM_KEY)));
    for (name, mode) in FILES {
        let named = match name {
            n if n == bundle::DEVICE_CERT => "$CERT",
            n if n == bundle::DEVICE_KEY => "$KEY",
            n => n,
        };
        let chmod = script
            .lines()
            .find(|l| l.starts_with("chmod ") && l.contains(&format!("\"$staging/{named}\"")))
            .unwrap_or_else(|| panic!("the import script never sets the mode of {name}"));
        assert!(
            chmod.starts_with(&format!("chmod {mode:04o} ")),
            "{name}: {chmod}"
        );
    }
}

/// The fuzz set of the bundle tar reader (`personalize --bundle` reads
/// whatever file it is given before anything goes onto an image): any
/// bytes, and valid bundles with bytes flipped or cut off, are entries or an
/// error, never a panic; what `write` makes `read` returns unchanged; and
/// the PKI's own tars (made with the `tar` crate) pass the check.
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    fn entry() -> impl Strategy<Value = tarball::Entry> {
        (
            "[a-z][a-z0-9._-]{0,40}",
            0u32..0o10000,
            prop::collection::vec(any::<u8>(), 0..1500),
        )
            .prop_map(|(name, mode, data)| tarball::Entry { name, mode, data })
    }

    fn read_or_refuse(bytes: &[u8]) -> Result<(), TestCaseError> {
        match tarball::read(bytes) {
            Ok(entries) => {
                let total: usize = entries.iter().map(|e| e.data.len()).sum();
                prop_assert!(total <= bytes.len());
                if let Err(e) = tarball::check_identity_files(&entries) {
                    prop_assert!(!e.to_string().is_empty());
                }
            }
            Err(e) => {
                let message = format!("{e:#}");
                prop_assert!(!message.is_empty());
            }
        }
        Ok(())
    }

    fn pki_tar(cert: &str, key: &str, ca: &str, toml: &str) -> Vec<u8> {
        let now = time::OffsetDateTime::UNIX_EPOCH;
        let issued = edgebind_certs::IssuedCert {
            principal: None,
            cn: "dev-a".into(),
            serial: "01".into(),
            fingerprint_sha256: "00".into(),
            not_before: now,
            not_after: now,
            cert_pem: cert.into(),
            chain_pem: cert.into(),
            key_pem: key.into(),
            issuer_id: "00".into(),
        };
        edgebind_certs::bundle::tar_of(&issued, ca, toml).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_bytes_are_entries_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..3000)) {
            read_or_refuse(&bytes)?;
        }

        #[test]
        fn written_entries_read_back_unchanged(entries in prop::collection::vec(entry(), 0..5)) {
            let bytes = tarball::write(&entries).unwrap();
            prop_assert_eq!(tarball::read(&bytes).unwrap(), entries);
        }

        #[test]
        fn a_damaged_bundle_is_read_or_refused(
            flips in prop::collection::vec((any::<Index>(), 1..=255u8), 1..5),
            cut in any::<Index>(),
        ) {
            let mut bytes = tarball::write(&identity_entries()).unwrap();
            for (i, m) in &flips {
                let at = i.index(bytes.len());
                bytes[at] ^= m;
            }
            read_or_refuse(&bytes)?;
            bytes.truncate(cut.index(bytes.len()));
            read_or_refuse(&bytes)?;
        }

        #[test]
        fn pki_bundles_are_identity_bundles(
            cert in "[ -~\n]{1,300}",
            key in "[ -~\n]{1,300}",
            ca in "[ -~\n]{1,300}",
            toml in "(?s).{1,300}",
        ) {
            let entries = tarball::read(&pki_tar(&cert, &key, &ca, &toml)).unwrap();
            tarball::check_identity_files(&entries).unwrap();
            let find = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
            prop_assert_eq!(&find("agent.toml").data, toml.as_bytes());
            prop_assert_eq!(&find("device.key").data, key.as_bytes());
            prop_assert_eq!(find("device.key").mode, 0o600);
            prop_assert_eq!(&find("ca.crt").data, ca.as_bytes());
        }
    }
}
