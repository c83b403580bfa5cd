//! Resolving faults: copy, zeropage, wake, move, poison, continue, write-protect — on each
//! memory kind where the kernel allows the case (cf. selftests/mm/uffd-unit-tests.c).

use crate::common;

use std::time::Duration;

use common::{bytes, next_event, open, pattern, read_on_thread, write_on_thread};
use nix::errno::Errno;
use uffd_core::{
    ContinueMode, CopyMode, Error, Event, EventBuffer, FaultFlags, Features, Mapping, MemoryKind,
    MoveMode, PoisonMode, RegisterMode, WriteProtectMode, ZeropageMode,
};

const ALL: Features = Features::MISSING_SHMEM
    .union(Features::MISSING_HUGETLBFS)
    .union(Features::MINOR_SHMEM)
    .union(Features::MINOR_HUGETLBFS)
    .union(Features::WP_HUGETLBFS_SHMEM)
    .union(Features::PAGEFAULT_FLAG_WP)
    .union(Features::POISON)
    .union(Features::MOVE);

fn fault_addr(event: Event) -> (usize, FaultFlags) {
    match event {
        Event::Pagefault { addr, flags, .. } => (addr, flags),
        other => panic!("expected a page fault, got {other:?}"),
    }
}

#[test]
fn copy_resolves_missing_faults_byte_for_byte() {
    for kind in common::kinds("copy_resolves_missing_faults_byte_for_byte") {
        let ps = kind.page_size();
        let region = Mapping::new(kind, 4 * ps).expect("map");
        let uffd = open(ALL);
        uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
            .expect("register");
        let mut buf = EventBuffer::new(8);
        for page in 0..region.pages() {
            let reader = read_on_thread(region.page_addr(page) + 123);
            let (addr, flags) = fault_addr(next_event(&uffd, &mut buf));
            assert_eq!(addr, region.page_addr(page), "{kind:?}: fault address");
            assert!(!flags.contains(FaultFlags::WRITE), "a read fault");
            let data = pattern(page, ps, kind as u64);
            // SAFETY: a missing page of a region registered with `uffd`, owned by the test.
            let placed = unsafe { uffd.copy(addr, &data, CopyMode::empty()) }.expect("copy");
            assert_eq!(placed, ps);
            assert_eq!(reader.join().expect("reader"), data[123], "{kind:?}");
            // SAFETY: the page is present now.
            let present = unsafe { bytes(addr, ps) };
            assert_eq!(present, data.as_slice(), "{kind:?} page {page}");
        }
        if kind.is_shared() {
            let alias = region.alias().expect("alias");
            // SAFETY: the alias is not registered; its pages are in the page cache.
            let through_alias = unsafe { bytes(alias.addr(), ps) };
            assert_eq!(
                through_alias,
                pattern(0, ps, kind as u64).as_slice(),
                "{kind:?}"
            );
        }
    }
}

#[test]
fn zeropage_reads_as_zero_and_is_refused_on_hugetlb() {
    for kind in common::kinds("zeropage_reads_as_zero_and_is_refused_on_hugetlb") {
        let ps = kind.page_size();
        let region = Mapping::new(kind, ps).expect("map");
        let uffd = open(ALL);
        uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
            .expect("register");
        if kind.is_hugetlb() {
            // SAFETY: our own registered region (refused: hugetlb).
            let err = unsafe { uffd.zeropage(region.addr(), ps, ZeropageMode::empty()) }
                .expect_err("no ZEROPAGE on hugetlb");
            assert_eq!(err.errno(), Some(Errno::EINVAL), "{err}");
            continue;
        }
        let reader = read_on_thread(region.addr() + 7);
        let (addr, _) = fault_addr(next_event(&uffd, &mut EventBuffer::new(4)));
        // SAFETY: a missing page of our own registered region (anonymous or shared).
        unsafe { uffd.zeropage(addr, ps, ZeropageMode::empty()) }.expect("zeropage");
        assert_eq!(reader.join().expect("reader"), 0);
        // SAFETY: present now.
        let present = unsafe { bytes(addr, ps) };
        assert!(present.iter().all(|&b| b == 0), "{kind:?}");
    }
}

#[test]
fn copy_onto_present_page_reports_exists_then_wake_releases_waiter() {
    for kind in common::kinds("copy_onto_present_page_reports_exists_then_wake_releases_waiter") {
        let ps = kind.page_size();
        let region = Mapping::new(kind, ps).expect("map");
        let uffd = open(ALL);
        uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
            .expect("register");
        let reader = read_on_thread(region.addr());
        let (addr, _) = fault_addr(next_event(&uffd, &mut EventBuffer::new(4)));
        let first = pattern(1, ps, 1);
        // SAFETY: missing page of our registered region.
        unsafe { uffd.copy(addr, &first, CopyMode::DONTWAKE) }.expect("first copy");
        std::thread::sleep(Duration::from_millis(30));
        assert!(!reader.is_finished(), "{kind:?}: DONTWAKE woke the waiter");
        // SAFETY: as above; the kernel must refuse to overwrite.
        let again = unsafe { uffd.copy(addr, &pattern(2, ps, 2), CopyMode::DONTWAKE) };
        assert!(
            matches!(again, Err(Error::Exists { .. })),
            "{kind:?}: {again:?}"
        );
        if !kind.is_hugetlb() {
            // SAFETY: our own registered region (refused: present).
            let zero = unsafe { uffd.zeropage(addr, ps, ZeropageMode::DONTWAKE) };
            assert!(
                matches!(zero, Err(Error::Exists { .. })),
                "{kind:?}: {zero:?}"
            );
        }
        uffd.wake(addr, ps).expect("wake");
        assert_eq!(
            reader.join().expect("reader"),
            first[0],
            "{kind:?}: first copy wins"
        );
        // SAFETY: present.
        assert_eq!(unsafe { bytes(addr, ps) }, first.as_slice());
    }
}

#[test]
fn dontwake_batch_then_one_range_wake_releases_every_waiter() {
    for kind in common::kinds("dontwake_batch_then_one_range_wake_releases_every_waiter") {
        let ps = kind.page_size();
        let pages = 4;
        let region = Mapping::new(kind, pages * ps).expect("map");
        let uffd = open(ALL);
        uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
            .expect("register");
        let readers: Vec<_> = (0..pages)
            .map(|p| read_on_thread(region.page_addr(p)))
            .collect();
        let mut buf = EventBuffer::new(16);
        let faulted = common::collect_faults(&uffd, &mut buf, pages);
        for (i, &addr) in faulted.iter().enumerate() {
            // SAFETY: missing pages of our registered region.
            unsafe { uffd.copy(addr, &pattern(i, ps, 9), CopyMode::DONTWAKE) }.expect("copy");
        }
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            readers.iter().all(|r| !r.is_finished()),
            "{kind:?}: woken early"
        );
        uffd.wake(region.addr(), region.len()).expect("one wake");
        for (i, r) in readers.into_iter().enumerate() {
            assert_eq!(r.join().expect("reader"), pattern(i, ps, 9)[0], "{kind:?}");
        }
    }
}

/// MOVE refuses (EBUSY) pages that are not exclusive to this process; other tests in this
/// binary fork, which would share the source copy-on-write with a child.
fn dont_fork(src: &Mapping) {
    src.madvise(0, src.len(), libc::MADV_DONTFORK)
        .expect("MADV_DONTFORK");
}

#[test]
fn move_resolves_a_fault_and_leaves_the_source_empty() {
    let ps = uffd_core::page_size();
    let dst = Mapping::new(MemoryKind::Anon, ps).expect("map dst");
    let src = Mapping::new(MemoryKind::Anon, ps).expect("map src");
    dont_fork(&src);
    let data = pattern(5, ps, 5);
    // SAFETY: src is our own unregistered mapping of `ps` bytes.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), src.as_ptr(), ps) };
    let uffd = open(Features::MOVE);
    uffd.register(dst.addr(), dst.len(), RegisterMode::MISSING)
        .expect("register");
    let reader = read_on_thread(dst.addr() + 9);
    let (addr, _) = fault_addr(next_event(&uffd, &mut EventBuffer::new(4)));
    // SAFETY: dst page missing and ours; src page is ours and given up.
    let moved = unsafe { uffd.move_pages(addr, src.addr(), ps, MoveMode::empty()) }.expect("move");
    assert_eq!(moved, ps);
    assert_eq!(reader.join().expect("reader"), data[9]);
    // SAFETY: both mapped; src now reads as a fresh zero page.
    unsafe {
        assert_eq!(bytes(dst.addr(), ps), data.as_slice());
        assert!(
            bytes(src.addr(), ps).iter().all(|&b| b == 0),
            "source emptied"
        );
    }
}

/// The kernel stops a move at a destination page that is present (after moving the pages
/// before it) and says how far it got: the partial move is reported as `Again` with the
/// bytes moved, never as a plain failure that would hide pages gone from the source.
#[test]
fn a_move_stopped_partway_reports_again_with_the_bytes_it_moved() {
    let ps = uffd_core::page_size();
    let src = Mapping::new(MemoryKind::Anon, 4 * ps).expect("map src");
    let dst = Mapping::new(MemoryKind::Anon, 4 * ps).expect("map dst");
    dont_fork(&src);
    let data = pattern(3, 4 * ps, 11);
    // SAFETY: src is our own unregistered mapping of 4 pages.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), src.as_ptr(), 4 * ps) };
    let uffd = open(Features::MOVE);
    uffd.register(dst.addr(), dst.len(), RegisterMode::MISSING)
        .expect("register");
    let present = vec![0xEEu8; ps];
    // SAFETY: dst's third page is missing and ours.
    unsafe { uffd.copy(dst.addr() + 2 * ps, &present, CopyMode::empty()) }.expect("copy");
    // SAFETY: dst missing (but the third page) and ours; src ours and given up.
    let partial = unsafe { uffd.move_pages(dst.addr(), src.addr(), 4 * ps, MoveMode::empty()) };
    assert!(
        matches!(partial, Err(Error::Again { done, .. }) if done == 2 * ps),
        "{partial:?}"
    );
    // SAFETY: all mapped; dst's first three pages present, src's first two now zero.
    unsafe {
        assert_eq!(bytes(dst.addr(), 2 * ps), &data[..2 * ps], "moved");
        assert_eq!(bytes(dst.addr() + 2 * ps, ps), present.as_slice());
        assert!(bytes(src.addr(), 2 * ps).iter().all(|&b| b == 0), "gone");
        assert_eq!(bytes(src.addr() + 2 * ps, 2 * ps), &data[2 * ps..], "kept");
    }
    // Resumed where it stopped, the present page is the whole answer.
    // SAFETY: as above.
    let rest = unsafe {
        uffd.move_pages(
            dst.addr() + 2 * ps,
            src.addr() + 2 * ps,
            2 * ps,
            MoveMode::empty(),
        )
    };
    assert!(matches!(rest, Err(Error::Exists { .. })), "{rest:?}");
}

#[test]
fn move_without_the_feature_is_unsupported() {
    let ps = uffd_core::page_size();
    let region = Mapping::new(MemoryKind::Anon, 2 * ps).expect("map");
    let uffd = open(Features::empty());
    // SAFETY: the call is refused before reaching the kernel.
    let err = unsafe { uffd.move_pages(region.addr(), region.addr() + ps, ps, MoveMode::empty()) };
    match err {
        Err(Error::Unsupported { missing, .. }) => assert_eq!(missing, Features::MOVE),
        other => panic!("{other:?}"),
    }
}

/// `AnonHugePages` of the smaps entry containing `addr`, in KiB.
fn anon_huge_kib(addr: usize) -> usize {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((lo, hi)) = range.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                return v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
            }
        }
    }
    0
}

#[test]
fn move_of_a_2mib_thp_aligned_chunk() {
    let huge = uffd_core::HUGE_PAGE_SIZE;
    let src = Mapping::anon_aligned(huge, huge).expect("map src");
    let dst = Mapping::anon_aligned(huge, huge).expect("map dst");
    src.madvise(0, huge, libc::MADV_HUGEPAGE)
        .expect("MADV_HUGEPAGE");
    dont_fork(&src);
    let ps = uffd_core::page_size();
    for page in 0..huge / ps {
        let data = pattern(page, ps, 77);
        // SAFETY: inside our unregistered src mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), src.as_ptr().add(page * ps), ps) };
    }
    if anon_huge_kib(src.addr()) < 2048 {
        common::skip(
            "move_of_a_2mib_thp_aligned_chunk",
            "THP not granted for the source; moving 512 small pages instead",
        );
    }
    let uffd = open(Features::MOVE);
    uffd.register(dst.addr(), dst.len(), RegisterMode::MISSING)
        .expect("register");
    // SAFETY: dst missing and ours; src ours and given up.
    let moved = unsafe { uffd.move_pages(dst.addr(), src.addr(), huge, MoveMode::empty()) }
        .expect("move 2 MiB");
    assert_eq!(moved, huge);
    for page in 0..huge / ps {
        // SAFETY: present after the move.
        let got = unsafe { bytes(dst.addr() + page * ps, ps) };
        assert_eq!(got, pattern(page, ps, 77).as_slice(), "page {page}");
    }
}

#[test]
fn move_with_allow_src_holes_skips_holes() {
    let ps = uffd_core::page_size();
    let src = Mapping::new(MemoryKind::Anon, 2 * ps).expect("map src");
    let dst = Mapping::new(MemoryKind::Anon, 2 * ps).expect("map dst");
    dont_fork(&src);
    // Only the second source page exists.
    // SAFETY: inside our src mapping.
    unsafe { std::ptr::write_volatile(src.as_ptr().add(ps), 0x5A) };
    let uffd = open(Features::MOVE);
    uffd.register(dst.addr(), dst.len(), RegisterMode::MISSING)
        .expect("register");
    // SAFETY: dst missing and ours; src ours.
    let strict = unsafe { uffd.move_pages(dst.addr(), src.addr(), 2 * ps, MoveMode::empty()) };
    assert!(matches!(strict, Err(Error::RangeGone { .. })), "{strict:?}");
    // SAFETY: as above.
    let lenient =
        unsafe { uffd.move_pages(dst.addr(), src.addr(), 2 * ps, MoveMode::ALLOW_SRC_HOLES) };
    assert!(lenient.is_ok(), "{lenient:?}");
    // SAFETY: the second dst page is present now.
    let second = unsafe { std::ptr::read_volatile(dst.as_ptr().add(ps)) };
    assert_eq!(second, 0x5A);
}

#[test]
fn poison_needs_no_negotiated_feature_and_outlives_the_uffd() {
    let outcome = common::fork_child(|| {
        let region = Mapping::new(MemoryKind::Anon, 2 * 4096).expect("map");
        // What a VMM such as Firecracker negotiates: no POISON bit.
        let uffd = open(Features::EVENT_REMOVE);
        uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
            .expect("register");
        let poisoned = uffd
            .poison(region.page_addr(1), 4096, PoisonMode::empty())
            .expect("poison without the feature negotiated");
        if poisoned != 4096 {
            return 2;
        }
        drop(uffd);
        // SAFETY: page 0 is no longer registered: it reads as zeros.
        if unsafe { std::ptr::read_volatile(region.page_addr(0) as *const u8) } != 0 {
            return 3;
        }
        // SAFETY: the poisoned page: this read must raise SIGBUS even with the uffd gone.
        unsafe { std::ptr::read_volatile(region.page_addr(1) as *const u8) };
        4
    });
    assert_eq!(outcome, Err(libc::SIGBUS), "the child should die of SIGBUS");
}

#[test]
fn poison_raises_sigbus_and_spares_neighbours() {
    for kind in common::kinds("poison_raises_sigbus_and_spares_neighbours") {
        let ps = kind.page_size();
        let outcome = common::fork_child(|| {
            let region = Mapping::new(kind, 3 * ps).expect("map");
            let uffd = open(ALL);
            uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
                .expect("register");
            let poisoned = uffd
                .poison(region.page_addr(1), ps, PoisonMode::empty())
                .expect("poison");
            assert_eq!(poisoned, ps);
            for page in [0, 2] {
                let data = pattern(page, ps, 3);
                // SAFETY: missing page of the child's registered region.
                unsafe { uffd.copy(region.page_addr(page), &data, CopyMode::empty()) }
                    .expect("copy neighbour");
                // SAFETY: present now.
                if unsafe { bytes(region.page_addr(page), ps) } != data.as_slice() {
                    return 2;
                }
            }
            // SAFETY: the poisoned page: this read must raise SIGBUS.
            unsafe { std::ptr::read_volatile(region.page_addr(1) as *const u8) };
            3
        });
        assert_eq!(
            outcome,
            Err(libc::SIGBUS),
            "{kind:?}: child should die of SIGBUS"
        );
    }
}

#[test]
fn minor_fault_on_shared_memory_is_resolved_by_continue() {
    for kind in common::kinds("minor_fault_on_shared_memory_is_resolved_by_continue") {
        if !kind.is_shared() {
            continue;
        }
        let ps = kind.page_size();
        let region = Mapping::new(kind, 2 * ps).expect("map");
        let alias = region.alias().expect("alias");
        let uffd = open(ALL);
        uffd.register(region.addr(), region.len(), RegisterMode::MINOR)
            .expect("register MINOR");
        let data = pattern(1, ps, 11);
        // SAFETY: the alias is unregistered: this fills the page cache without a fault.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), alias.as_ptr().add(ps), ps) };
        let reader = read_on_thread(region.page_addr(1) + 17);
        let (addr, flags) = fault_addr(next_event(&uffd, &mut EventBuffer::new(4)));
        assert_eq!(addr, region.page_addr(1));
        assert!(flags.contains(FaultFlags::MINOR), "{kind:?}: {flags:?}");
        // SAFETY: the page cache holds what the test staged through the alias.
        let mapped =
            unsafe { uffd.continue_range(addr, ps, ContinueMode::empty()) }.expect("continue");
        assert_eq!(mapped, ps);
        assert_eq!(reader.join().expect("reader"), data[17], "{kind:?}");
    }
}

/// One page of `kind` registered MISSING | WP.
fn wp_page(kind: MemoryKind) -> (Mapping, uffd_core::Uffd) {
    let region = Mapping::new(kind, kind.page_size()).expect("map");
    let uffd = open(ALL);
    uffd.register(
        region.addr(),
        region.len(),
        RegisterMode::MISSING | RegisterMode::WP,
    )
    .expect("register MISSING|WP");
    (region, uffd)
}

#[test]
fn write_protect_fault_is_reported_and_unprotect_releases_the_writer() {
    for kind in common::kinds("write_protect_fault_is_reported_and_unprotect_releases_the_writer") {
        let ps = kind.page_size();
        let (region, uffd) = wp_page(kind);
        let data = pattern(0, ps, 4);
        // SAFETY: missing page of our registered region.
        unsafe { uffd.copy(region.addr(), &data, CopyMode::empty()) }.expect("copy");
        uffd.write_protect(region.addr(), ps, WriteProtectMode::WP)
            .expect("protect");
        let writer = write_on_thread(region.addr() + 5, 0xEE);
        let (addr, flags) = fault_addr(next_event(&uffd, &mut EventBuffer::new(4)));
        assert_eq!(addr, region.addr());
        assert!(
            flags.contains(FaultFlags::WP | FaultFlags::WRITE),
            "{kind:?}: {flags:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !writer.is_finished(),
            "{kind:?}: writer passed a write-protected page"
        );
        uffd.write_protect(region.addr(), ps, WriteProtectMode::empty())
            .expect("unprotect");
        writer.join().expect("writer");
        // SAFETY: present and now writable.
        let now = unsafe { bytes(region.addr(), ps) };
        assert_eq!(now[5], 0xEE, "{kind:?}");
        assert_eq!(now[6], data[6], "{kind:?}: rest of the page kept");
    }
}

#[test]
fn copy_in_wp_mode_maps_the_page_write_protected() {
    for kind in common::kinds("copy_in_wp_mode_maps_the_page_write_protected") {
        let ps = kind.page_size();
        let (region, uffd) = wp_page(kind);
        let mut buf = EventBuffer::new(4);
        let reader = read_on_thread(region.addr());
        let (addr, _) = fault_addr(next_event(&uffd, &mut buf));
        let data = pattern(0, ps, 8);
        // SAFETY: missing page of our registered region.
        unsafe { uffd.copy(addr, &data, CopyMode::WP) }.expect("copy WP");
        assert_eq!(reader.join().expect("reader"), data[0], "reads pass");
        let writer = write_on_thread(region.addr(), 0x11);
        let (_, flags) = fault_addr(next_event(&uffd, &mut buf));
        assert!(
            flags.contains(FaultFlags::WP),
            "{kind:?}: write hit the WP bit"
        );
        uffd.write_protect(addr, ps, WriteProtectMode::empty())
            .expect("unprotect");
        writer.join().expect("writer");
        // SAFETY: present.
        assert_eq!(unsafe { bytes(addr, 1) }[0], 0x11);
    }
}
