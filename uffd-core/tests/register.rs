//! `UFFDIO_REGISTER`: the ioctl set each mode yields on each memory kind.

use crate::common;

use nix::errno::Errno;
use uffd_core::{Error, Features, Ioctls, Mapping, MemoryKind, RegisterMode, MODE_COMBINATIONS};

/// Every feature that widens what can be registered.
fn all_register_features() -> Features {
    Features::MISSING_SHMEM
        | Features::MISSING_HUGETLBFS
        | Features::MINOR_SHMEM
        | Features::MINOR_HUGETLBFS
        | Features::WP_HUGETLBFS_SHMEM
        | Features::PAGEFAULT_FLAG_WP
        | Features::MOVE
        | Features::POISON
}

/// What kernel 6.18 promises (fs/userfaultfd.c, userfaultfd_register): hugetlb ranges get
/// the basic set (no ZEROPAGE, no MOVE); CONTINUE only with MINOR; WRITEPROTECT only with
/// WP; MINOR is refused on anonymous memory.
fn expected(kind: MemoryKind, mode: RegisterMode) -> Option<Ioctls> {
    if mode.contains(RegisterMode::MINOR) && kind == MemoryKind::Anon {
        return None;
    }
    let mut ioctls = Ioctls::WAKE | Ioctls::COPY | Ioctls::POISON;
    if !kind.is_hugetlb() {
        ioctls |= Ioctls::ZEROPAGE | Ioctls::MOVE;
    }
    if mode.contains(RegisterMode::MINOR) {
        ioctls |= Ioctls::CONTINUE;
    }
    if mode.contains(RegisterMode::WP) {
        ioctls |= Ioctls::WRITEPROTECT;
    }
    Some(ioctls)
}

#[test]
fn every_mode_combination_yields_the_expected_ioctls() {
    for kind in common::kinds("every_mode_combination_yields_the_expected_ioctls") {
        let region = Mapping::new(kind, kind.page_size() * 2).expect("map");
        for mode in MODE_COMBINATIONS {
            let uffd = common::open(all_register_features());
            let got = uffd.register(region.addr(), region.len(), mode);
            match (expected(kind, mode), got) {
                (Some(want), Ok(got)) => assert_eq!(got, want, "{kind:?} {}", mode.label()),
                (None, Err(e)) => assert_eq!(e.errno(), Some(Errno::EINVAL), "{kind:?}"),
                (want, got) => panic!("{kind:?} {}: want {want:?}, got {got:?}", mode.label()),
            }
        }
    }
}

#[test]
fn minor_mode_on_anon_is_refused() {
    let region = Mapping::new(MemoryKind::Anon, 4096).expect("map");
    let uffd = common::open(Features::MINOR_SHMEM);
    let err = uffd
        .register(region.addr(), region.len(), RegisterMode::MINOR)
        .expect_err("MINOR on anon");
    assert_eq!(err.errno(), Some(Errno::EINVAL));
}

#[test]
fn shmem_without_missing_shmem_feature_still_registers_on_this_kernel() {
    // Since 4.11 shmem MISSING needs no opt-in; the feature bit only advertises it.
    let region = Mapping::new(MemoryKind::Shmem, 4096).expect("map");
    let uffd = common::open(Features::empty());
    let ioctls = uffd
        .register(region.addr(), region.len(), RegisterMode::MISSING)
        .expect("register shmem");
    assert!(ioctls.contains(Ioctls::COPY));
}

#[test]
fn unaligned_or_empty_ranges_are_refused_before_the_kernel() {
    let region = Mapping::new(MemoryKind::Anon, 8192).expect("map");
    let uffd = common::open(Features::empty());
    for (start, len) in [
        (region.addr() + 1, 4096),
        (region.addr(), 100),
        (region.addr(), 0),
    ] {
        match uffd.register(start, len, RegisterMode::MISSING) {
            Err(Error::InvalidArgument { .. }) => {}
            other => panic!("({start:#x}, {len}) gave {other:?}"),
        }
    }
}

#[test]
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn hugetlb_range_must_be_huge_page_aligned() {
    if !common::kinds("hugetlb_range_must_be_huge_page_aligned").contains(&MemoryKind::Hugetlb) {
        return;
    }
    let region = Mapping::new(MemoryKind::Hugetlb, 2 << 20).expect("map");
    let uffd = common::open(Features::MISSING_HUGETLBFS);
    let err = uffd
        .register(region.addr(), 4096, RegisterMode::MISSING)
        .expect_err("4 KiB of a 2 MiB page");
    assert_eq!(err.errno(), Some(Errno::EINVAL));
}

#[test]
fn unregistering_wakes_waiters_who_then_see_zero() {
    let region = Mapping::new(MemoryKind::Anon, 4096).expect("map");
    let uffd = common::open(Features::empty());
    uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
        .expect("register");
    let reader = common::read_on_thread(region.addr());
    let mut buf = uffd_core::EventBuffer::new(4);
    let _fault = common::next_event(&uffd, &mut buf);
    uffd.unregister(region.addr(), region.len())
        .expect("unregister");
    assert_eq!(
        reader.join().expect("reader"),
        0,
        "fault retried without uffd"
    );
}

#[test]
fn registering_unmapped_memory_fails() {
    // Not a range we unmap ourselves: another test thread's mmap may reuse it at once.
    // Nothing maps at 1 MiB: mmap places mappings top-down and the executable, heap and
    // libraries live far higher.
    let (addr, len) = (1usize << 20, 4096);
    let uffd = common::open(Features::empty());
    let err = uffd
        .register(addr, len, RegisterMode::MISSING)
        .expect_err("nothing mapped there");
    assert_eq!(err.errno(), Some(Errno::EINVAL), "{err}");
}
