//! Non-fault events (fork, remap, remove, unmap) and the mmap-changing EAGAIN protocol.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{next_event, open, pattern};
use uffd_core::{
    ContinueMode, CopyMode, Error, Event, EventBuffer, Features, Mapping, MemoryKind, MoveMode,
    PoisonMode, RegisterMode, ZeropageMode,
};

const PS: usize = 4096;

#[test]
fn fork_event_delivers_a_uffd_that_serves_the_child() {
    let region = Mapping::new(MemoryKind::Anon, 2 * PS).expect("map");
    let uffd = Arc::new(open(Features::EVENT_FORK));
    uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
        .expect("register");
    let base = region.addr();
    // fork() blocks until the fork event is read, so the reader must be another thread;
    // and glibc holds its malloc locks across the fork syscall, so that thread must not
    // allocate until it has read the event: it allocates first, then meets us.
    let ready = Arc::new(std::sync::Barrier::new(2));
    let server = {
        let (uffd, ready) = (uffd.clone(), ready.clone());
        std::thread::spawn(move || {
            let mut buf = EventBuffer::new(4);
            ready.wait();
            let Event::Fork { uffd: child } = next_event(&uffd, &mut buf) else {
                panic!("expected a fork event");
            };
            assert_eq!(child.features(), uffd.features(), "child inherits features");
            let Event::Pagefault { addr, .. } = next_event(&child, &mut buf) else {
                panic!("expected the child's fault");
            };
            assert_eq!(addr, base + PS, "the child's fault address");
            // SAFETY: a missing page of the child's copy of the registered region.
            unsafe { child.copy(addr, &pattern(1, PS, 21), CopyMode::empty()) }
                .expect("copy into the child");
        })
    };
    ready.wait();
    let status = common::fork_child(move || {
        // SAFETY: page 1 of the region, served through the child's uffd.
        let got = unsafe { common::bytes(base + PS, PS) };
        i32::from(got != pattern(1, PS, 21).as_slice())
    });
    server.join().expect("server thread");
    assert_eq!(status, Ok(0), "child saw the served content");
}

#[test]
fn remap_event_reports_old_and_new_address() {
    let region = Mapping::new(MemoryKind::Anon, 2 * PS).expect("map");
    let target = Mapping::new(MemoryKind::Anon, 2 * PS).expect("map target");
    let uffd = open(Features::EVENT_REMAP);
    uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
        .expect("register");
    let (from, to, len) = (region.addr(), target.addr(), region.len());
    let mover = std::thread::spawn(move || region.move_onto(target).expect("mremap"));
    let event = next_event(&uffd, &mut EventBuffer::new(4));
    let moved = mover.join().expect("mremap thread");
    assert_eq!(moved.addr(), to);
    match event {
        Event::Remap {
            from: f,
            to: t,
            len: l,
        } => assert_eq!((f, t, l), (from, to, len)),
        other => panic!("expected remap, got {other:?}"),
    }
}

#[test]
fn remove_event_reports_the_dropped_range() {
    let region = Mapping::new(MemoryKind::Anon, 4 * PS).expect("map");
    let uffd = open(Features::EVENT_REMOVE);
    uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
        .expect("register");
    // SAFETY: missing page of our registered region.
    unsafe { uffd.copy(region.page_addr(1), &pattern(1, PS, 0), CopyMode::empty()) }
        .expect("populate");
    let (addr, len) = (region.page_addr(1), 2 * PS);
    let dropper = std::thread::spawn(move || {
        // SAFETY: a range of our mapping.
        let r = unsafe { libc::madvise(addr as *mut _, len, libc::MADV_DONTNEED) };
        assert_eq!(r, 0);
    });
    let event = next_event(&uffd, &mut EventBuffer::new(4));
    dropper.join().expect("madvise thread");
    match event {
        Event::Remove { start, end } => assert_eq!((start, end), (addr, addr + len)),
        other => panic!("expected remove, got {other:?}"),
    }
}

#[test]
fn unmap_event_reports_the_unmapped_range() {
    let region = Mapping::new(MemoryKind::Anon, 4 * PS).expect("map");
    let uffd = open(Features::EVENT_UNMAP);
    uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
        .expect("register");
    let (start, len) = region.leak();
    let unmapper = std::thread::spawn(move || {
        // SAFETY: the leaked range is ours to unmap.
        assert_eq!(unsafe { libc::munmap(start as *mut _, len) }, 0);
    });
    let event = next_event(&uffd, &mut EventBuffer::new(4));
    unmapper.join().expect("munmap thread");
    match event {
        Event::Unmap { start: s, end } => assert_eq!((s, end), (start, start + len)),
        other => panic!("expected unmap, got {other:?}"),
    }
}

#[test]
fn placements_return_again_with_nothing_done_while_a_remove_is_unread() {
    let anon = Mapping::new(MemoryKind::Anon, 4 * PS).expect("map anon");
    let shmem = Mapping::new(MemoryKind::Shmem, PS).expect("map shmem");
    let alias = shmem.alias().expect("alias");
    let src = Mapping::new(MemoryKind::Anon, PS).expect("map src");
    src.madvise(0, PS, libc::MADV_DONTFORK)
        .expect("MADV_DONTFORK");
    // SAFETY: our unregistered mappings.
    unsafe {
        std::ptr::write_volatile(src.as_ptr(), 1);
        std::ptr::write_volatile(alias.as_ptr(), 2);
    }
    let uffd =
        open(Features::EVENT_REMOVE | Features::MOVE | Features::POISON | Features::MINOR_SHMEM);
    uffd.register(anon.addr(), anon.len(), RegisterMode::MISSING)
        .expect("register anon");
    uffd.register(shmem.addr(), shmem.len(), RegisterMode::MINOR)
        .expect("register shmem");
    let victim = anon.page_addr(0);
    let dropper = std::thread::spawn(move || {
        // SAFETY: a page of our mapping.
        let r = unsafe { libc::madvise(victim as *mut _, PS, libc::MADV_DONTNEED) };
        assert_eq!(r, 0);
    });
    assert!(
        uffd.wait_readable(Some(Duration::from_secs(5)))
            .expect("poll"),
        "REMOVE pending"
    );

    let data = pattern(1, PS, 1);
    let dst = anon.page_addr(1);
    let again = |r: Result<usize, Error>, what: &str| match r {
        Err(Error::Again { done: 0, .. }) => {}
        other => panic!("{what}: expected Again {{ done: 0 }}, got {other:?}"),
    };
    // SAFETY: a missing page of our registered region.
    let copy = unsafe { uffd.copy(dst, &data, CopyMode::empty()) };
    again(copy, "copy");
    // SAFETY: as for the copy.
    let zero = unsafe { uffd.zeropage(dst, PS, ZeropageMode::empty()) };
    again(zero, "zeropage");
    // SAFETY: dst as above; src is our own page.
    let moved = unsafe { uffd.move_pages(dst, src.addr(), PS, MoveMode::empty()) };
    again(moved, "move");
    let poison = uffd.poison(anon.page_addr(2), PS, PoisonMode::empty());
    again(poison, "poison");
    // SAFETY: the shmem page cache holds what we wrote through the alias.
    let cont = unsafe { uffd.continue_range(shmem.addr(), PS, ContinueMode::empty()) };
    again(cont, "continue");

    let event = next_event(&uffd, &mut EventBuffer::new(4));
    assert!(matches!(event, Event::Remove { .. }), "{event:?}");
    dropper.join().expect("madvise thread");
    // SAFETY: as above.
    let placed = unsafe { uffd.copy(dst, &data, CopyMode::empty()) }.expect("copy after read");
    assert_eq!(placed, PS);
}

#[test]
fn partial_copy_reports_again_with_the_bytes_done() {
    let region = Mapping::new(MemoryKind::Anon, 3 * PS).expect("map");
    let uffd = open(Features::empty());
    uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
        .expect("register");
    // SAFETY: missing page of our registered region.
    unsafe { uffd.copy(region.page_addr(1), &pattern(1, PS, 0), CopyMode::empty()) }
        .expect("occupy page 1");
    let three = pattern(0, 3 * PS, 0);
    // SAFETY: as above; page 1 is present so the kernel stops there.
    let r = unsafe { uffd.copy(region.addr(), &three, CopyMode::empty()) };
    match r {
        Err(Error::Again { done, .. }) => assert_eq!(done, PS, "one page before the present one"),
        other => panic!("expected a partial copy, got {other:?}"),
    }
}

#[test]
fn fault_events_carry_the_faulting_thread_id_when_asked() {
    let region = Mapping::new(MemoryKind::Anon, PS).expect("map");
    let uffd = open(Features::THREAD_ID);
    uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
        .expect("register");
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = region.addr();
    let reader = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() } as u32).expect("send tid");
        // SAFETY: our registered page; the test thread serves it.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    });
    let tid = rx.recv().expect("tid");
    let event = next_event(&uffd, &mut EventBuffer::new(4));
    match event {
        Event::Pagefault { thread, .. } => assert_eq!(thread, Some(tid)),
        other => panic!("{other:?}"),
    }
    // SAFETY: a missing page of our own registered anonymous region.
    unsafe { uffd.zeropage(addr, PS, ZeropageMode::empty()) }.expect("zeropage");
    reader.join().expect("reader");
}

#[test]
fn nonblocking_read_with_nothing_pending_is_not_an_error() {
    let uffd = open(Features::empty());
    let mut buf = EventBuffer::new(4);
    assert_eq!(
        uffd.read_events(&mut buf).expect("read"),
        uffd_core::ReadStatus::WouldBlock
    );
    assert!(buf.events().is_empty());
}

#[test]
fn many_faults_are_read_in_one_batch() {
    let pages = 8;
    let region = Mapping::new(MemoryKind::Anon, pages * PS).expect("map");
    let uffd = open(Features::empty());
    uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
        .expect("register");
    let readers: Vec<_> = (0..pages)
        .map(|p| common::read_on_thread(region.page_addr(p)))
        .collect();
    // Let every reader block before the single read.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fdinfo_pending(&uffd) < pages {
        assert!(
            std::time::Instant::now() < deadline,
            "faults never all pending"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut buf = EventBuffer::new(64);
    assert_eq!(
        uffd.read_events(&mut buf).expect("read"),
        uffd_core::ReadStatus::Events(pages),
        "one read returns every pending fault"
    );
    // SAFETY: our own registered region, every page of it ours to decide.
    unsafe { uffd.zeropage(region.addr(), region.len(), ZeropageMode::empty()) }
        .expect("zeropage all");
    for r in readers {
        assert_eq!(r.join().expect("reader"), 0);
    }
}

/// The `pending:` count of faults not yet read, from fdinfo.
fn fdinfo_pending(uffd: &uffd_core::Uffd) -> usize {
    use std::os::fd::AsRawFd;
    let info =
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", uffd.as_raw_fd())).expect("fdinfo");
    info.lines()
        .find_map(|l| l.strip_prefix("pending:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("pending line")
}

/// Whether `addr`'s page is mapped (`mincore(2)` fails with ENOMEM on a hole).
fn is_mapped(addr: usize) -> bool {
    let mut v = 0u8;
    // SAFETY: mincore writes one byte per page of the one-page range into `v`.
    unsafe { libc::mincore(addr as *mut _, PS, &mut v) == 0 }
}

/// A failed `mremap` may have moved part of the source (since Linux 6.17 it moves VMA by
/// VMA, and stops at one it may not move: here, a page registered without
/// `EVENT_REMAP`), leaving a hole there that another thread can map. `move_onto`'s error
/// must not unmap what is no longer its own. The target's registration with
/// `EVENT_UNMAP` holds the mover in `mremap` until its event is read, so the hole is
/// taken at a known moment.
#[test]
fn a_failed_move_onto_leaves_alone_what_another_thread_mapped_in_the_holes_it_left() {
    let region = Mapping::new(MemoryKind::Anon, 3 * PS).expect("map");
    let target = Mapping::new(MemoryKind::Anon, 3 * PS).expect("map target");
    // SAFETY: inside our unregistered region.
    unsafe { std::ptr::write_volatile(region.as_ptr(), 1) };
    let uffd = open(Features::EVENT_UNMAP);
    uffd.register(region.addr() + PS, PS, RegisterMode::MISSING)
        .expect("register the source's middle page");
    uffd.register(target.addr(), target.len(), RegisterMode::MISSING)
        .expect("register the target");
    let hole = region.addr();
    let mover = std::thread::spawn(move || region.move_onto(target).map(drop));
    let mut buf = EventBuffer::new(4);
    assert!(
        uffd.wait_readable(Some(Duration::from_secs(5)))
            .expect("poll"),
        "the target's UNMAP event"
    );
    // The mover waits in mremap for its event to be read. If its first page moved, that
    // page is a hole now: another thread maps its own memory there.
    let moved_first = !is_mapped(hole);
    let foreign = moved_first.then(|| {
        // SAFETY: a new private page at a free address (MAP_FIXED_NOREPLACE fails
        // rather than replace anything); the test owns it.
        let p = unsafe {
            libc::mmap(
                hole as *mut _,
                PS,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        assert_eq!(p as usize, hole, "map the hole");
        // SAFETY: the page just mapped.
        unsafe { std::ptr::write_volatile(hole as *mut u8, 0x77) };
    });
    // Read events until the mover is done: its own unmaps raise more UNMAP events.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !mover.is_finished() {
        assert!(std::time::Instant::now() < deadline, "the mover is stuck");
        if uffd
            .wait_readable(Some(Duration::from_millis(10)))
            .expect("poll")
        {
            uffd.read_events(&mut buf).expect("read");
        }
    }
    let moved = mover.join().expect("the mover");
    assert!(moved.is_err(), "the move stops at the registered page");
    if foreign.is_none() {
        common::skip(
            "a_failed_move_onto_leaves_alone_what_another_thread_mapped_in_the_holes_it_left",
            "this kernel moved nothing before failing (before Linux 6.17)",
        );
        return;
    }
    assert!(is_mapped(hole), "move_onto unmapped another thread's page");
    // SAFETY: mapped, as just checked.
    assert_eq!(unsafe { std::ptr::read_volatile(hole as *const u8) }, 0x77);
    // SAFETY: the test's own page.
    unsafe { libc::munmap(hole as *mut _, PS) };
}
