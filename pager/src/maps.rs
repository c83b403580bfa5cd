//! The check of a MINOR region's alias against this process's mappings
//! (`/proc/self/maps`, read by hand: the format is five fixed columns and a path).
//!
//! The pager writes a MINOR region's pages through its alias before `UFFDIO_CONTINUE`
//! maps them, so an alias that is not a shared mapping of the region's own file would
//! have the pager write into whatever memory it names. The check refuses an alias that is
//! not, in this process, a writable shared mapping of one file with contiguous offsets,
//! that overlaps a served region, or — when the region itself is mapped here from a file
//! too — that maps another file or other offsets than the region does.

use std::fs;

use crate::error::{Error, Result};
use crate::region::{RegionSpec, RegionTable};

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vma {
    start: usize,
    end: usize,
    writable: bool,
    shared: bool,
    offset: u64,
    /// Device and inode of the file (inode 0: not a file).
    file: (u64, u64),
}

fn parse(line: &str) -> Option<Vma> {
    let mut cols = line.split_ascii_whitespace();
    let (range, perms, offset, dev, inode) = (
        cols.next()?,
        cols.next()?,
        cols.next()?,
        cols.next()?,
        cols.next()?,
    );
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    let perms = perms.as_bytes();
    Some(Vma {
        start: usize::from_str_radix(start, 16).ok()?,
        end: usize::from_str_radix(end, 16).ok()?,
        writable: perms.get(1) == Some(&b'w'),
        shared: perms.get(3) == Some(&b's'),
        offset: hex(offset)?,
        file: (hex(major)? << 32 | hex(minor)?, inode.parse().ok()?),
    })
}

/// The file and file offset behind `[addr, addr + len)`, if one shared writable file
/// mapping (or several adjacent ones with contiguous offsets) covers it all.
fn shared_file_at(vmas: &[Vma], addr: usize, len: usize) -> Option<((u64, u64), u64)> {
    let mut at = addr;
    let mut found: Option<((u64, u64), u64)> = None;
    while at < addr + len {
        let vma = vmas.iter().find(|v| v.start <= at && at < v.end)?;
        if !vma.writable || !vma.shared || vma.file.1 == 0 {
            return None;
        }
        let offset = vma.offset + (at - vma.start) as u64;
        match found {
            None => found = Some((vma.file, offset)),
            Some((file, first)) if file == vma.file && first + (at - addr) as u64 == offset => {}
            Some(_) => return None,
        }
        at = vma.end;
    }
    found
}

/// Refuses the alias of `spec` unless it is its file's shared mapping (module docs).
pub(crate) fn check_alias(spec: &RegionSpec, alias: usize, table: &RegionTable) -> Result<()> {
    let bad = |reason| {
        Err(Error::BadRegion {
            base: spec.base,
            len: spec.len,
            reason,
        })
    };
    if alias % spec.page_size != 0 {
        return bad("the MINOR region's alias is not page aligned");
    }
    let overlaps = table
        .regions()
        .iter()
        .any(|r| alias < r.spec.base + r.spec.len && r.spec.base < alias.saturating_add(spec.len));
    if overlaps {
        return bad("the MINOR region's alias overlaps a served region");
    }
    let maps = match fs::read_to_string("/proc/self/maps") {
        Ok(text) => text,
        Err(_) => return bad("the MINOR region's alias cannot be checked (/proc/self/maps)"),
    };
    let vmas: Vec<Vma> = maps.lines().filter_map(parse).collect();
    let Some((file, offset)) = shared_file_at(&vmas, alias, spec.len) else {
        return bad(
            "the MINOR region's alias is not a writable shared file mapping in this process",
        );
    };
    // The region may be another process's (a uffd received from it): compared only when
    // it is a file mapping here too.
    let region_is_file_here = vmas
        .iter()
        .any(|v| v.start <= spec.base && spec.base < v.end && v.file.1 != 0);
    if region_is_file_here && shared_file_at(&vmas, spec.base, spec.len) != Some((file, offset)) {
        return bad(
            "the MINOR region's alias maps another file, or other offsets, than the region",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_are_parsed() {
        let v = parse("7f0000001000-7f0000003000 rw-s 00002000 00:01 4242      /memfd:x (deleted)")
            .expect("parses");
        assert_eq!(
            v,
            Vma {
                start: 0x7f00_0000_1000,
                end: 0x7f00_0000_3000,
                writable: true,
                shared: true,
                offset: 0x2000,
                file: (1, 4242),
            }
        );
        let anon = parse("55d0-55e0 rw-p 00000000 00:00 0 [heap]").expect("parses");
        assert!(!anon.shared && anon.file.1 == 0);
        assert_eq!(
            shared_file_at(&[v], 0x7f00_0000_2000, 0x1000),
            Some(((1, 4242), 0x3000))
        );
        assert_eq!(shared_file_at(&[anon], 0x55d0, 0x10), None);
    }
}
