//! Working-set files: the order in which pages were first faulted on one run, replayed
//! first by the prefetcher on the next (the REAP idea). Format: the magic `UFWS0001`,
//! a little-endian `u64` count, then that many little-endian `u64` page indices.

use std::io::{Read, Write};
use std::path::Path;

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"UFWS0001";

/// Writes `pages` as a working-set file.
pub fn save(path: &Path, pages: &[u64]) -> Result<()> {
    let io = |source| Error::Io {
        what: "write working set",
        source,
    };
    let mut out = Vec::with_capacity(16 + pages.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
    let mut file = std::fs::File::create(path).map_err(io)?;
    file.write_all(&out).map_err(io)
}

/// Reads a working-set file, refusing anything malformed or naming pages beyond `pages`.
pub fn load(path: &Path, pages: usize) -> Result<Vec<u64>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| Error::Io {
            what: "read working set",
            source,
        })?;
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(Error::BadRecording("not a uffdkit working-set file".into()));
    }
    let count = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let body = &bytes[16..];
    if body.len() as u64 != count.saturating_mul(8) {
        return Err(Error::BadRecording(format!(
            "header says {count} pages, body holds {} bytes",
            body.len()
        )));
    }
    let list: Vec<u64> = body
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    if let Some(bad) = list.iter().find(|&&p| p >= pages as u64) {
        return Err(Error::BadRecording(format!(
            "page {bad} beyond the {pages} pages served"
        )));
    }
    Ok(list)
}
