//! Firecracker-style diff-snapshot chains (a full memory file and sparse diffs holding only
//! dirtied pages) served by `LayeredSource` through a real pager, merged, and refused when
//! the layers do not belong together.

use crate::common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::restore;
use pager::Source;
use snapshot::{Error, LayeredSource};
use uffd_core::MemoryKind;

const PS: usize = 4096;

/// A scratch directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("snapshot-layered-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn page_of(generation: u8, index: usize) -> Vec<u8> {
    let mut p = vec![generation; PS];
    p[..8].copy_from_slice(&(index as u64).to_ne_bytes());
    p
}

/// Writes a sparse file of `pages` pages holding `written` (index, bytes) and nothing else.
fn sparse(path: &Path, pages: usize, written: &[(usize, Vec<u8>)]) {
    let f = File::create(path).unwrap();
    f.set_len((pages * PS) as u64).unwrap();
    for (i, bytes) in written {
        f.write_all_at(bytes, (i * PS) as u64).unwrap();
    }
}

/// A base and `diffs` diff layers over `pages` pages, and the memory they add up to.
/// The base leaves every 8th page a hole (zero); each diff dirties a few pages, one of
/// them with zeros written as data (which must override the base), one extending a run of
/// the previous diff.
fn chain(dir: &Dir, pages: usize, diffs: usize) -> (PathBuf, Vec<PathBuf>, Vec<u8>) {
    let mut memory = vec![0u8; pages * PS];
    let base_pages: Vec<(usize, Vec<u8>)> = (0..pages)
        .filter(|i| i % 8 != 7)
        .map(|i| (i, page_of(1, i)))
        .collect();
    for (i, p) in &base_pages {
        memory[i * PS..(i + 1) * PS].copy_from_slice(p);
    }
    let base = dir.0.join("base.mem");
    sparse(&base, pages, &base_pages);
    let mut paths = Vec::new();
    for d in 0..diffs {
        let mut dirty: Vec<(usize, Vec<u8>)> = (0..5)
            .map(|k| {
                let i = (d * 37 + k * 101) % pages;
                (i, page_of(d as u8 + 2, i))
            })
            .collect();
        dirty.push(((d * 13) % pages, vec![0u8; PS])); // zeros written: data, not a hole
        dirty.push((d + 1, page_of(d as u8 + 2, d + 1)));
        for (i, p) in &dirty {
            memory[i * PS..(i + 1) * PS].copy_from_slice(p);
        }
        let path = dir.0.join(format!("diff{d}.mem"));
        sparse(&path, pages, &dirty);
        paths.push(path);
    }
    (base, paths, memory)
}

#[test]
fn a_diff_chain_is_served_newest_layer_first_with_holes_as_zero() {
    let dir = Dir::new("serve");
    let pages = 1024;
    let (base, diffs, memory) = chain(&dir, pages, 6);
    let source = LayeredSource::open(&base, &diffs).expect("open the chain");
    assert_eq!(source.layers().count(), 7);
    // Pages no layer has data for are known zero up front, never read.
    let zero: u64 = source.zero_ranges().iter().map(|r| r.end - r.start).sum();
    let expected_zero = (0..pages)
        .filter(|&i| memory[i * PS..(i + 1) * PS].iter().all(|&b| b == 0))
        .count()
        - 6; // the pages diffs wrote zeros to are data
    assert_eq!(zero as usize, expected_zero * PS);
    let newest = source
        .extents()
        .find(|(r, _)| r.contains(&((13 * 5 % pages * PS) as u64)))
        .map(|(_, layer)| layer);
    assert_eq!(newest, Some(6), "the last diff's page is served from it");
    let got = restore(Arc::new(source), MemoryKind::Anon, memory.len());
    assert!(got == memory, "the chain restores byte for byte");
}

#[test]
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn two_mib_pages_assemble_from_several_layers() {
    if !testkit::hugepages::available("two_mib_pages_assemble_from_several_layers", 4) {
        return;
    }
    let dir = Dir::new("huge");
    let pages = 1024; // 4 MiB: two huge pages, each made of extents of every layer
    let (base, diffs, memory) = chain(&dir, pages, 4);
    let source = LayeredSource::open(&base, &diffs).expect("open");
    let got = restore(Arc::new(source), MemoryKind::HugetlbPrivate, memory.len());
    assert!(got == memory);
}

#[test]
fn merge_writes_what_rebase_snap_would_and_keeps_zero_pages_as_holes() {
    let dir = Dir::new("merge");
    let pages = 512;
    let (base, diffs, memory) = chain(&dir, pages, 3);
    let source = LayeredSource::open(&base, &diffs).unwrap();
    let out = dir.0.join("merged.mem");
    let report = source.merge_into(&out).expect("merge");
    assert_eq!(report.len, memory.len() as u64);
    assert!(std::fs::read(&out).unwrap() == memory);
    let holes = chunked::holes(&File::open(&out).unwrap(), report.len).unwrap();
    assert!(
        holes
            .iter()
            .any(|h| h.start <= 7 * PS as u64 && h.end >= 8 * PS as u64),
        "a zero page of the base stays a hole: {holes:?}"
    );
    // The merged file alone serves the same memory.
    let merged = LayeredSource::open::<&Path>(&out, &[]).unwrap();
    assert!(restore(Arc::new(merged), MemoryKind::Anon, memory.len()) == memory);
}

#[test]
fn layers_that_do_not_belong_together_are_refused() {
    let dir = Dir::new("refuse");
    let (base, mut diffs, _) = chain(&dir, 64, 1);
    let short = dir.0.join("short.mem");
    sparse(&short, 32, &[(1, page_of(9, 1))]);
    diffs.push(short.clone());
    match LayeredSource::open(&base, &diffs) {
        Err(Error::LayerLength {
            path,
            len,
            base_len,
        }) => {
            assert_eq!(path, short);
            assert_eq!((len, base_len), (32 * PS as u64, 64 * PS as u64));
        }
        other => panic!("a diff of another length: {other:?}"),
    }
    let missing = dir.0.join("missing.mem");
    let err = LayeredSource::open(&base, &[&missing]).expect_err("missing layer");
    assert!(
        matches!(&err, Error::Io { path, .. } if *path == missing),
        "{err}"
    );
    let empty = dir.0.join("empty.mem");
    File::create(&empty).unwrap();
    let err = LayeredSource::open::<&Path>(&empty, &[]).expect_err("empty base");
    assert!(matches!(err, Error::Io { .. }), "{err}");
}
