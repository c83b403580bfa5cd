//! The engine's promises under real concurrency: one source read per page, zeros after
//! REMOVE, remote sources that never block the loop, prefetch and replay, clean stops.

use crate::common;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use page_state::PageState;
use pager::{
    DeliveryMode, Fetched, MemorySource, Pager, Placer, Prefetch, RegionSpec, Source, SourceError,
};
use uffd_core::{Mapping, MemoryKind};

const PS: usize = 4096;

#[test]
fn many_threads_on_the_same_pages_read_each_page_from_the_source_once() {
    let pages = 256;
    let image = common::image(pages, PS, 0);
    let source = common::Counting::new(MemorySource::new(image.clone()), PS);
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), source.clone())
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::PerCpu)
        .start()
        .expect("start");
    let (addr, image) = (memory.addr(), Arc::new(image));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let image = image.clone();
            std::thread::spawn(move || {
                for i in 0..pages {
                    let page = (i * (2 * t + 1) + t * 31) % pages; // a different order each
                                                                   // SAFETY: inside the served region.
                    let got = unsafe { common::bytes(addr + page * PS, PS) };
                    assert_eq!(got, &image[page * PS..(page + 1) * PS], "page {page}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker");
    }
    let stats = pager.stop().expect("stop");
    for page in 0..pages {
        assert_eq!(source.reads_of(page), 1, "page {page} read from the source");
    }
    assert_eq!(stats.placed_fault, pages as u64);
    assert!(stats.faults() >= pages as u64);
}

#[test]
fn removed_pages_fault_back_as_zeros_never_image_data() {
    let pages = 64;
    let image = common::image(pages, PS, 0);
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), Arc::new(MemorySource::new(image.clone())))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    // SAFETY: the region is served; reads fault pages in.
    let all = unsafe { common::bytes(memory.addr(), pages * PS) };
    assert_eq!(all, image.as_slice());
    memory
        .madvise(16 * PS, 8 * PS, libc::MADV_DONTNEED)
        .expect("DONTNEED");
    for page in 0..pages {
        // SAFETY: as above.
        let got = unsafe { common::bytes(memory.page_addr(page), PS) };
        if (16..24).contains(&page) {
            assert!(
                got.iter().all(|&b| b == 0),
                "page {page} must read zero after REMOVE"
            );
        } else {
            assert_eq!(got, &image[page * PS..(page + 1) * PS], "page {page} kept");
        }
        // The pager read the REMOVE before it resolved the fault just taken.
        assert_eq!(pager.dropped(page), (16..24).contains(&page), "page {page}");
    }
    let stats = pager.stop().expect("stop");
    assert_eq!(stats.events_remove, 1);
    assert_eq!(stats.placed_zero, 8, "removed pages placed as zero pages");
}

/// A memory source whose fetch of one page first drops that page with MADV_DONTNEED on
/// another thread and waits until the REMOVE is queued on the uffd (the uffd turns
/// readable: nothing else is pending while the only handler, us, fetches), so the copy
/// meets an unread REMOVE (EAGAIN) whatever the scheduling.
struct RacingRemove {
    inner: MemorySource,
    victim: u64,
    addr: usize,
    /// The pager's uffd (a duplicate), watched for the REMOVE.
    uffd: OwnedFd,
    fired: AtomicBool,
    /// Whether the REMOVE was seen queued before the fetch returned.
    queued: AtomicBool,
}

impl Source for RacingRemove {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        if offset == self.victim && !self.fired.swap(true, Ordering::Relaxed) {
            let at = self.addr + offset as usize;
            std::thread::spawn(move || {
                // SAFETY: a page of the test's mapping.
                unsafe { libc::madvise(at as *mut _, PS, libc::MADV_DONTNEED) };
            });
            // madvise blocks until its REMOVE is read, which the handler (us) cannot do
            // yet: the uffd turns readable once the REMOVE is queued (bounded, so that a
            // failing test ends).
            let mut fds = [PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN)];
            let ready = poll(&mut fds, PollTimeout::from(10_000u16)).is_ok_and(|n| n > 0);
            self.queued.store(ready, Ordering::Relaxed);
        }
        self.inner.fetch(offset, scratch)
    }
}

#[test]
fn a_remove_racing_a_fault_is_retried_through_eagain_and_yields_zeros() {
    let pages = 8;
    let image = common::image(pages, PS, 0);
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let uffd = common::uffd();
    let source = Arc::new(RacingRemove {
        inner: MemorySource::new(image.clone()),
        victim: 3 * PS as u64,
        addr: memory.addr(),
        uffd: uffd.as_fd().try_clone_to_owned().expect("dup the uffd"),
        fired: AtomicBool::new(false),
        queued: AtomicBool::new(false),
    });
    let pager = Pager::builder(uffd, source.clone())
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    // SAFETY: served region.
    let victim = unsafe { common::bytes(memory.page_addr(3), PS) };
    assert!(
        victim.iter().all(|&b| b == 0),
        "dropped while in flight: zeros, not image data"
    );
    assert!(
        source.queued.load(Ordering::Relaxed),
        "the REMOVE was queued before the fetch returned"
    );
    // SAFETY: served region.
    let other = unsafe { common::bytes(memory.page_addr(4), PS) };
    assert_eq!(other, &image[4 * PS..5 * PS]);
    let stats = pager.stop().expect("stop");
    assert!(stats.again >= 1, "the EAGAIN path ran: {stats:?}");
    assert_eq!(stats.events_remove, 1);
}

/// A remote-style source: even pages are "remote" (answered by another thread through the
/// placer once `gate` is open), odd pages local. Counts requests per page.
struct Remote {
    image: Arc<Vec<u8>>,
    gate: Arc<Gate>,
    requests: Vec<AtomicU32>,
    queue: Mutex<Option<mpsc::Sender<u64>>>,
}

impl Remote {
    fn new(image: Vec<u8>, gate: Arc<Gate>) -> Arc<Self> {
        let pages = image.len() / PS;
        Arc::new(Self {
            image: Arc::new(image),
            gate,
            requests: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            queue: Mutex::new(None),
        })
    }
}

impl Source for Remote {
    fn len(&self) -> u64 {
        self.image.len() as u64
    }
    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let page = offset as usize / PS;
        self.requests[page].fetch_add(1, Ordering::Relaxed);
        if page % 2 == 1 {
            return Ok(Fetched::Data(&self.image[page * PS..(page + 1) * PS]));
        }
        let _ = scratch;
        let tx = self.queue.lock().expect("queue").clone().expect("attached");
        tx.send(offset).expect("remote thread alive");
        Ok(Fetched::Pending)
    }
    fn attach(&self, placer: Placer) {
        *self.queue.lock().expect("queue") =
            Some(remote_peer(placer, self.image.clone(), self.gate.clone()));
    }
}

/// What a remote peer waits for before it answers: a test opens it, so whatever the test
/// checks while a page is pending holds by construction, not because a delay was long
/// enough.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    /// Longest a peer waits for its gate: a test that fails before opening it ends.
    const BOUND: Duration = Duration::from_secs(60);

    fn shut() -> Arc<Gate> {
        Arc::default()
    }

    fn opened() -> Arc<Gate> {
        let gate = Gate::shut();
        gate.open();
        gate
    }

    fn open(&self) {
        *self.open.lock().expect("gate") = true;
        self.opened.notify_all();
    }

    /// Waits until the gate is open (at most [`Gate::BOUND`]).
    fn wait(&self) {
        let open = self.open.lock().expect("gate");
        let _open = self
            .opened
            .wait_timeout_while(open, Self::BOUND, |open| !*open)
            .expect("gate");
    }
}

/// A test source's remote peer: a thread that places each page offset sent on the
/// returned queue once `gate` is open.
fn remote_peer(placer: Placer, image: Arc<Vec<u8>>, gate: Arc<Gate>) -> mpsc::Sender<u64> {
    let (tx, rx) = mpsc::channel::<u64>();
    std::thread::spawn(move || {
        for offset in rx {
            gate.wait();
            let at = offset as usize;
            let _ = placer.place(offset, Some(&image[at..at + PS]));
        }
    });
    tx
}

/// Waits until the pager has read `faults` faults (each from a thread now blocked in it).
fn wait_for_faults(pager: &Pager, faults: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pager.stats().faults() < faults {
        assert!(Instant::now() < deadline, "{faults} faults read");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_remote_source_never_blocks_the_loop_and_is_asked_once_per_page() {
    let pages = 64;
    let image = common::image(pages, PS, 0);
    let gate = Gate::shut();
    let source = Remote::new(image.clone(), gate.clone());
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), source.clone())
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    let addr = memory.addr();
    // Four threads wait on the same remote page 0, which is not answered until the gate
    // opens.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            // SAFETY: served region.
            std::thread::spawn(move || unsafe { std::ptr::read_volatile((addr + 8) as *const u8) })
        })
        .collect();
    // All four have faulted (nothing else has): one asked the source, three found the
    // page asked for.
    wait_for_faults(&pager, 4);
    let asked = pager.stats();
    assert_eq!(
        (asked.faults(), asked.faults_duplicate),
        (4, 3),
        "later faults on page 0 asked nothing: {asked:?}"
    );
    // Meanwhile the single handler thread serves every local (odd) page.
    for page in (1..pages).step_by(2) {
        // SAFETY: served region.
        let got = unsafe { common::bytes(addr + page * PS, PS) };
        assert_eq!(got, &image[page * PS..(page + 1) * PS]);
    }
    assert!(
        slow.iter().all(|s| !s.is_finished()),
        "local pages were served while the remote page was pending"
    );
    assert_eq!(pager.stats().placed_arrival, 0);
    gate.open();
    for s in slow {
        assert_eq!(s.join().expect("slow reader"), image[8]);
    }
    assert_eq!(
        source.requests[0].load(Ordering::Relaxed),
        1,
        "page 0 asked once"
    );
    let stats = pager.stop().expect("stop");
    assert_eq!(stats.placed_arrival, 1);
}

#[test]
fn prefetch_places_every_page_and_cuts_faults() {
    let pages = 2048;
    let image = common::image(pages, PS, 5);
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(
        common::uffd(),
        Arc::new(MemorySource::new(image.clone()).with_zero_scan(PS)),
    )
    .mapping(memory.clone(), 0)
    .mode(DeliveryMode::Thread)
    .prefetch(Prefetch::Sequential)
    .start()
    .expect("start");
    assert!(common::prefetched(&pager), "prefetch placed every page");
    assert_eq!(pager.states().count(PageState::Received), pages);
    // SAFETY: served region (now fully present).
    let all = unsafe { common::bytes(memory.addr(), memory.len()) };
    assert_eq!(all, image.as_slice());
    let stats = pager.stop().expect("stop");
    assert!(
        stats.faults() < (pages / 10) as u64,
        "faults dropped: {stats:?}"
    );
    assert_eq!(stats.placed(), pages as u64);
    assert_eq!(stats.placed_zero, (pages / 5) as u64);
}

/// Touches `order` pages of a fresh restore and returns the faults it took.
fn restore_run(
    image: &[u8],
    order: &[usize],
    record: Option<&std::path::Path>,
    replay: Option<&std::path::Path>,
) -> u64 {
    let pages = image.len() / PS;
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let mut builder = Pager::builder(common::uffd(), Arc::new(MemorySource::new(image.to_vec())))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread);
    if let Some(path) = record {
        builder = builder.record(path);
    }
    if let Some(path) = replay {
        builder = builder.replay(path).expect("load working set");
    }
    let pager = builder.start().expect("start");
    if replay.is_some() {
        // The replayed working set goes first; give the restore a moment to bring it in,
        // as a VMM does between restore and resuming vCPUs.
        let deadline = Instant::now() + Duration::from_secs(5);
        while order
            .iter()
            .any(|&p| pager.states().get(p) != Some(PageState::Received))
        {
            assert!(
                Instant::now() < deadline,
                "replay did not bring the working set in"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    for &page in order {
        // SAFETY: served region.
        let got = unsafe { common::bytes(memory.page_addr(page), PS) };
        assert_eq!(got, &image[page * PS..(page + 1) * PS]);
    }
    pager.stop().expect("stop").faults()
}

#[test]
fn replaying_a_recorded_working_set_cuts_faults_by_ninety_percent() {
    let pages = 4096;
    let image = common::image(pages, PS, 0);
    let mut x = 12345u64;
    let order: Vec<usize> = (0..600)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % pages as u64) as usize
        })
        .collect();
    let path = std::env::temp_dir().join(format!("uffdkit-ws-{}", std::process::id()));
    let first = restore_run(&image, &order, Some(&path), None);
    let second = restore_run(&image, &order, None, Some(&path));
    std::fs::remove_file(&path).ok();
    assert!(first > 400, "first run faulted on its working set: {first}");
    assert!(
        second * 10 <= first,
        "replay: {second} faults vs {first} without"
    );
}

#[test]
fn the_faulting_process_exiting_mid_run_stops_the_pager_cleanly() {
    let pages = 4096;
    let image = common::image(pages, PS, 0);
    let (pid, uffd, base, len) = common::child_with_uffd(pages, |memory| {
        // Touch a few pages, then exit mid-restore.
        for p in 0..8 {
            // SAFETY: the child's registered region, served by the parent.
            unsafe { std::ptr::read_volatile(memory.page_addr(p) as *const u8) };
        }
        0
    });
    let builder = Pager::builder(uffd, Arc::new(MemorySource::new(image)));
    // SAFETY: the child's registered region, in the child's address space (its uffd).
    let pager = unsafe { builder.region(RegionSpec::new(base, len, MemoryKind::Anon, 0)) }
        .register(false)
        .mode(DeliveryMode::Thread)
        .prefetch(Prefetch::Sequential)
        .start()
        .expect("start");
    assert_eq!(common::wait(pid), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pager.has_stopped() && !pager.is_complete() {
        assert!(
            Instant::now() < deadline,
            "pager noticed neither exit nor completion"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    if pager.has_stopped() {
        assert!(pager.process_gone(), "stopped because the process is gone");
    }
    pager.stop().expect("a clean stop, no error");
}

/// A source whose fetches beyond page 0 wait until the test opens its gate: the
/// prefetcher is then surely in the middle of a run when the test acts.
struct Gated {
    inner: MemorySource,
    open: AtomicBool,
    waiting: AtomicBool,
}

impl Source for Gated {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        if offset != 0 {
            self.waiting.store(true, Ordering::SeqCst);
            while !self.open.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
        }
        self.inner.fetch(offset, scratch)
    }
}

#[test]
fn unmapping_a_region_during_prefetch_stops_serving_it_and_the_prefetch_completes() {
    const NAME: &str =
        "unmapping_a_region_during_prefetch_stops_serving_it_and_the_prefetch_completes";
    // Its own process: the prefetcher's thread is watched by name.
    if !testkit::isolated(NAME, Duration::from_secs(120)) {
        return;
    }
    let pages = 1024;
    let image = common::image(2 * pages, PS, 0);
    let gone = Mapping::new(MemoryKind::Anon, pages * PS).expect("map");
    let kept = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let source = Arc::new(Gated {
        inner: MemorySource::new(image.clone()),
        open: AtomicBool::new(false),
        waiting: AtomicBool::new(false),
    });
    let builder = Pager::builder(common::uffd(), source.clone());
    // SAFETY: `gone` is this test's mapping, read only through raw pointers; it is
    // unmapped with munmap, which the pager hears as an UNMAP event.
    let builder = unsafe {
        builder.region(RegionSpec::new(
            gone.addr(),
            gone.len(),
            MemoryKind::Anon,
            0,
        ))
    };
    let pager = builder
        .mapping(kept.clone(), (pages * PS) as u64)
        .mode(DeliveryMode::Thread)
        .prefetch(Prefetch::Sequential)
        .start()
        .expect("start");
    // SAFETY: served region.
    let first = unsafe { std::ptr::read_volatile(gone.as_ptr()) };
    assert_eq!(first, image[0]);
    // The prefetcher holds a claimed run of the region about to go, in its fetch.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !source.waiting.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the prefetcher never fetched");
        std::thread::yield_now();
    }
    drop(gone); // munmap: an UNMAP event while the prefetcher holds its run
    source.open.store(true, Ordering::SeqCst);
    assert!(
        common::prefetched(&pager),
        "the prefetch completes: every page of the mapped region placed, the unmapped \
         region's pages never served again ({} received of {})",
        pager.states().count(PageState::Received),
        2 * pages
    );
    assert!(!pager.has_stopped(), "an unmap is not an error");
    // And the prefetcher knows it is done: its thread ends rather than coming back to the
    // unmapped region's pages forever.
    let prefetching = || {
        std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .flatten()
            .any(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "uffd-prefetch")
            })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while prefetching() {
        assert!(Instant::now() < deadline, "the prefetcher never finished");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: the kept region is served.
    let got = unsafe { common::bytes(kept.addr(), kept.len()) };
    assert_eq!(got, &image[pages * PS..]);
    let stats = pager.stop().expect("stop");
    assert_eq!(stats.events_unmap, 1);
}

fn uffd_with(features: uffd_core::Features) -> uffd_core::Uffd {
    uffd_core::Uffd::builder()
        .non_blocking(true)
        .require(features | uffd_core::Features::EVENT_REMOVE)
        .open()
        .expect("uffd")
}

#[test]
fn a_remapped_region_is_served_at_its_new_address() {
    let pages = 32;
    let image = common::image(pages, PS, 0);
    let memory = Mapping::new(MemoryKind::Anon, pages * PS).expect("map");
    let target = Mapping::new(MemoryKind::Anon, pages * PS).expect("map target");
    let builder = Pager::builder(
        uffd_with(uffd_core::Features::EVENT_REMAP),
        Arc::new(MemorySource::new(image.clone())),
    );
    // SAFETY: this test's mapping, read through raw pointers only; it moves with mremap,
    // which the pager hears as a REMAP event, and the moved mapping outlives the pager.
    let pager = unsafe {
        builder.region(RegionSpec::new(
            memory.addr(),
            memory.len(),
            MemoryKind::Anon,
            0,
        ))
    }
    .mode(DeliveryMode::Thread)
    .start()
    .expect("start");
    // SAFETY: served region: page 0 in before the move.
    let first = unsafe { std::ptr::read_volatile(memory.as_ptr()) };
    assert_eq!(first, image[0]);
    let to = target.addr();
    let moved = memory.move_onto(target).expect("mremap");
    assert_eq!(moved.addr(), to);
    // SAFETY: the region now lives at `to`; faults there are served from the same image.
    let got = unsafe { common::bytes(moved.addr(), moved.len()) };
    assert_eq!(got, image.as_slice());
    let stats = pager.stop().expect("stop");
    assert_eq!(stats.events_remap, 1);
}

#[test]
fn an_arrival_for_a_removed_page_places_zeros_not_the_stale_data() {
    let pages = 8;
    let image = common::image(pages, PS, 0);
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let source = Remote::new(image.clone(), Gate::opened());
    let pager = Pager::builder(common::uffd(), source)
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    let placer = pager.placer();
    // Page 3 is local (odd): fault it in, then drop it; the REMOVE makes it Zero.
    // SAFETY: served region.
    let before = unsafe { common::bytes(memory.page_addr(3), PS) };
    assert_eq!(before, &image[3 * PS..4 * PS]);
    memory
        .madvise(3 * PS, PS, libc::MADV_DONTNEED)
        .expect("DONTNEED");
    let deadline = Instant::now() + Duration::from_secs(5);
    while pager.states().get(3) != Some(PageState::Zero) {
        assert!(Instant::now() < deadline, "REMOVE applied");
        std::thread::sleep(Duration::from_millis(1));
    }
    // A late background-stream arrival of the old data must not resurrect it.
    let placed = placer
        .place(3 * PS as u64, Some(&image[3 * PS..4 * PS]))
        .expect("place");
    assert_eq!(placed, pager::Placed::Placed);
    // SAFETY: served region.
    let after = unsafe { common::bytes(memory.page_addr(3), PS) };
    assert!(after.iter().all(|&b| b == 0), "a removed page reads zero");
    pager.stop().expect("stop");
}

#[test]
fn readahead_turns_a_sequential_fault_stream_into_large_runs_and_leaves_random_faults_alone() {
    let pages = 4096;
    let image = common::image(pages, PS, 0);
    let walk = |readahead: bool, order: &[usize]| {
        let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
        let pager = Pager::builder(common::uffd(), Arc::new(MemorySource::new(image.clone())))
            .mapping(memory.clone(), 0)
            .mode(DeliveryMode::Thread)
            .readahead(readahead)
            .start()
            .expect("start");
        for &page in order {
            // SAFETY: served region.
            let got = unsafe { common::bytes(memory.page_addr(page), PS) };
            assert_eq!(got, &image[page * PS..(page + 1) * PS], "page {page}");
        }
        pager.stop().expect("stop")
    };
    let sequential: Vec<usize> = (0..pages).collect();
    let s = walk(true, &sequential);
    // The window doubles up to 512 pages (2 MiB): about log2(512) + 4096 / 512 faults.
    assert!(
        s.faults() <= 40,
        "a sequential walk faulted {} times: {s:?}",
        s.faults()
    );
    assert_eq!(s.placed(), pages as u64);
    let plain = walk(false, &sequential);
    assert_eq!(
        plain.faults(),
        pages as u64,
        "without readahead: one fault per page"
    );
    // Every other page, backwards: never sequential, nothing placed around.
    let random: Vec<usize> = (0..pages).rev().step_by(2).collect();
    let r = walk(true, &random);
    assert_eq!(r.placed_prefetch, 0, "no run around a lone fault: {r:?}");
    assert_eq!(r.faults(), random.len() as u64);
}

/// A remote source that answers every fetch later, once `gate` is open, and counts
/// `prioritize` calls.
struct Prioritized {
    image: Arc<Vec<u8>>,
    queue: Mutex<Option<mpsc::Sender<u64>>>,
    prioritized: AtomicU32,
    gate: Arc<Gate>,
}

impl Source for Prioritized {
    fn len(&self) -> u64 {
        self.image.len() as u64
    }
    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let tx = self.queue.lock().expect("queue").clone().expect("attached");
        for i in 0..scratch.len() / PS {
            tx.send(offset + (i * PS) as u64)
                .expect("remote thread alive");
        }
        Ok(Fetched::Pending)
    }
    fn prioritize(&self, _offset: u64) {
        self.prioritized.fetch_add(1, Ordering::Relaxed);
    }
    fn attach(&self, placer: Placer) {
        *self.queue.lock().expect("queue") =
            Some(remote_peer(placer, self.image.clone(), self.gate.clone()));
    }
}

#[test]
fn threads_waiting_on_a_page_already_asked_for_tell_the_source_and_do_not_refault_in_a_storm() {
    let pages = 16;
    let image = Arc::new(common::image(pages, PS, 0));
    let source = Arc::new(Prioritized {
        image: image.clone(),
        queue: Mutex::new(None),
        prioritized: AtomicU32::new(0),
        gate: Gate::shut(),
    });
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), source.clone())
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    let addr = memory.addr();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            // SAFETY: served region.
            std::thread::spawn(move || unsafe {
                std::ptr::read_volatile((addr + 5 * PS) as *const u8)
            })
        })
        .collect();
    // All 16 have faulted while the page is pending: one asked, fifteen found it asked
    // for and told the source.
    wait_for_faults(&pager, 16);
    assert!(
        source.prioritized.load(Ordering::Relaxed) >= 15,
        "faults on a page already asked for reach the source: {:?}",
        pager.stats()
    );
    // Pending a while longer: waiting threads stay blocked, they do not refault (a sleep
    // can only hide a storm here, never fail the test).
    std::thread::sleep(Duration::from_millis(300));
    source.gate.open();
    for t in threads {
        assert_eq!(t.join().expect("reader"), image[5 * PS]);
    }
    let stats = pager.stop().expect("stop");
    assert!(
        source.prioritized.load(Ordering::Relaxed) >= 15,
        "faults on a page already asked for reach the source: {stats:?}"
    );
    // 16 threads, one fault each, plus a few a wake may race; never a refault storm.
    assert!(
        stats.faults() <= 48,
        "{} faults for 16 waiting threads: {stats:?}",
        stats.faults()
    );
}

#[test]
fn a_zero_run_arrival_places_what_is_missing_and_wakes_a_waiter_once_for_all() {
    let pages = 8;
    let image = common::image(pages, PS, 0);
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    // Even pages are remote: their peer answers nothing while the test runs.
    let source = Remote::new(image.clone(), Gate::shut());
    let pager = Pager::builder(common::uffd(), source)
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    // Page 1 is local (odd): in place before the run arrives, so the run must skip it.
    // SAFETY: served region.
    let one = unsafe { common::bytes(memory.page_addr(1), PS) };
    assert_eq!(one, &image[PS..2 * PS]);
    // A thread waits on remote page 4.
    let addr = memory.page_addr(4);
    // SAFETY: served region.
    let waiter = std::thread::spawn(move || unsafe { std::ptr::read_volatile(addr as *const u8) });
    let deadline = Instant::now() + Duration::from_secs(5);
    while pager.states().get(4) != Some(PageState::Requested) {
        assert!(Instant::now() < deadline, "page 4 asked for");
        std::thread::sleep(Duration::from_millis(1));
    }
    let placed = pager.placer().place_zero_run(0, pages * PS).expect("place");
    assert_eq!(placed, Some(pages - 1), "every page but the present one");
    assert_eq!(
        waiter.join().expect("waiter"),
        0,
        "the waiter reads the zero page"
    );
    for page in 0..pages {
        assert_eq!(pager.states().get(page), Some(PageState::Received));
        // SAFETY: served region, every page placed.
        let got = unsafe { common::bytes(memory.page_addr(page), PS) };
        if page == 1 {
            assert_eq!(
                got,
                &image[PS..2 * PS],
                "the present page is not overwritten"
            );
        } else {
            assert!(got.iter().all(|&b| b == 0), "page {page} reads zero");
        }
    }
    let stats = pager.stop().expect("stop");
    assert_eq!(
        (stats.placed_zero, stats.placed_arrival),
        (pages as u64 - 1, 0)
    );
}
