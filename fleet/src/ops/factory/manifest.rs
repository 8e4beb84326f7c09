//! The flashing station's unit manifest: a CSV file with a header row and
//! one line per unit.
//!
//! ```text
//! serial,device_id,board,tags
//! ACME-0001,,raspberrypi3-64,lab;eu
//! ACME-0002,rpi-kitchen,raspberrypi3-64,
//! ```
//!
//! `serial` and `board` are required; `device_id` and `tags` (separated by
//! `;` or spaces) may be empty or left out. Columns are found by their
//! header name, in any order; empty lines are skipped. Every bad line is reported with its line
//! number and unit, and a manifest with any bad line is refused whole.
//!
//! # The device id of a unit
//!
//! Without a `device_id`, the id is derived from the serial by
//! [`device_id_for_serial`]: ASCII letters lowercased, every character
//! other than a letter, digit, `-`, `_` or `.` replaced by `-`
//! (`ACME/2024:0001` becomes `acme-2024-0001`); the result must then be a
//! valid [`DeviceId`] (at most 64 bytes, starting with a letter or digit).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use edgebind_protocol::DeviceId;

use crate::registry::{Board, Tag};

/// Longest unit serial number.
pub const MAX_SERIAL_LEN: usize = 64;

/// One unit of the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestUnit {
    /// The line in the file (the header is line 1).
    pub line: u64,
    pub serial: String,
    pub id: DeviceId,
    pub board: Board,
    pub tags: BTreeSet<Tag>,
}

/// Why a manifest was refused: every bad line, each naming its line and unit.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest {path}: {why}")]
    File { path: String, why: String },
    #[error("manifest {path}: nothing was made; {} bad line(s):\n  {}", .problems.len(), .problems.join("\n  "))]
    Lines { path: String, problems: Vec<String> },
}

/// Whether `serial` is a unit serial number: 1 to [`MAX_SERIAL_LEN`]
/// printable ASCII characters without spaces or commas, starting with a
/// letter or digit.
pub fn check_serial(serial: &str) -> Result<(), String> {
    if serial.is_empty() {
        return Err("the serial number is empty".into());
    }
    if serial.len() > MAX_SERIAL_LEN {
        return Err(format!(
            "serial number {serial:?} is {} bytes long; at most {MAX_SERIAL_LEN} are allowed",
            serial.len()
        ));
    }
    if let Some((pos, ch)) = serial
        .char_indices()
        .find(|(_, c)| !c.is_ascii_graphic() || *c == ',')
    {
        return Err(format!(
            "serial number {serial:?} contains {ch:?} at position {pos}; only printable ASCII without spaces or commas is allowed"
        ));
    }
    if !serial.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "serial number {serial:?} must start with an ASCII letter or digit"
        ));
    }
    Ok(())
}

/// The default device id of a unit (see the module documentation): the
/// one rule of `edgebind_protocol`, shared with the claim flow.
pub use edgebind_protocol::ids::device_id_for_serial;

/// Read and check a manifest file.
pub fn read_manifest(path: &Path) -> Result<Vec<ManifestUnit>, ManifestError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| ManifestError::File {
        path: shown.clone(),
        why: e.to_string(),
    })?;
    parse_manifest(&shown, file)
}

/// Parse a manifest from `input` (`path` names it in errors).
pub fn parse_manifest(
    path: &str,
    mut input: impl std::io::Read,
) -> Result<Vec<ManifestUnit>, ManifestError> {
    let file_error = |why: String| ManifestError::File {
        path: path.to_owned(),
        why,
    };
    let mut text = Vec::new();
    input
        .read_to_end(&mut text)
        .map_err(|e| file_error(e.to_string()))?;
    // The csv reader skips empty lines without counting them: count from the
    // byte offset, so a line number is the one an editor shows.
    let line_at = |pos: Option<&csv::Position>| {
        pos.map_or(0, |p| {
            // A record's position may be the start of the empty lines before it.
            let mut end = (p.byte() as usize).min(text.len());
            while end < text.len() && matches!(text[end], b'\n' | b'\r') {
                end += 1;
            }
            1 + text[..end].iter().filter(|&&b| b == b'\n').count() as u64
        })
    };
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(false)
        .from_reader(&text[..]);
    let headers = reader
        .headers()
        .map_err(|e| file_error(format!("cannot read the header row: {e}")))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let (Some(serial_col), Some(board_col)) = (column("serial"), column("board")) else {
        return Err(file_error(format!(
            "the header row must name the columns serial and board (and optionally device_id, tags); it is {:?}",
            headers.iter().collect::<Vec<_>>().join(",")
        )));
    };
    let id_col = column("device_id");
    let tags_col = column("tags");
    if let Some(unknown) = headers.iter().find(|h| {
        !["serial", "board", "device_id", "tags"]
            .iter()
            .any(|k| h.eq_ignore_ascii_case(k))
    }) {
        return Err(file_error(format!(
            "unknown column {unknown:?} in the header row (known: serial, device_id, board, tags)"
        )));
    }

    let mut units = Vec::new();
    let mut problems = Vec::new();
    let mut serials: HashMap<String, u64> = HashMap::new();
    let mut ids: HashMap<DeviceId, u64> = HashMap::new();
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = line_at(e.position());
                problems.push(format!("line {line}: {e}"));
                continue;
            }
        };
        let line = line_at(record.position());
        let field = |col: Option<usize>| col.and_then(|c| record.get(c)).unwrap_or("");
        let serial = field(Some(serial_col)).to_owned();
        let unit = format!("line {line} (unit {serial:?})");
        let mut bad = |why: String| problems.push(format!("{unit}: {why}"));
        if let Err(why) = check_serial(&serial) {
            bad(why);
            continue;
        }
        let given = field(id_col);
        let id = if given.is_empty() {
            device_id_for_serial(&serial).map_err(|e| {
                format!("no device_id given and none can be derived from the serial: {e}")
            })
        } else {
            DeviceId::new(given).map_err(|e| e.to_string())
        };
        let id = match id {
            Ok(id) => id,
            Err(why) => {
                bad(why);
                continue;
            }
        };
        let board = match field(Some(board_col)).parse::<Board>() {
            Ok(b) => b,
            Err(e) => {
                bad(e.to_string());
                continue;
            }
        };
        let tags: Result<BTreeSet<Tag>, _> = field(tags_col)
            .split([';', ' '])
            .filter(|t| !t.is_empty())
            .map(str::parse::<Tag>)
            .collect();
        let tags = match tags {
            Ok(t) => t,
            Err(e) => {
                bad(e.to_string());
                continue;
            }
        };
        if let Some(first) = serials.insert(serial.clone(), line) {
            bad(format!(
                "serial number appears again (first on line {first})"
            ));
            continue;
        }
        if let Some(first) = ids.insert(id.clone(), line) {
            bad(format!("device id {id} is also the device of line {first}"));
            continue;
        }
        units.push(ManifestUnit {
            line,
            serial,
            id,
            board,
            tags,
        });
    }
    if !problems.is_empty() {
        return Err(ManifestError::Lines {
            path: path.to_owned(),
            problems,
        });
    }
    if units.is_empty() {
        return Err(file_error("no units (only a header row)".into()));
    }
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<ManifestUnit>, ManifestError> {
        parse_manifest("m.csv", text.as_bytes())
    }

    #[test]
    fn ids_are_derived_from_serials_by_the_documented_rule() {
        assert_eq!(
            device_id_for_serial("ACME/2024:0001").unwrap().as_str(),
            "acme-2024-0001"
        );
        assert_eq!(device_id_for_serial("sn_1.b").unwrap().as_str(), "sn_1.b");
        assert!(device_id_for_serial(&"X".repeat(65)).is_err());
    }

    #[test]
    fn a_manifest_reads_columns_by_name_with_optional_id_and_tags() {
        let units = parse(
            "board,serial,tags,device_id\n\
             raspberrypi3-64,SN-1,lab;eu,\n\
             \n\
             qemux86-64, SN-2 ,,kitchen-1\n",
        )
        .unwrap();
        assert_eq!(units.len(), 2);
        assert_eq!(
            (units[0].line, units[0].id.as_str(), units[0].tags.len()),
            (2, "sn-1", 2)
        );
        assert_eq!(
            (
                units[1].line,
                units[1].serial.as_str(),
                units[1].id.as_str()
            ),
            (4, "SN-2", "kitchen-1")
        );
        let no_optional = parse("serial,board\nA1,qemux86-64\n").unwrap();
        assert_eq!(no_optional[0].id.as_str(), "a1");
    }

    #[test]
    fn every_bad_line_is_named_with_its_unit_and_nothing_is_accepted() {
        let err = parse(
            "serial,device_id,board,tags\n\
             SN-1,,qemux86-64,\n\
             SN 2,,qemux86-64,\n\
             SN-3,Bad/Id,qemux86-64,\n\
             SN-4,,toaster,\n\
             SN-1,,qemux86-64,\n\
             SN-6,sn-1,qemux86-64,\n\
             SN-7,,qemux86-64,bad!tag\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "line 3 (unit \"SN 2\")",
            "line 4 (unit \"SN-3\")",
            "line 5 (unit \"SN-4\"): unknown board",
            "line 6 (unit \"SN-1\"): serial number appears again (first on line 2)",
            "line 7 (unit \"SN-6\"): device id sn-1 is also the device of line 2",
            "line 8 (unit \"SN-7\"): invalid tag",
        ] {
            assert!(err.contains(want), "{want:?} missing in:\n{err}");
        }
        assert!(err.contains("6 bad line(s)"), "{err}");
        let err = parse("id,board\nx,qemux86-64\n").unwrap_err().to_string();
        assert!(err.contains("serial and board"), "{err}");
        let err = parse("serial,board\n").unwrap_err().to_string();
        assert!(err.contains("no units"), "{err}");
        let err = parse("serial,board\nA,qemux86-64,extra\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
