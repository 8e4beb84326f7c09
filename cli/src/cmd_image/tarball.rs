//! A minimal ustar reader/writer for identity bundles: four small regular
//! files at the top level, nothing else. Enough to validate a bundle before it
//! goes onto a device and to pack a bundle directory.

use anyhow::{Context, bail};

/// The files of an identity bundle, in bundle order.
pub use edgebind_protocol::bundle::NAMES as IDENTITY_FILES;

const BLOCK: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

/// Reads the regular-file entries of a tar archive; any other entry type
/// (directories, links, devices) is returned as an error naming it.
pub fn read(bytes: &[u8]) -> anyhow::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut pos = 0;
    while pos + BLOCK <= bytes.len() {
        let header = &bytes[pos..pos + BLOCK];
        if header.iter().all(|&b| b == 0) {
            return Ok(entries); // end-of-archive marker
        }
        verify_checksum(header).with_context(|| format!("tar header at byte {pos}"))?;
        let name = header_name(header)?;
        let size = octal(&header[124..136]).with_context(|| format!("size of {name}"))? as usize;
        let mode = octal(&header[100..108]).with_context(|| format!("mode of {name}"))? as u32;
        let kind = header[156];
        let data_start = pos + BLOCK;
        let data_end = data_start
            .checked_add(size)
            .filter(|&end| end <= bytes.len())
            .with_context(|| format!("tar entry {name} is truncated"))?;
        match kind {
            b'0' | 0 => entries.push(Entry {
                name,
                mode,
                data: bytes[data_start..data_end].to_vec(),
            }),
            b'5' if name == "./" || name == "." => {} // GNU tar's entry for the root itself
            other => bail!(
                "tar entry {name} is not a regular file (type '{}')",
                char::from(other)
            ),
        }
        pos = data_start + size.div_ceil(BLOCK) * BLOCK;
    }
    bail!("tar archive ends without its end-of-archive marker")
}

/// Checks that `entries` are exactly the four files of a device bundle or
/// of a claim bundle (an optional leading `./` is tolerated), none empty.
pub fn check_identity_files(entries: &[Entry]) -> anyhow::Result<()> {
    let mut names: Vec<&str> = entries
        .iter()
        .map(|e| e.name.strip_prefix("./").unwrap_or(&e.name))
        .collect();
    names.sort_unstable();
    let sorted = |kind: edgebind_protocol::bundle::Kind| {
        let mut v: Vec<&str> = kind.files().iter().map(|(n, _)| *n).collect();
        v.sort_unstable();
        v
    };
    let claim = sorted(edgebind_protocol::bundle::Kind::Claim);
    let mut wanted = IDENTITY_FILES.to_vec();
    wanted.sort_unstable();
    if names != wanted && names != claim {
        bail!(
            "expected exactly {} (or, for a claim bundle, {}) at the top level, found: {}",
            IDENTITY_FILES.join(", "),
            edgebind_protocol::bundle::CLAIM_FILES
                .map(|(n, _)| n)
                .join(", "),
            if names.is_empty() {
                "nothing".to_string()
            } else {
                names.join(", ")
            }
        );
    }
    if let Some(empty) = entries.iter().find(|e| e.data.is_empty()) {
        bail!("{} is empty", empty.name);
    }
    Ok(())
}

/// Writes a ustar archive of `entries` (owner root, mtime 0: reproducible).
pub fn write(entries: &[Entry]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for e in entries {
        if e.name.len() > 99 || e.name.contains('/') {
            bail!(
                "tar entry name {:?} unsupported (top-level, < 100 bytes)",
                e.name
            );
        }
        let mut h = [0u8; BLOCK];
        h[..e.name.len()].copy_from_slice(e.name.as_bytes());
        put_octal(&mut h[100..108], u64::from(e.mode));
        put_octal(&mut h[108..116], 0); // uid
        put_octal(&mut h[116..124], 0); // gid
        put_octal(&mut h[124..136], e.data.len() as u64);
        put_octal(&mut h[136..148], 0); // mtime
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        put_octal(&mut h[148..155], u64::from(sum));
        h[155] = b' ';
        out.extend_from_slice(&h);
        out.extend_from_slice(&e.data);
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    }
    out.resize(out.len() + 2 * BLOCK, 0);
    Ok(out)
}

fn header_name(h: &[u8]) -> anyhow::Result<String> {
    let field = |r: &[u8]| {
        let end = r.iter().position(|&b| b == 0).unwrap_or(r.len());
        String::from_utf8(r[..end].to_vec())
    };
    let name = field(&h[0..100]).context("tar entry name is not UTF-8")?;
    // POSIX ustar only: GNU headers ("ustar  ") keep atime/ctime where ustar
    // has the name prefix.
    let prefix = if &h[257..263] == b"ustar\0" {
        field(&h[345..500]).context("tar entry prefix is not UTF-8")?
    } else {
        String::new()
    };
    Ok(if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    })
}

fn verify_checksum(h: &[u8]) -> anyhow::Result<()> {
    let stored = octal(&h[148..156]).context("checksum field")?;
    let computed: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| u64::from(if (148..156).contains(&i) { b' ' } else { b }))
        .sum();
    if stored != computed {
        bail!("bad checksum (stored {stored}, computed {computed})");
    }
    Ok(())
}

fn octal(field: &[u8]) -> anyhow::Result<u64> {
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| char::from(b))
        .collect();
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).with_context(|| format!("{text:?} is not octal"))
}

/// Zero-padded octal that fills the field but its last byte (a NUL).
fn put_octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let text = format!("{value:0width$o}");
    field[..width].copy_from_slice(text.as_bytes());
    field[width] = 0;
}
