//! Every source × memory kind × delivery mode the kernel allows serves every page with
//! exactly the image's bytes.

use crate::common;

use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use pager::{DeliveryMode, FileSource, MemorySource, Pager, RegionSpec, Source, ZeroSource};
use uffd_core::{Mapping, MemoryKind};

#[derive(Debug, Clone, Copy)]
enum SourceKind {
    Memory,
    FilePread,
    FileMmap,
    Sparse,
    Zero,
}

const SOURCES: [SourceKind; 5] = [
    SourceKind::Memory,
    SourceKind::FilePread,
    SourceKind::FileMmap,
    SourceKind::Sparse,
    SourceKind::Zero,
];
const MODES: [DeliveryMode; 3] = [
    DeliveryMode::Thread,
    DeliveryMode::BusyPoll,
    DeliveryMode::PerCpu,
];

/// Writes `image` to a temp file, leaving every zero page as a hole.
fn sparse_file(image: &[u8], page_size: usize, name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("uffdkit-test-{}-{name}", std::process::id()));
    let mut f = std::fs::File::create(&path).expect("create image");
    f.set_len(image.len() as u64).expect("size image");
    for (i, page) in image.chunks(page_size).enumerate() {
        if page.iter().any(|&b| b != 0) {
            f.seek(SeekFrom::Start((i * page_size) as u64))
                .expect("seek");
            f.write_all(page).expect("write");
        }
    }
    path
}

fn source(
    kind: SourceKind,
    image: &[u8],
    page_size: usize,
    tag: &str,
) -> (Arc<dyn Source>, Vec<u8>) {
    match kind {
        SourceKind::Memory => (
            Arc::new(MemorySource::new(image.to_vec()).with_zero_scan(page_size)),
            image.to_vec(),
        ),
        SourceKind::FilePread | SourceKind::FileMmap | SourceKind::Sparse => {
            let path = sparse_file(image, page_size, tag);
            let src: Arc<dyn Source> = match kind {
                SourceKind::FilePread => Arc::new(FileSource::pread(&path).expect("open")),
                SourceKind::FileMmap => Arc::new(FileSource::mmap(&path).expect("open")),
                _ => {
                    let s = FileSource::sparse(&path).expect("open");
                    assert!(!s.holes().is_empty(), "the image file has holes");
                    Arc::new(s)
                }
            };
            std::fs::remove_file(&path).expect("unlink");
            (src, image.to_vec())
        }
        SourceKind::Zero => (
            Arc::new(ZeroSource::new(image.len() as u64)),
            vec![0; image.len()],
        ),
    }
}

fn serve_and_verify(kind: MemoryKind, minor: bool, src: SourceKind, mode: DeliveryMode) {
    let ps = kind.page_size();
    let pages = if kind.is_hugetlb() { 4 } else { 24 };
    let image = common::image(pages, ps, 4);
    let tag = format!("{kind:?}-{minor}-{src:?}-{mode:?}");
    let (source, expect) = source(src, &image, ps, &tag);
    let memory = Arc::new(Mapping::new(kind, pages * ps).expect("map"));
    if mode == DeliveryMode::Sigbus && source.signal_safe().is_none() {
        return; // SIGBUS mode takes signal-safe sources only (tested in tests/sigbus.rs)
    }
    let uffd = if mode == DeliveryMode::Sigbus {
        common::sigbus_uffd()
    } else {
        common::uffd()
    };
    let builder = Pager::builder(uffd, source);
    let builder = if minor {
        builder.mapping_minor(memory.clone(), 0)
    } else {
        builder.mapping(memory.clone(), 0)
    };
    let pager = builder
        .mode(mode)
        .start()
        .unwrap_or_else(|e| panic!("{tag}: start: {e}"));
    // Two workload threads touch the pages in opposite orders.
    let addr = memory.addr();
    let expect = Arc::new(expect);
    let workers: Vec<_> = [false, true]
        .into_iter()
        .map(|reverse| {
            let expect = expect.clone();
            std::thread::spawn(move || {
                for i in 0..pages {
                    let page = if reverse { pages - 1 - i } else { i };
                    // SAFETY: inside the mapped region served by the pager.
                    let got = unsafe { common::bytes(addr + page * ps, ps) };
                    if got != &expect[page * ps..(page + 1) * ps] {
                        return Err(page);
                    }
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        if let Err(page) = w.join().expect("worker") {
            panic!("{tag}: page {page} has wrong content");
        }
    }
    let stats = pager.stop().unwrap_or_else(|e| panic!("{tag}: {e}"));
    assert_eq!(
        stats.placed(),
        pages as u64,
        "{tag}: every page placed once: {stats:?}"
    );
    let zero_pages = (0..pages).filter(|i| i % 4 == 3).count() as u64;
    match src {
        SourceKind::Zero => assert_eq!(stats.placed_zero, pages as u64, "{tag}"),
        SourceKind::Memory | SourceKind::Sparse => {
            assert_eq!(
                stats.placed_zero, zero_pages,
                "{tag}: holes placed as zero pages"
            )
        }
        _ => {}
    }
}

#[test]
fn every_source_kind_and_mode_serves_exact_content() {
    let mut kinds: Vec<(MemoryKind, bool)> = Vec::new();
    for kind in common::kinds("every_source_kind_and_mode_serves_exact_content") {
        kinds.push((kind, false));
        if kind.is_shared() {
            kinds.push((kind, true)); // MINOR mode via CONTINUE
        }
    }
    for (kind, minor) in kinds {
        for src in SOURCES {
            for mode in MODES {
                serve_and_verify(kind, minor, src, mode);
            }
        }
    }
}

#[test]
fn regions_beyond_the_image_or_overlapping_are_refused() {
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, 8 * 4096).expect("map"));
    let small = Arc::new(MemorySource::new(vec![0u8; 4 * 4096]));
    let err = Pager::builder(common::uffd(), small.clone())
        .mapping(memory.clone(), 0)
        .start()
        .expect_err("image too small");
    assert!(err.to_string().contains("the image has 16384"), "{err}");
    let builder = Pager::builder(common::uffd(), small);
    // SAFETY: refused before anything is placed (and the mapping outlives the builder).
    let builder = unsafe {
        builder
            .region(RegionSpec::new(
                memory.addr(),
                2 * 4096,
                MemoryKind::Anon,
                0,
            ))
            .region(RegionSpec::new(
                memory.addr() + 4096,
                2 * 4096,
                MemoryKind::Anon,
                0,
            ))
    };
    let err = builder.start().expect_err("overlap");
    assert!(err.to_string().contains("overlap"), "{err}");
}

/// A MINOR region named by address whose alias is not the region's file: the pager
/// would write the image into whatever the alias names (here a `Vec` of this process).
#[test]
fn a_minor_region_whose_alias_is_not_its_file_is_refused() {
    let ps = 4096;
    let memory = Mapping::new(MemoryKind::Shmem, 4 * ps).expect("map");
    let other = Mapping::new(MemoryKind::Shmem, 4 * ps).expect("another file");
    let victim = vec![0x5au8; 64 * ps];
    let heap = (victim.as_ptr() as usize).next_multiple_of(ps);
    let aliases = [
        (heap, "not a writable shared file mapping"),
        (other.addr(), "another file"),
        (memory.addr(), "overlaps a served region"),
    ];
    for (alias, why) in aliases {
        let spec = RegionSpec::new(memory.addr(), memory.len(), MemoryKind::Shmem, 0).minor(alias);
        let builder = Pager::builder(
            common::uffd(),
            Arc::new(MemorySource::new(common::image(4, ps, 0))),
        );
        // SAFETY: the region is this test's own mapping; the alias is wrong on purpose,
        // and `start` must refuse it before any page is written.
        let err = unsafe { builder.region(spec) }
            .mode(DeliveryMode::Thread)
            .start()
            .expect_err(why);
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
    assert!(victim.iter().all(|&b| b == 0x5a), "the Vec was not written");
    // The right alias, named by address, is accepted and served.
    let alias = memory.alias().expect("alias");
    let spec =
        RegionSpec::new(memory.addr(), memory.len(), MemoryKind::Shmem, 0).minor(alias.addr());
    let image = common::image(4, ps, 0);
    let builder = Pager::builder(common::uffd(), Arc::new(MemorySource::new(image.clone())));
    // SAFETY: the region is this test's mapping, its alias a mapping of the same memfd;
    // both outlive the pager (stopped below).
    let pager = unsafe { builder.region(spec) }
        .mode(DeliveryMode::Thread)
        .start()
        .expect("the region's own alias");
    // SAFETY: served region.
    let got = unsafe { common::bytes(memory.addr() + ps, ps) };
    assert_eq!(got, &image[ps..2 * ps]);
    pager.stop().expect("stop");
}

#[test]
fn several_regions_map_to_their_image_offsets() {
    let ps = 4096;
    let image = common::image(16, ps, 0);
    let a = Arc::new(Mapping::new(MemoryKind::Anon, 4 * ps).expect("map a"));
    let b = Arc::new(Mapping::new(MemoryKind::Shmem, 8 * ps).expect("map b"));
    let pager = Pager::builder(common::uffd(), Arc::new(MemorySource::new(image.clone())))
        .mapping(a.clone(), 0)
        .mapping(b.clone(), 8 * ps as u64)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    // SAFETY: both regions are mapped and served.
    unsafe {
        assert_eq!(common::bytes(a.addr() + 3 * ps, ps), &image[3 * ps..4 * ps]);
        assert_eq!(common::bytes(b.addr(), ps), &image[8 * ps..9 * ps]);
        assert_eq!(
            common::bytes(b.addr() + 7 * ps, ps),
            &image[15 * ps..16 * ps]
        );
    }
    pager.stop().expect("stop");
}

/// A seeded map that says a page is already in memory when it was never written: that
/// page would read as zeros forever (the pager never serves a Received page). The debug
/// check refuses it at start; a page really written passes.
#[test]
fn a_seeded_received_page_that_is_not_in_memory_is_refused() {
    let ps = 4096;
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, 8 * ps).expect("map"));
    let image = common::image(8, ps, 0);
    // Page 2 really is in memory (written before the pager starts); page 5 is not.
    // SAFETY: this test's own mapping, not yet registered.
    unsafe {
        std::ptr::copy_nonoverlapping(image[2 * ps..].as_ptr(), memory.as_ptr().add(2 * ps), ps)
    };
    let seed = |pages: &[usize]| {
        let map = pager::PageStateMap::new(8);
        for &p in pages {
            map.mark_received(p).expect("seed");
        }
        map
    };
    let err = Pager::builder(common::uffd(), Arc::new(MemorySource::new(image.clone())))
        .mapping(memory.clone(), 0)
        .states(seed(&[2, 5]))
        .check_seeded(true)
        .start()
        .expect_err("page 5 is marked received but was never written");
    assert!(
        matches!(err, pager::Error::SeededNotPresent { page: 5, .. }),
        "{err}"
    );
    let pager = Pager::builder(common::uffd(), Arc::new(MemorySource::new(image.clone())))
        .mapping(memory.clone(), 0)
        .states(seed(&[2]))
        .check_seeded(true)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("page 2 is in memory");
    // SAFETY: served region.
    let got = unsafe { common::bytes(memory.addr(), memory.len()) };
    assert_eq!(got, image.as_slice());
    pager.stop().expect("stop");
}
