//! Shared memory resolved in MINOR mode: the page cache may hold bytes before the pager
//! places anything (a memory file used before), and keeps the workload's bytes across a
//! `MADV_DONTNEED`. A page the pager never placed shows what the image says, whatever the
//! cache held; a page the workload had shows what it wrote, whatever arrives late.

use crate::common;

use std::sync::Arc;

use pager::{
    DeliveryMode, Features, Fetched, Mapping, MemoryKind, MemorySource, Pager, Placed, Source,
    SourceError,
};

const PS: usize = 4096;

/// A uffd for MINOR shared memory, or `None` (skipped loudly) without it.
fn minor_uffd(test: &str) -> Option<pager::Uffd> {
    let uffd = common::uffd();
    if uffd.features().contains(Features::MINOR_SHMEM) {
        Some(uffd)
    } else {
        common::skip(test, "no UFFD_FEATURE_MINOR_SHMEM");
        None
    }
}

/// Pages of `memory` whose bytes differ from `image`'s.
fn differing(memory: &Mapping, image: &[u8]) -> Vec<usize> {
    // SAFETY: the served region.
    let got = unsafe { common::bytes(memory.addr(), memory.len()) };
    got.chunks(PS)
        .zip(image.chunks(PS))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect()
}

/// The memory file held other bytes before (its page cache full, nothing mapped): a hole
/// of the image reads zeros, like the pages with data read the image. Before, a hole's
/// MINOR fault mapped the stale page as it was.
#[test]
fn a_hole_of_the_image_reads_zeros_over_a_stale_page_cache() {
    const NAME: &str = "minor::a_hole_of_the_image_reads_zeros_over_a_stale_page_cache";
    let Some(uffd) = minor_uffd(NAME) else {
        return;
    };
    let pages = 16;
    // Every 4th page zero: pages 3, 7, 11, 15 are holes, known zero from the start.
    let image = common::image(pages, PS, 4);
    let memory = Arc::new(Mapping::new(MemoryKind::Shmem, pages * PS).expect("map"));
    // SAFETY: our own mapping, not served yet.
    unsafe { std::ptr::write_bytes(memory.as_ptr(), 0xAB, pages * PS) };
    // Unmapped, still in the page cache (shared memory keeps it).
    memory
        .madvise(0, pages * PS, libc::MADV_DONTNEED)
        .expect("MADV_DONTNEED");
    let pager = Pager::builder(
        uffd,
        Arc::new(MemorySource::new(image.clone()).with_zero_scan(PS)),
    )
    .mapping_minor(memory.clone(), 0)
    .mode(DeliveryMode::Thread)
    .start()
    .expect("start");
    assert_eq!(
        differing(&memory, &image),
        Vec::<usize>::new(),
        "pages not as the image has them"
    );
    pager.stop().expect("stop");
}

/// A remote source whose pages the test places itself (through the pager's placer).
struct Driven;

impl Source for Driven {
    fn len(&self) -> u64 {
        (8 * PS) as u64
    }
    fn fetch<'a>(&'a self, _: u64, _: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        Ok(Fetched::Pending)
    }
}

/// The workload wrote a page, then dropped it with `MADV_DONTNEED`, which on shared
/// memory keeps the page cache: a late arrival of the page (a background stream that sent
/// it again) does not overwrite what the workload wrote. Before, the drop made the page
/// Zero and the arrival wrote zeros into the page cache.
#[test]
fn a_page_the_workload_dropped_keeps_its_bytes_when_it_arrives_again() {
    const NAME: &str = "minor::a_page_the_workload_dropped_keeps_its_bytes_when_it_arrives_again";
    let Some(uffd) = minor_uffd(NAME) else {
        return;
    };
    let image = common::image(8, PS, 0);
    let memory = Arc::new(Mapping::new(MemoryKind::Shmem, 8 * PS).expect("map"));
    let pager = Pager::builder(uffd, Arc::new(Driven))
        .mapping_minor(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    let placer = pager.placer();
    assert_eq!(
        placer.place(0, Some(&image[..PS])).expect("place"),
        Placed::Placed
    );
    // SAFETY: the served region; page 0 is placed (mapped), so neither access faults.
    unsafe {
        assert_eq!(common::bytes(memory.addr(), PS), &image[..PS]);
        std::ptr::write_bytes(memory.as_ptr(), 0x5A, PS);
    }
    memory.madvise(0, PS, libc::MADV_DONTNEED).expect("drop");
    // A second REMOVE: its madvise returns once the event is read, so the first one's
    // batch has been applied by then.
    memory
        .madvise(5 * PS, PS, libc::MADV_DONTNEED)
        .expect("drop");
    assert!(pager.dropped(0), "the REMOVE reached page 0");
    placer.place(0, Some(&image[..PS])).expect("place again");
    // SAFETY: the served region (a MINOR fault maps the page cache's page again).
    let got = unsafe { common::bytes(memory.addr(), PS) };
    assert!(
        got.iter().all(|&b| b == 0x5A),
        "the workload's bytes, not {:?}",
        &got[..8]
    );
    pager.stop().expect("stop");
}
