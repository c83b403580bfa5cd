//! SIGBUS delivery: faults resolved inside the faulting thread. Its own test binary:
//! the SIGBUS disposition is process-wide.
//!
//! Every test here runs under [`Guarded`], a global allocator that aborts the process if
//! it is called while the calling thread is inside the pager's SIGBUS handler: the signal
//! path must not allocate (a signal landing while its thread holds the allocator's lock,
//! or a forking thread holding it, would deadlock the workload).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::time::Duration;

use pager::{DeliveryMode, MemorySource, Pager, ZeroSource};
use uffd_core::{Features, Mapping, MemoryKind, ReadStatus, Uffd};

const PS: usize = 4096;

/// The system allocator, refusing to serve the SIGBUS handler.
struct Guarded;

// SAFETY: forwards to the system allocator, which upholds the GlobalAlloc contract; the
// check only reads a const-initialised thread-local flag (no allocation, no lock).
unsafe impl GlobalAlloc for Guarded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        refuse_inside_the_handler();
        // SAFETY: forwarded with the caller's promises.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        refuse_inside_the_handler();
        // SAFETY: forwarded with the caller's promises.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        refuse_inside_the_handler();
        // SAFETY: forwarded with the caller's promises.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Guarded = Guarded;

fn refuse_inside_the_handler() {
    if pager::in_fault_handler() {
        let msg = b"FATAL: the allocator was called from inside the pager's SIGBUS handler\n";
        // SAFETY: writes a static buffer to stderr; abort ends the process.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::abort();
        }
    }
}

/// One SIGBUS-mode pager per process: the tests that start one take turns.
static SIGBUS_SLOT: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn sigbus_mode_serves_every_page_in_the_faulting_threads() {
    let _turn = SIGBUS_SLOT.lock().unwrap_or_else(|p| p.into_inner());
    let pages = 512;
    let image = common::image(pages, PS, 7);
    for kind in [MemoryKind::Anon, MemoryKind::Shmem] {
        let memory = Arc::new(Mapping::new(kind, pages * PS).expect("map"));
        let pager = Pager::builder(
            common::sigbus_uffd(),
            Arc::new(MemorySource::new(image.clone()).with_zero_scan(PS)),
        )
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Sigbus);
        let pager = pager.start().expect("start");
        let addr = memory.addr();
        let image = Arc::new(image.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let image = image.clone();
                std::thread::spawn(move || {
                    for i in 0..pages {
                        let page = (i + t * 97) % pages;
                        // SAFETY: the served region.
                        let got = unsafe { common::bytes(addr + page * PS, PS) };
                        assert_eq!(got, &image[page * PS..(page + 1) * PS], "page {page}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("worker");
        }
        // No fault reached the uffd as an event.
        let mut buf = uffd_core::EventBuffer::new(4);
        assert_eq!(
            pager.uffd().read_events(&mut buf).expect("read"),
            ReadStatus::WouldBlock
        );
        let stats = pager.stop().expect("stop");
        assert_eq!(stats.placed(), pages as u64, "{kind:?}: {stats:?}");
        assert_eq!(stats.placed_zero, (pages / 7) as u64);
        assert!(
            stats.latency.count() >= pages as u64,
            "latency recorded per fault"
        );
    }
}

#[test]
fn sigbus_mode_refuses_a_uffd_without_the_feature_or_an_unsafe_source() {
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, 4 * PS).expect("map"));
    let plain = Uffd::builder().non_blocking(true).open().expect("open");
    let err = Pager::builder(plain, Arc::new(ZeroSource::new(4 * PS as u64)))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Sigbus)
        .start()
        .expect_err("no SIGBUS feature");
    assert!(err.to_string().contains("SIGBUS feature"), "{err}");
    let path = std::env::temp_dir().join(format!("uffdkit-sigbus-{}", std::process::id()));
    std::fs::write(&path, vec![1u8; 4 * PS]).expect("write");
    let pread = pager::FileSource::pread(&path).expect("open");
    std::fs::remove_file(&path).ok();
    let err = Pager::builder(common::sigbus_uffd(), Arc::new(pread))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Sigbus)
        .start()
        .expect_err("pread is not signal safe");
    assert!(err.to_string().contains("signal handler"), "{err}");
}

#[test]
fn sigbus_mode_records_the_first_fault_order() {
    let _turn = SIGBUS_SLOT.lock().unwrap_or_else(|p| p.into_inner());
    let pages = 64;
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let path = std::env::temp_dir().join(format!("uffdkit-sigbus-ws-{}", std::process::id()));
    let pager = Pager::builder(
        common::sigbus_uffd(),
        Arc::new(MemorySource::new(common::image(pages, PS, 0))),
    )
    .mapping(memory.clone(), 0)
    .mode(DeliveryMode::Sigbus)
    .record(&path)
    .start()
    .expect("start");
    let order = [5usize, 9, 1, 40];
    for &p in &order {
        // SAFETY: the served region.
        unsafe { std::ptr::read_volatile(memory.page_addr(p) as *const u8) };
    }
    pager.stop().expect("stop");
    let recorded = pager::record::load(&path, pages).expect("load working set");
    std::fs::remove_file(&path).ok();
    assert_eq!(recorded, order.map(|p| p as u64));
}

/// The balloon stress (common/balloon.rs) in SIGBUS mode, under the allocator guard: a
/// REMOVE storm makes placements in the signal handler meet EAGAIN and give their claims
/// back, pages dropped in flight are placed as zeros — all without allocating or locking.
fn balloon(kind: MemoryKind) {
    let _turn = SIGBUS_SLOT.lock().unwrap_or_else(|p| p.into_inner());
    let outcome = common::balloon::run(
        DeliveryMode::Sigbus,
        kind,
        Features::SIGBUS,
        Duration::from_millis(2500),
    );
    eprintln!("sigbus balloon {kind:?}: {outcome:?}");
    assert!(outcome.removes > 0 && outcome.reads > 0, "{outcome:?}");
    assert!(
        outcome.again + outcome.removed_in_flight > 0,
        "drops raced placements in the handler at least once: {outcome:?}"
    );
}

#[test]
fn balloon_sigbus_mode_anon_reads_no_wrong_page_and_never_allocates_in_the_handler() {
    balloon(MemoryKind::Anon);
}

#[test]
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn balloon_sigbus_mode_hugetlb_reads_no_wrong_page_and_never_allocates_in_the_handler() {
    if common::hugetlb_available("balloon_sigbus_mode_hugetlb") {
        balloon(MemoryKind::HugetlbPrivate);
    }
}

/// A source that claims to be signal-safe and allocates in `fetch`: a broken promise the
/// allocator guard must catch.
struct Allocating(MemorySource);

impl pager::Source for Allocating {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn fetch<'a>(
        &'a self,
        offset: u64,
        scratch: &'a mut [u8],
    ) -> Result<pager::Fetched<'a>, pager::SourceError> {
        let copy = vec![0u8; 64];
        std::hint::black_box(&copy);
        self.0.fetch(offset, scratch)
    }
    fn signal_safe(&self) -> Option<pager::SignalSafe> {
        // SAFETY: the test's `fetch` copies from memory it owns (or fails), no more.
        Some(unsafe { pager::SignalSafe::promise() })
    }
}

#[test]
fn the_allocator_guard_aborts_a_fault_handler_that_allocates() {
    const NAME: &str = "the_allocator_guard_aborts_a_fault_handler_that_allocates";
    if let Some((status, output)) = testkit::isolated_outcome(NAME, Duration::from_secs(60)) {
        assert!(
            !status.success(),
            "the child must abort: {status}\n{output}"
        );
        assert!(
            output
                .contains("FATAL: the allocator was called from inside the pager's SIGBUS handler"),
            "{output}"
        );
        return;
    }
    // In the child: one fault through a source that allocates.
    let source = Arc::new(Allocating(MemorySource::new(vec![7u8; 4 * PS])));
    let (memory, pager) = common::sigbus_pager(source, 4);
    // SAFETY: the served region.
    let byte = unsafe { std::ptr::read_volatile(memory.as_ptr()) };
    drop(pager);
    eprintln!("not caught: read {byte}");
}

/// The embedder's own SIGBUS handler, installed before the pager: counts its calls; a
/// fault (si_code > 0) reaching it ends the process with code 3 (the pager's fault went
/// to the VMM's handler).
static VMM_SIGBUSES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn vmm_on_sigbus(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel's (or our caller's) siginfo.
    if unsafe { (*info).si_code } > 0 {
        // SAFETY: ends the process at once (async-signal-safe).
        unsafe { libc::_exit(3) };
    }
    VMM_SIGBUSES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// A SIGBUS that is not the pager's goes to the handler the embedder had installed, and
/// the pager keeps its own: faults on its pages after that are still served, and its
/// stop puts the embedder's handler back.
#[test]
fn a_foreign_sigbus_is_chained_to_the_embedders_handler_and_the_pager_keeps_serving() {
    const NAME: &str =
        "a_foreign_sigbus_is_chained_to_the_embedders_handler_and_the_pager_keeps_serving";
    if !testkit::isolated(NAME, Duration::from_secs(60)) {
        return;
    }
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let vmm = SigAction::new(
        SigHandler::SigAction(vmm_on_sigbus),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    // SAFETY: the handler counts, or exits.
    unsafe { sigaction(Signal::SIGBUS, &vmm) }.expect("install the VMM's handler");
    let pages = 8;
    let image = common::image(pages, PS, 0);
    let (memory, pager) = common::sigbus_pager(Arc::new(MemorySource::new(image.clone())), pages);
    // SAFETY: served region.
    assert_eq!(unsafe { common::bytes(memory.addr(), PS) }, &image[..PS]);
    // A SIGBUS sent to us (not a fault on the pager's memory) is the VMM's.
    nix::sys::signal::raise(Signal::SIGBUS).expect("raise");
    assert_eq!(VMM_SIGBUSES.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The pager still serves its faults (the VMM's handler would exit with code 3).
    // SAFETY: served region.
    let got = unsafe { common::bytes(memory.addr() + PS, 7 * PS) };
    assert_eq!(got, &image[PS..]);
    pager.stop().expect("stop");
    // SAFETY: a query of the disposition.
    let now = unsafe { sigaction(Signal::SIGBUS, &vmm) }.expect("query");
    assert_eq!(
        now.handler(),
        SigHandler::SigAction(vmm_on_sigbus),
        "the VMM's handler is back"
    );
}

/// A signal-safe source that answers one byte short.
struct Short;

impl pager::Source for Short {
    fn len(&self) -> u64 {
        (16 * PS) as u64
    }
    fn fetch<'a>(
        &'a self,
        _offset: u64,
        scratch: &'a mut [u8],
    ) -> Result<pager::Fetched<'a>, pager::SourceError> {
        let short = scratch.len() - 1;
        Ok(pager::Fetched::Data(&scratch[..short]))
    }
    fn signal_safe(&self) -> Option<pager::SignalSafe> {
        // SAFETY: the test's `fetch` copies from memory it owns (or fails), no more.
        Some(unsafe { pager::SignalSafe::promise() })
    }
}

/// A short answer is a source error inside the handler (recorded without allocating, under
/// the guarded allocator), and the SIGBUS goes on to the embedder's handler: no abort.
#[test]
fn a_short_answer_from_the_source_fails_in_the_handler_and_the_sigbus_is_handed_on() {
    const NAME: &str =
        "a_short_answer_from_the_source_fails_in_the_handler_and_the_sigbus_is_handed_on";
    if let Some((status, output)) = testkit::isolated_outcome(NAME, Duration::from_secs(60)) {
        assert_eq!(
            status.code(),
            Some(common::HANDED_ON),
            "handed on, no abort: {status}\n{output}"
        );
        return;
    }
    common::touch_in_sigbus_mode(Arc::new(Short));
}
