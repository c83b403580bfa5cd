//! Pages a receiver gives up, moved into place (`Placer::place_run_moving`): whole pages
//! move (2 MiB stretches of transparent huge pages whole) and wake the threads waiting on
//! them; what cannot move — shared memory, memory inside the pager's own regions or not
//! page aligned, pages a forked child still shares — is copied, with the same content.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uffd_core::{Features, Mapping, MemoryKind, Uffd};

use crate::common;

const PS: usize = 4096;
const HUGE: usize = 2 << 20;

/// A pager's uffd that can move pages, or `None` (skipped loudly) on a kernel without.
fn move_uffd(test: &str) -> Option<Uffd> {
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_REMOVE | Features::EVENT_UNMAP | Features::EVENT_REMAP)
        .optional(Features::MOVE | Features::MISSING_SHMEM)
        .open()
        .expect("open uffd");
    if uffd.features().contains(Features::MOVE) {
        Some(uffd)
    } else {
        common::skip(test, "the kernel has no UFFDIO_MOVE (Linux 6.8+)");
        None
    }
}

/// Anonymous memory on 2 MiB boundaries, advised for huge pages or against them.
fn aligned(len: usize, huge: bool) -> Mapping {
    let m = Mapping::anon_aligned(len, HUGE).expect("map");
    let advice = if huge {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    m.madvise(0, len, advice).expect("madvise");
    m
}

/// The bytes of `m`, a mapping of the test's own that no pager serves, for writing.
fn bytes_mut(m: &mut Mapping) -> &mut [u8] {
    // SAFETY: mapped for its length, unregistered, and borrowed exclusively.
    unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), m.len()) }
}

/// `m`'s bytes (every page present or served by a running pager).
fn bytes(m: &Mapping) -> &[u8] {
    // SAFETY: mapped for its length; a missing page is served by the test's pager.
    unsafe { std::slice::from_raw_parts(m.as_ptr().cast_const(), m.len()) }
}

/// Threads reading one byte of each of `pages` of `memory` (each blocks until its page
/// is placed); returns once the pager was asked for all of them. The pages must lie far
/// apart: one fault-around ask covering two of them would be one ask, not two.
fn waiters(
    memory: &Arc<Mapping>,
    pages: &[usize],
    far: &common::Far,
) -> Vec<std::thread::JoinHandle<(usize, u8)>> {
    let handles = pages
        .iter()
        .map(|&page| {
            let addr = memory.addr() + page * PS + 7;
            std::thread::spawn(move || {
                // SAFETY: served by the test's pager.
                (page, unsafe { std::ptr::read_volatile(addr as *const u8) })
            })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(10);
    while far.asked.load(Ordering::Relaxed) < pages.len() as u64 {
        assert!(
            Instant::now() < until,
            "the waiters' faults reached the pager"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    handles
}

/// Moves a whole image of `len` bytes in from staging advised `huge`; checks the waiters,
/// the content, what was left behind and the counters. Returns (staging was huge, memory
/// is huge after).
fn move_whole_image(test: &str, len: usize, huge: bool) -> Option<(bool, bool)> {
    let uffd = move_uffd(test)?;
    let image = common::image(len / PS, PS, 0);
    let memory = Arc::new(aligned(len, huge));
    let (pager, placer, far) = common::remote(uffd, &[(memory.clone(), 0)], len);
    let waiting = waiters(
        &memory,
        &[0, len / PS / 4, len / PS / 2, len / PS - 1],
        &far,
    );
    let mut staging = aligned(len, huge);
    bytes_mut(&mut staging).copy_from_slice(&image);
    let staged_huge = testkit::hugepages::all_transparent(&staging);
    let placed = placer
        .place_run_moving(0, bytes_mut(&mut staging))
        .expect("place");
    assert_eq!(placed, Some(len / PS), "every page placed");
    for w in waiting {
        let (page, got) = w.join().expect("waiter");
        assert_eq!(got, image[page * PS + 7], "page {page} woke with its data");
    }
    assert!(bytes(&memory) == &image[..], "the memory holds the image");
    let landed_huge = testkit::hugepages::all_transparent(&memory);
    assert!(
        bytes(&staging).iter().all(|&b| b == 0),
        "the pages left the staging memory (moved, not copied)"
    );
    let stats = pager.stop().expect("stop");
    assert_eq!(stats.placed_arrival, (len / PS) as u64);
    assert_eq!(
        stats.placed_moved,
        (len / PS) as u64,
        "all moved: {stats:?}"
    );
    assert_eq!(stats.move_refused, 0);
    Some((staged_huge, landed_huge))
}

#[test]
fn pages_given_up_are_moved_into_place_and_wake_their_waiters() {
    move_whole_image("moving::pages_given_up_are_moved", 4 << 20, false);
}

#[test]
fn two_mib_stretches_of_transparent_huge_pages_move_whole() {
    let test = "moving::two_mib_stretches_of_transparent_huge_pages_move_whole";
    let Some((staged_huge, landed_huge)) = move_whole_image(test, 8 << 20, true) else {
        return;
    };
    if !staged_huge {
        // THP off (`transparent_hugepage/enabled`: never) or memory too fragmented.
        return common::skip(test, "the staging memory got no transparent huge pages");
    }
    assert!(landed_huge, "huge pages were moved whole, not split");
}

#[test]
fn what_cannot_move_is_copied_with_the_same_content() {
    let test = "moving::what_cannot_move_is_copied_with_the_same_content";
    let Some(uffd) = move_uffd(test) else {
        return;
    };
    let pages = 64;
    let len = pages * PS;
    let image = common::image(pages * 4, PS, 0);
    let part = |i: usize| &image[i * len..(i + 1) * len];
    // Region 0 shared memory; regions 1-3 anonymous.
    let shmem = Arc::new(Mapping::new(MemoryKind::Shmem, len).expect("memfd"));
    let anon: Vec<Arc<Mapping>> = (0..3).map(|_| Arc::new(aligned(len, false))).collect();
    let mut regions = vec![(shmem.clone(), 0)];
    regions.extend(
        anon.iter()
            .enumerate()
            .map(|(i, m)| (m.clone(), ((i + 1) * len) as u64)),
    );
    let (pager, placer, _far) = common::remote(uffd, &regions, 4 * len);

    // Into shared memory: MOVE takes private anonymous memory only.
    let mut staging = aligned(len, false);
    bytes_mut(&mut staging).copy_from_slice(part(0));
    assert_eq!(
        placer
            .place_run_moving(0, bytes_mut(&mut staging))
            .expect("place"),
        Some(pages)
    );
    assert!(bytes(&shmem) == part(0), "shared memory holds its part");
    assert!(
        bytes(&staging) == part(0),
        "copied: the staging still holds it"
    );

    // From memory that is not page aligned.
    let mut unaligned = vec![0u8; len + 1];
    unaligned[1..].copy_from_slice(part(1));
    let at = len as u64;
    assert_eq!(
        placer
            .place_run_moving(at, &mut unaligned[1..])
            .expect("place"),
        Some(pages)
    );
    assert!(bytes(&anon[0]) == part(1), "region 1 holds its part");
    assert!(
        &unaligned[1..] == part(1),
        "copied: the buffer still holds it"
    );

    // From the pager's own region: region 1, placed above, into region 2.
    let at = 2 * len as u64;
    // SAFETY: region 1's pages are all placed, and no other slice of it is in use while
    // this one is.
    let from = unsafe { std::slice::from_raw_parts_mut(anon[0].as_ptr(), len) };
    assert_eq!(
        placer.place_run_moving(at, from).expect("place"),
        Some(pages)
    );
    assert!(
        bytes(&anon[1]) == part(1),
        "region 2 holds region 1's bytes"
    );
    assert!(bytes(&anon[0]) == part(1), "copied: region 1 keeps them");

    // From pages a forked child still shares (copy-on-write): the kernel refuses.
    let mut staging = aligned(len, false);
    bytes_mut(&mut staging).copy_from_slice(part(3));
    // SAFETY: the child only sleeps and `_exit`s; the parent kills it below.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork");
    if child == 0 {
        // SAFETY: async-signal-safe calls only, in the forked child.
        unsafe {
            libc::sleep(60);
            libc::_exit(0);
        }
    }
    let placed = placer.place_run_moving(3 * len as u64, bytes_mut(&mut staging));
    // SAFETY: our own child.
    unsafe { libc::kill(child, libc::SIGKILL) };
    assert_eq!(common::wait(child), 128 + libc::SIGKILL);
    assert_eq!(placed.expect("place"), Some(pages));
    assert!(bytes(&anon[2]) == part(3), "region 3 holds its part");
    assert!(
        bytes(&staging) == part(3),
        "copied: the staging still holds it"
    );

    let stats = pager.stop().expect("stop");
    assert_eq!(stats.placed_arrival, 4 * pages as u64);
    assert_eq!(stats.placed_moved, 0, "nothing moved: {stats:?}");
    assert!(
        stats.move_refused >= 1,
        "the shared pages were refused: {stats:?}"
    );
}
