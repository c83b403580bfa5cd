//! Tests that fork. Each runs in a process of its own with a watchdog (`testkit::isolated`):
//! a fork anywhere in a process whose pager has fork events on is a FORK event for that
//! pager, and a deadlock around `fork()` must fail its test, not stall the suite.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use page_state::PageState;
use pager::{
    ChildSource, DeliveryMode, Features, Fetched, Mapping, MemoryKind, MemorySource, Pager, Placer,
    RegionSpec, Source, SourceError, Uffd,
};

const PS: usize = 4096;
const WATCHDOG: Duration = Duration::from_secs(240);

fn uffd_with(features: Features) -> Uffd {
    Uffd::builder()
        .non_blocking(true)
        .require(features | Features::EVENT_REMOVE)
        .open()
        .expect("uffd")
}

#[test]
fn a_child_sends_its_uffd_and_the_pager_serves_the_child() {
    if !testkit::isolated(
        "a_child_sends_its_uffd_and_the_pager_serves_the_child",
        WATCHDOG,
    ) {
        return;
    }
    let pages = 32;
    let image = common::image(pages, PS, 3);
    let child_image = image.clone();
    let (pid, uffd, base, len) = common::child_with_uffd(pages, move |memory| {
        // SAFETY: the child's registered region, served by the parent.
        let got = unsafe { common::bytes(memory.addr(), memory.len()) };
        i32::from(got != child_image.as_slice())
    });
    let builder = Pager::builder(uffd, Arc::new(MemorySource::new(image).with_zero_scan(PS)));
    // SAFETY: the child's registered region, in the child's address space (its uffd).
    let pager = unsafe { builder.region(RegionSpec::new(base, len, MemoryKind::Anon, 0)) }
        .register(false)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    assert_eq!(common::wait(pid), 0, "child verified its memory");
    let stats = pager.stop().expect("stop");
    assert_eq!(stats.placed(), pages as u64);
    assert_eq!(
        stats.placed_zero,
        (pages / 3) as u64,
        "known-zero pages sent as zero pages"
    );
}

/// `pages` of an image served with fork events on, one handler thread, into memory of
/// this process.
fn forking_pager(pages: usize) -> (Vec<u8>, Arc<Mapping>, Pager) {
    let image = common::image(pages, PS, 0);
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(
        uffd_with(Features::EVENT_FORK),
        Arc::new(MemorySource::new(image.clone())),
    )
    .mapping(memory.clone(), 0)
    .mode(DeliveryMode::Thread)
    .start()
    .expect("start");
    (image, memory, pager)
}

#[test]
fn a_forked_child_is_served_by_a_child_engine() {
    if !testkit::isolated("a_forked_child_is_served_by_a_child_engine", WATCHDOG) {
        return;
    }
    let pages = 64;
    let (image, memory, pager) = forking_pager(pages);
    // The parent faults the first half in; the child inherits those pages and faults the
    // second half through its own uffd, served by the engine the fork event started.
    // SAFETY: served region.
    let half = unsafe { common::bytes(memory.addr(), pages / 2 * PS) };
    assert_eq!(half, &image[..pages / 2 * PS]);
    let (addr, expect) = (memory.addr(), image.clone());
    // SAFETY: the child only reads memory and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: the child's copy of the region.
        let got = unsafe { common::bytes(addr, pages * PS) };
        let code = i32::from(got != expect.as_slice());
        // SAFETY: ends the child.
        unsafe { libc::_exit(code) };
    }
    assert_eq!(
        common::wait(pid),
        0,
        "the child read the image through its own uffd"
    );
    let stats = pager.stop().expect("stop");
    assert_eq!(stats.events_fork, 1);
    assert_eq!(stats.forks_served, 1);
}

/// What a forked child of the storm reports.
const CHILD_SERVED: i32 = 0;
const CHILD_WRONG: i32 = 1;
const CHILD_SAW_ZEROS: i32 = 3;
/// Killed by SIGBUS: a refused child touching a poisoned page.
const CHILD_SIGBUS: i32 = 128 + libc::SIGBUS;

/// In a forked child: reads `count` pages picked from its pid, and says whether each was
/// its image data (served), all zeros (never: a refused child's pages are poisoned, and
/// it dies of SIGBUS), or anything else (wrong).
/// Async-signal-safe only: memory reads, `getpid(2)`, `_exit(2)`.
fn child_reads_and_exits(addr: usize, pages: usize, image: &[u8], count: usize) -> ! {
    let mut x = nix::unistd::getpid().as_raw() as u64 | 1;
    let mut code = CHILD_SERVED;
    for _ in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = x as usize % pages;
        // SAFETY: the child's copy of the served region.
        let got = unsafe { common::bytes(addr + page * PS, PS) };
        if got == &image[page * PS..(page + 1) * PS] {
            continue;
        }
        code = if got.iter().all(|&b| b == 0) {
            CHILD_SAW_ZEROS
        } else {
            CHILD_WRONG
        };
        break;
    }
    // SAFETY: ends the child without running the parent's exit handlers.
    unsafe { libc::_exit(code) }
}

#[test]
fn a_thousand_forks_while_faults_are_served_never_hang_and_every_child_is_served_or_refused() {
    let name =
        "a_thousand_forks_while_faults_are_served_never_hang_and_every_child_is_served_or_refused";
    if !testkit::isolated(name, WATCHDOG) {
        return;
    }
    const FORKS: u64 = 1000;
    let pages = 1024;
    let image = Arc::new(common::image(pages, PS, 0));
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(
        uffd_with(Features::EVENT_FORK),
        Arc::new(MemorySource::new(image.as_slice().to_vec())),
    )
    .mapping(memory.clone(), 0)
    .mode(DeliveryMode::PerCpu)
    .start()
    .expect("start");
    let addr = memory.addr();
    let stop = AtomicBool::new(false);
    let forks = AtomicU64::new(0);
    let (served, zeros, wrong) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let refused = AtomicU64::new(0);
    let parent_reads = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        // A busy loop competing for each CPU.
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(SeqCst) {
                    std::hint::spin_loop();
                }
            });
        }
        // The parent's own workload faults pages in all along.
        s.spawn(|| {
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            while !stop.load(SeqCst) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = x as usize % pages;
                // SAFETY: served region.
                let got = unsafe { common::bytes(addr + page * PS, PS) };
                assert_eq!(
                    got,
                    &image[page * PS..(page + 1) * PS],
                    "parent page {page}"
                );
                parent_reads.fetch_add(1, SeqCst);
            }
        });
        // Two threads fork in a loop; each child reads pages and exits.
        let forkers: Vec<_> = (0..2)
            .map(|_| {
                let image = image.clone();
                let (forks, served, zeros, wrong) = (&forks, &served, &zeros, &wrong);
                let refused = &refused;
                s.spawn(move || {
                    while forks.fetch_add(1, SeqCst) < FORKS {
                        // SAFETY: the child only reads memory and `_exit`s.
                        let pid = unsafe { libc::fork() };
                        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
                        if pid == 0 {
                            child_reads_and_exits(addr, pages, &image, 4);
                        }
                        match common::wait(pid) {
                            CHILD_SERVED => served.fetch_add(1, SeqCst),
                            CHILD_SIGBUS => refused.fetch_add(1, SeqCst),
                            CHILD_SAW_ZEROS => zeros.fetch_add(1, SeqCst),
                            _ => wrong.fetch_add(1, SeqCst),
                        };
                    }
                })
            })
            .collect();
        for f in forkers {
            f.join().expect("forking thread");
        }
        stop.store(true, SeqCst);
    });
    let took = started.elapsed();
    let stats = pager.stop().expect("stop");
    let (served, zeros, wrong) = (served.into_inner(), zeros.into_inner(), wrong.into_inner());
    let refused = refused.into_inner();
    eprintln!(
        "{FORKS} forks in {took:?}: children served {served}, died of SIGBUS {refused}, saw \
         zeros {zeros}, wrong {wrong}; parent reads {}; engine: forks served {}, refused {}, \
         failed {}",
        parent_reads.load(SeqCst),
        stats.forks_served,
        stats.forks_refused,
        stats.forks_failed
    );
    assert_eq!(wrong, 0, "no child read a wrong page");
    assert_eq!(
        zeros, 0,
        "no child read zeros: a refused child's pages are poisoned"
    );
    assert_eq!(served + refused, FORKS);
    assert_eq!(stats.events_fork, FORKS, "every fork was seen");
    assert_eq!(
        stats.forks_served + stats.forks_refused + stats.forks_failed,
        FORKS,
        "every child was served or refused, none dropped"
    );
    assert!(
        refused <= stats.forks_refused + stats.forks_failed,
        "only refused children died of SIGBUS: {refused} > {}",
        stats.forks_refused + stats.forks_failed
    );
    assert_eq!(stats.forks_failed, 0, "no child engine failed to start");
}

/// A remote source: `fetch` asks (answers `Pending`, allocating nothing, taking no lock:
/// fork events are on), and a server thread of its own places every Requested page
/// through the placer it was attached to. `child` says how a forked child is served.
struct Remote {
    image: Arc<Vec<u8>>,
    children: ChildPolicy,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChildPolicy {
    /// Says nothing (the trait's default): what remote sources did before.
    Default,
    /// A remote source of the child's own.
    Own,
    /// Refused.
    Refuse,
}

impl Source for Remote {
    fn len(&self) -> u64 {
        self.image.len() as u64
    }
    fn fetch<'a>(&'a self, _: u64, _: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        Ok(Fetched::Pending)
    }
    fn attach(&self, placer: Placer) {
        let image = self.image.clone();
        std::thread::spawn(move || {
            let pages = image.len() / PS;
            // Until the pager is gone (its placer then answers None).
            while placer.state(0).is_some() {
                for page in 0..pages {
                    if placer.state(page) == Some(PageState::Requested) {
                        let data = &image[page * PS..(page + 1) * PS];
                        let _ = placer.place((page * PS) as u64, Some(data));
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    }
    fn child(&self) -> ChildSource {
        match self.children {
            ChildPolicy::Default => ChildSource::Shared,
            ChildPolicy::Own => ChildSource::Own(Arc::new(Remote {
                image: self.image.clone(),
                children: ChildPolicy::Refuse,
            })),
            ChildPolicy::Refuse => ChildSource::Refuse("a remote test source serves one process"),
        }
    }
}

/// Forks a child that reads every page of `memory` and exits 0 if it read the image;
/// returns its exit code (128 + signal if killed), killing it after 20 s (a hang).
fn fork_and_read(memory: &Mapping, image: &[u8]) -> i32 {
    let (addr, len) = (memory.addr(), memory.len());
    // SAFETY: the child only reads memory and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: the child's copy of the served region.
        let got = unsafe { common::bytes(addr, len) };
        let code = i32::from(got != image);
        // SAFETY: ends the child.
        unsafe { libc::_exit(code) };
    }
    common::wait_bounded(pid)
}

/// Serves `memory` from a remote source with fork events on; the parent reads the first
/// half, then a child reads everything. Returns the child's outcome and the stats.
fn remote_fork(policy: ChildPolicy) -> (i32, pager::StatsSnapshot) {
    let pages = 32;
    let image = Arc::new(common::image(pages, PS, 0));
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let source = Arc::new(Remote {
        image: image.clone(),
        children: policy,
    });
    let pager = Pager::builder(uffd_with(Features::EVENT_FORK), source)
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    // SAFETY: served region.
    let half = unsafe { common::bytes(memory.addr(), pages / 2 * PS) };
    assert_eq!(half, &image[..pages / 2 * PS]);
    let outcome = fork_and_read(&memory, &image);
    let stats = pager.stop().expect("the parent's pager is fine");
    (outcome, stats)
}

#[test]
fn a_forked_child_of_a_remote_source_that_says_nothing_is_failed_and_poisoned_never_left_blocked() {
    let name =
        "a_forked_child_of_a_remote_source_that_says_nothing_is_failed_and_poisoned_never_left_blocked";
    if !testkit::isolated(name, WATCHDOG) {
        return;
    }
    let (outcome, stats) = remote_fork(ChildPolicy::Default);
    assert_eq!(
        outcome, CHILD_SIGBUS,
        "the child dies of SIGBUS (-1: it hung)"
    );
    assert_eq!(stats.forks_served, 1);
    assert_eq!(
        stats.forks_failed, 1,
        "its engine's failure is counted: {stats:?}"
    );
}

#[test]
fn a_forked_child_refused_by_its_remote_source_dies_of_sigbus_and_is_counted() {
    let name = "a_forked_child_refused_by_its_remote_source_dies_of_sigbus_and_is_counted";
    if !testkit::isolated(name, WATCHDOG) {
        return;
    }
    let (outcome, stats) = remote_fork(ChildPolicy::Refuse);
    assert_eq!(
        outcome, CHILD_SIGBUS,
        "the child dies of SIGBUS (-1: it hung)"
    );
    assert_eq!(
        (stats.forks_served, stats.forks_refused),
        (0, 1),
        "{stats:?}"
    );
}

#[test]
fn a_forked_child_with_a_remote_source_of_its_own_is_served() {
    let name = "a_forked_child_with_a_remote_source_of_its_own_is_served";
    if !testkit::isolated(name, WATCHDOG) {
        return;
    }
    let (outcome, stats) = remote_fork(ChildPolicy::Own);
    assert_eq!(outcome, 0, "the child read the image (-1: it hung)");
    assert_eq!(
        (stats.forks_served, stats.forks_refused),
        (1, 0),
        "{stats:?}"
    );
}

#[test]
fn a_child_forked_after_a_remap_is_served_at_the_moved_address() {
    if !testkit::isolated(
        "fork::a_child_forked_after_a_remap_is_served_at_the_moved_address",
        WATCHDOG,
    ) {
        return;
    }
    let pages = 8;
    let image = common::image(pages, PS, 0);
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: fresh mappings of our own.
    let (base, target) = unsafe {
        (
            libc::mmap(std::ptr::null_mut(), pages * PS, rw, anon, -1, 0),
            libc::mmap(std::ptr::null_mut(), pages * PS, rw, anon, -1, 0),
        )
    };
    assert!(
        base != libc::MAP_FAILED && target != libc::MAP_FAILED,
        "mmap"
    );
    let (base, target) = (base as usize, target as usize);
    let uffd = uffd_with(Features::EVENT_UNMAP | Features::EVENT_REMAP | Features::EVENT_FORK);
    let builder = Pager::builder(uffd, Arc::new(MemorySource::new(image.clone())));
    // SAFETY: our own mapping, only read raw, moved only with the pager told (REMAP).
    let pager = unsafe { builder.region(RegionSpec::new(base, pages * PS, MemoryKind::Anon, 0)) }
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    // SAFETY: moves our mapping onto our other one, which it replaces.
    let moved = unsafe {
        libc::mremap(
            base as *mut _,
            pages * PS,
            pages * PS,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target as *mut libc::c_void,
        )
    };
    assert_eq!(moved as usize, target, "mremap");
    // Reading a page is a fault the handler reads after the REMAP event: the table moved.
    // SAFETY: served by the pager.
    let page = unsafe { common::bytes(target, PS) };
    assert_eq!(page, &image[..PS], "parent after REMAP");
    // SAFETY: the child only reads a page and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: the child's copy of the served region.
        let ok = unsafe { common::bytes(target + PS, PS) } == &image[PS..2 * PS];
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(i32::from(!ok)) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = 0;
    // SAFETY: our child, polled without blocking.
    while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != pid {
        if Instant::now() >= deadline {
            // SAFETY: our child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the child's fault on the moved region is not resolved in 10 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child read its page at the moved address: status {status:#x}"
    );
    let stats = pager.stop().expect("stop");
    assert_eq!(stats.forks_served, 1);
}

/// How the parent's pager ends while a forked child runs on.
#[derive(Clone, Copy, Debug)]
enum ParentEnd {
    /// A fatal error (here the embedder's `fail`).
    Fails,
    /// The embedder's `stop`.
    Stops,
}

/// Serves 16 pages with fork events on and forks a child that waits for the parent's word,
/// then reads page 9, which nobody had touched at the fork. The parent's pager ends as
/// told before the word is given. Returns how the child ended (`CHILD_*`, -1: it hung), and
/// the parent's final counters if its pager stopped cleanly.
fn child_after_its_parents_pager_ends(end: ParentEnd) -> (i32, Option<pager::StatsSnapshot>) {
    let pages = 16;
    let (image, memory, pager) = forking_pager(pages);
    let (word_in, word_out) = nix::unistd::pipe().expect("pipe");
    let page = memory.addr() + 9 * PS;
    // SAFETY: the child only reads a pipe and memory, and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut word = [0u8; 1];
        let code = match nix::unistd::read(&word_in, &mut word) {
            Ok(1) => {
                // SAFETY: the child's copy of the served region.
                let got = unsafe { common::bytes(page, PS) };
                if got == &image[9 * PS..10 * PS] {
                    CHILD_SERVED
                } else if got.iter().all(|&b| b == 0) {
                    CHILD_SAW_ZEROS
                } else {
                    CHILD_WRONG
                }
            }
            _ => CHILD_WRONG,
        };
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pager.stats().forks_served == 0 {
        assert!(Instant::now() < deadline, "the child is served");
        std::thread::sleep(Duration::from_millis(1));
    }
    if let ParentEnd::Fails = end {
        pager.fail(SourceError {
            what: "the embedder gave up",
            offset: 0,
            source: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        });
    }
    let stats = pager.stop().ok();
    nix::unistd::write(&word_out, b"x").expect("the word");
    (common::wait_bounded(pid), stats)
}

#[test]
fn a_forked_child_whose_parents_pager_fails_gets_sigbus_not_zeros() {
    let name = "fork::a_forked_child_whose_parents_pager_fails_gets_sigbus_not_zeros";
    if !testkit::isolated(name, WATCHDOG) {
        return;
    }
    let (outcome, stats) = child_after_its_parents_pager_ends(ParentEnd::Fails);
    assert_eq!(
        outcome, CHILD_SIGBUS,
        "the child dies of SIGBUS (3: it read zeros, -1: it hung)"
    );
    assert!(stats.is_none(), "the parent's pager failed");
}

#[test]
fn a_forked_child_still_running_when_its_parents_pager_stops_gets_sigbus_not_zeros() {
    let name =
        "fork::a_forked_child_still_running_when_its_parents_pager_stops_gets_sigbus_not_zeros";
    if !testkit::isolated(name, WATCHDOG) {
        return;
    }
    let (outcome, stats) = child_after_its_parents_pager_ends(ParentEnd::Stops);
    assert_eq!(
        outcome, CHILD_SIGBUS,
        "the child dies of SIGBUS (3: it read zeros, -1: it hung)"
    );
    let stats = stats.expect("the parent's pager stops cleanly");
    assert_eq!(
        stats.forks_failed, 1,
        "the child's engine, stopped with pages unplaced, is counted: {stats:?}"
    );
}

/// Shared memory resolved in MINOR mode is one page cache for parent and child (fork
/// copies no page table entries of a shared mapping: the child faults on every page). The
/// child sees what the parent wrote, and its engine never writes over it: before, the
/// child's engine, starting with every page missing, wrote the image over the parent's
/// page, in the child's view and in the parent's.
#[test]
fn a_forked_child_of_a_minor_region_sees_its_parents_writes_and_never_overwrites_them() {
    let name =
        "fork::a_forked_child_of_a_minor_region_sees_its_parents_writes_and_never_overwrites_them";
    if !testkit::isolated(name, WATCHDOG) {
        return;
    }
    let pages = 8;
    let image = common::image(pages, PS, 0);
    let memory = Arc::new(Mapping::new(MemoryKind::Shmem, pages * PS).expect("map"));
    let pager = Pager::builder(
        uffd_with(Features::EVENT_FORK | Features::MINOR_SHMEM),
        Arc::new(MemorySource::new(image.clone())),
    )
    .mapping_minor(memory.clone(), 0)
    .mode(DeliveryMode::Thread)
    .start()
    .expect("start");
    let page = |i: usize| memory.addr() + i * PS;
    // SAFETY: the served region; page 2 is placed by the read, then written.
    unsafe {
        assert_eq!(common::bytes(page(2), PS), &image[2 * PS..3 * PS]);
        std::ptr::write_bytes(page(2) as *mut u8, 0x5A, PS);
    }
    let (written, untouched) = (page(2), page(4));
    // SAFETY: the child only reads memory and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: the child's view of the shared region.
        let (a, b) = unsafe { (common::bytes(written, PS), common::bytes(untouched, PS)) };
        let ok = a.iter().all(|&x| x == 0x5A) && b == &image[4 * PS..5 * PS];
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(if ok { CHILD_SERVED } else { CHILD_WRONG }) };
    }
    let outcome = common::wait_bounded(pid);
    // SAFETY: the served region.
    let after = unsafe { common::bytes(page(2), PS) };
    assert!(
        after.iter().all(|&x| x == 0x5A),
        "the parent's page keeps what it wrote, not {:?}",
        &after[..8]
    );
    assert_eq!(
        outcome, CHILD_SERVED,
        "the child sees the parent's bytes and the image elsewhere (1: other bytes, -1: hung)"
    );
    pager.stop().expect("stop");
}
