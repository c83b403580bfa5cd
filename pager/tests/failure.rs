//! Failures are never silent, and never leave memory that reads as zeros: a fatal error
//! stops the pager, poisons every page not yet placed (a touch raises SIGBUS, before and
//! after the uffd is closed), tells the embedder without polling, and is what `stop`
//! returns. Tests that touch poisoned pages run in a process of their own
//! (`testkit::isolated`): the faulting thread ends parked in a SIGBUS handler.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use pager::{
    DeliveryMode, Error, Fetched, Mapping, MemoryKind, MemorySource, Pager, Prefetch, Source,
    SourceError,
};

const PS: usize = 4096;
const WATCHDOG: Duration = Duration::from_secs(120);
const SIGBUS_WAIT: Duration = Duration::from_secs(10);

/// What a failing source does at its bad page.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fails {
    /// Returns an error.
    Error,
    /// Panics (a bug in an embedder's source).
    Panic,
}

/// Serves `image`, except page `bad`, where it fails as told.
struct Failing {
    image: MemorySource,
    bad: usize,
    how: Fails,
}

impl Source for Failing {
    fn len(&self) -> u64 {
        self.image.len()
    }
    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let pages = offset as usize / PS..(offset as usize + scratch.len()) / PS;
        if pages.contains(&self.bad) {
            match self.how {
                Fails::Error => {
                    return Err(SourceError {
                        what: "read the test image",
                        offset,
                        source: std::io::Error::other("the disk is on fire"),
                    })
                }
                Fails::Panic => panic!("the source panicked at page {}", self.bad),
            }
        }
        self.image.fetch(offset, scratch)
    }
}

fn failing(pages: usize, bad: usize, how: Fails) -> Arc<Failing> {
    Arc::new(Failing {
        image: MemorySource::new(common::image(pages, PS, 0)),
        bad,
        how,
    })
}

/// A source error met by the prefetcher: the pager stops by itself, the embedder is told
/// (`wait`), `stop` returns the source's error, and a page never placed raises SIGBUS when
/// touched after the uffd is closed — not the zeros the kernel would map otherwise.
#[test]
fn a_fatal_error_poisons_unplaced_pages_so_a_touch_after_stop_raises_sigbus_not_zeros() {
    const NAME: &str =
        "a_fatal_error_poisons_unplaced_pages_so_a_touch_after_stop_raises_sigbus_not_zeros";
    if !testkit::isolated(NAME, WATCHDOG) {
        return;
    }
    let pages = 64;
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), failing(pages, 40, Fails::Error))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .prefetch(Prefetch::Eager)
        .start()
        .expect("start");
    assert!(
        pager.wait(Some(SIGBUS_WAIT)),
        "the embedder is told the pager stopped"
    );
    let err = pager.stop().expect_err("the source's error");
    assert!(matches!(err, Error::Source(_)), "{err}");
    // The uffd is closed now. Page 40 and the run around it were never placed.
    testkit::sigbus::touch_expecting_sigbus(memory.addr() + 40 * PS, SIGBUS_WAIT)
        .expect("a touch of a page never placed raises SIGBUS");
}

/// A thread blocked on a page when the pager fails is woken by the poison: it gets
/// SIGBUS, not zeros once the uffd closes, and not a hang.
#[test]
fn a_thread_blocked_on_the_failing_page_gets_sigbus_and_stop_returns_the_error() {
    const NAME: &str =
        "a_thread_blocked_on_the_failing_page_gets_sigbus_and_stop_returns_the_error";
    if !testkit::isolated(NAME, WATCHDOG) {
        return;
    }
    let pages = 16;
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), failing(pages, 3, Fails::Error))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::PerCpu)
        .start()
        .expect("start");
    testkit::sigbus::touch_expecting_sigbus(memory.addr() + 3 * PS, SIGBUS_WAIT)
        .expect("the faulting thread gets SIGBUS");
    assert!(pager.wait(Some(SIGBUS_WAIT)));
    let stats = pager.stats();
    assert!(stats.poisoned >= (pages - 1) as u64, "{stats:?}");
    let err = pager.stop().expect_err("the source's error");
    assert!(matches!(err, Error::Source(_)), "{err}");
}

/// A source that panics on a handler thread: the panic is the pager's fatal error (its
/// thread and message), the faulting thread gets SIGBUS, and the pager stops — not a
/// handler thread dead in silence with the workload blocked and `stop` saying Ok.
#[test]
fn a_panic_in_a_handler_thread_is_a_fatal_error_and_the_faulting_thread_gets_sigbus() {
    const NAME: &str =
        "a_panic_in_a_handler_thread_is_a_fatal_error_and_the_faulting_thread_gets_sigbus";
    if !testkit::isolated(NAME, WATCHDOG) {
        return;
    }
    let pages = 16;
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), failing(pages, 5, Fails::Panic))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    testkit::sigbus::touch_expecting_sigbus(memory.addr() + 5 * PS, SIGBUS_WAIT)
        .expect("the faulting thread gets SIGBUS");
    assert!(pager.wait(Some(SIGBUS_WAIT)), "the pager stopped by itself");
    match pager.stop() {
        Err(Error::ThreadPanicked { thread, message }) => {
            assert_eq!(thread, "uffd-handler");
            assert!(message.contains("panicked at page 5"), "{message}");
        }
        other => panic!("stop returned {other:?}"),
    }
}

/// POLLERR on the uffd (an embedder sharing the fd made it blocking again) is a fatal
/// error, not a quiet stop that leaves the faulting thread blocked.
#[test]
fn pollerr_on_the_uffd_is_a_fatal_error_and_the_faulting_thread_gets_sigbus() {
    const NAME: &str = "pollerr_on_the_uffd_is_a_fatal_error_and_the_faulting_thread_gets_sigbus";
    if !testkit::isolated(NAME, WATCHDOG) {
        return;
    }
    let pages = 16;
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(
        common::uffd(),
        Arc::new(MemorySource::new(common::image(pages, PS, 0))),
    )
    .mapping(memory.clone(), 0)
    .mode(DeliveryMode::Thread)
    .start()
    .expect("start");
    pager
        .uffd()
        .set_non_blocking(false)
        .expect("clear O_NONBLOCK");
    testkit::sigbus::touch_expecting_sigbus(memory.addr() + 2 * PS, SIGBUS_WAIT)
        .expect("the faulting thread gets SIGBUS");
    assert!(pager.wait(Some(SIGBUS_WAIT)));
    let err = pager.stop().expect_err("a fatal error");
    assert!(
        matches!(err, Error::UffdPoll { what, .. } if what.starts_with("POLLERR")),
        "{err}"
    );
}

/// With `poison_on_fatal(false)` the embedder takes the zeros on itself: the page reads as
/// zero once the uffd is closed (what every fatal error did before poisoning).
#[test]
fn without_poison_a_page_never_placed_reads_zeros_after_a_fatal_error() {
    let pages = 64;
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), failing(pages, 40, Fails::Error))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .prefetch(Prefetch::Eager)
        .poison_on_fatal(false)
        .start()
        .expect("start");
    assert!(pager.wait(Some(SIGBUS_WAIT)));
    assert_eq!(pager.stats().poisoned, 0);
    pager.stop().expect_err("the source's error");
    // SAFETY: the mapping, no longer registered.
    let got = unsafe { common::bytes(memory.addr() + 40 * PS, PS) };
    assert_eq!(got, &[0u8; PS][..]);
}

/// A working set that cannot be saved does not hide the error that stopped the pager.
#[test]
fn a_recording_that_cannot_be_saved_does_not_replace_the_fatal_error() {
    let pages = 64;
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), failing(pages, 40, Fails::Error))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .prefetch(Prefetch::Eager)
        .record("/nonexistent-dir/ws.bin")
        .start()
        .expect("start");
    assert!(pager.wait(Some(SIGBUS_WAIT)));
    let err = pager.stop().expect_err("fatal");
    assert!(
        matches!(err, Error::Source(_)),
        "the source's error, not {err}"
    );
}

/// Handler CPU settings the mode does not use, or CPUs this process may not run on, are
/// refused at start, naming the mode in use — never a pager started unpinned.
#[test]
fn handler_cpu_settings_that_cannot_apply_are_refused_naming_the_mode() {
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, 4 * PS).expect("map"));
    let source = Arc::new(MemorySource::new(vec![1u8; 4 * PS]));
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
    let beyond = (0..nix::sched::CpuSet::count())
        .rev()
        .find(|&c| !allowed.is_set(c).unwrap_or(true))
        .expect("a CPU outside the allowed set");
    let start = |b: pager::PagerBuilder| b.mapping(memory.clone(), 0).start().map(|p| p.stop());
    let cases = [
        (
            Pager::builder(common::uffd(), source.clone())
                .mode(DeliveryMode::Thread)
                .handler_cpu(Some(beyond)),
            "delivery mode thread: handler CPU",
        ),
        (
            Pager::builder(common::uffd(), source.clone())
                .mode(DeliveryMode::Thread)
                .handler_cpus([0]),
            "delivery mode thread: handler_cpus",
        ),
        (
            Pager::builder(common::uffd(), source.clone())
                .mode(DeliveryMode::PerCpu)
                .handler_cpu(Some(0)),
            "delivery mode percpu: handler_cpu",
        ),
        (
            Pager::builder(common::uffd(), source.clone())
                .mode(DeliveryMode::PerCpu)
                .handler_cpus([beyond]),
            "delivery mode percpu: CPU",
        ),
    ];
    for (builder, want) in cases {
        match start(builder) {
            Err(e) => assert!(e.to_string().starts_with(want), "want {want:?}, got {e}"),
            Ok(_) => panic!("started: want {want:?}"),
        }
    }
}

/// Faults a remote source answers later are counted in the latency histogram and the
/// blocktime when their page arrives.
#[test]
fn faults_answered_later_by_a_remote_source_are_timed_when_their_page_arrives() {
    struct Later {
        image: Arc<Vec<u8>>,
        queue: std::sync::Mutex<Option<std::sync::mpsc::Sender<u64>>>,
    }
    impl Source for Later {
        fn len(&self) -> u64 {
            self.image.len() as u64
        }
        fn fetch<'a>(&'a self, offset: u64, _: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
            let tx = self.queue.lock().expect("queue").clone().expect("attached");
            tx.send(offset).expect("peer alive");
            Ok(Fetched::Pending)
        }
        fn attach(&self, placer: pager::Placer) {
            let (tx, rx) = std::sync::mpsc::channel::<u64>();
            let image = self.image.clone();
            std::thread::spawn(move || {
                for offset in rx {
                    std::thread::sleep(Duration::from_millis(5));
                    let at = offset as usize;
                    let _ = placer.place(offset, Some(&image[at..at + PS]));
                }
            });
            *self.queue.lock().expect("queue") = Some(tx);
        }
    }
    let pages = 8;
    let image = Arc::new(common::image(pages, PS, 0));
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let source = Arc::new(Later {
        image: image.clone(),
        queue: std::sync::Mutex::new(None),
    });
    let pager = Pager::builder(common::uffd(), source)
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    // SAFETY: served region; each page waits ~5 ms for its arrival.
    let got = unsafe { common::bytes(memory.addr(), memory.len()) };
    assert_eq!(got, image.as_slice());
    // The placing thread counts a fault just after the wake that let the reader go on.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pager.stats().latency.count() < pages as u64 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let stats = pager.stop().expect("stop");
    assert_eq!(stats.placed_arrival, pages as u64);
    assert_eq!(
        stats.latency.count(),
        pages as u64,
        "every fault timed: {stats:?}"
    );
    assert!(
        stats.blocktime >= Duration::from_millis(5 * pages as u64),
        "blocktime counts the wait for arrivals: {:?}",
        stats.blocktime
    );
}

/// The embedder gives up (a migration that cannot finish): `Pager::fail` poisons what is
/// not placed — the thread waiting on a page that will never arrive gets SIGBUS — and
/// `stop` returns the embedder's error.
#[test]
fn an_embedder_that_gives_up_fails_the_pager_and_its_waiting_threads_get_sigbus() {
    const NAME: &str =
        "an_embedder_that_gives_up_fails_the_pager_and_its_waiting_threads_get_sigbus";
    if !testkit::isolated(NAME, WATCHDOG) {
        return;
    }
    /// A remote source whose pages never come.
    struct Silent;
    impl Source for Silent {
        fn len(&self) -> u64 {
            16 * PS as u64
        }
        fn fetch<'a>(&'a self, _: u64, _: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
            Ok(Fetched::Pending)
        }
    }
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, 16 * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), Arc::new(Silent))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    let addr = memory.addr() + 7 * PS;
    let toucher =
        std::thread::spawn(move || testkit::sigbus::touch_expecting_sigbus(addr, SIGBUS_WAIT));
    // The fault is in (and asked of the silent source) before the embedder gives up.
    let deadline = std::time::Instant::now() + SIGBUS_WAIT;
    while pager.stats().faults() == 0 {
        assert!(std::time::Instant::now() < deadline, "no fault");
        std::thread::sleep(Duration::from_millis(1));
    }
    pager.fail(SourceError {
        what: "the migration source is gone",
        offset: 0,
        source: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
    });
    toucher
        .join()
        .expect("toucher")
        .expect("the waiting thread gets SIGBUS");
    match pager.stop() {
        Err(Error::Source(e)) => assert_eq!(e.what, "the migration source is gone"),
        other => panic!("stop returned {other:?}"),
    }
}

/// A signal-safe source that answers one byte short, or panics.
struct Misbehaving {
    panics: bool,
}

impl Source for Misbehaving {
    fn len(&self) -> u64 {
        (16 * PS) as u64
    }
    fn fetch<'a>(
        &'a self,
        _offset: u64,
        scratch: &'a mut [u8],
    ) -> Result<Fetched<'a>, SourceError> {
        assert!(!self.panics, "a source bug");
        let short = scratch.len() - 1;
        Ok(Fetched::Data(&scratch[..short]))
    }
    fn signal_safe(&self) -> Option<pager::SignalSafe> {
        // SAFETY: the test's `fetch` copies from memory it owns (or fails), no more.
        Some(unsafe { pager::SignalSafe::promise() })
    }
}

#[test]
fn a_short_answer_from_the_source_fails_the_pager_with_a_source_error() {
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, 16 * PS).expect("map"));
    // The prefetcher asks: no thread faults on a page the failure then poisons.
    let pager = Pager::builder(common::uffd(), Arc::new(Misbehaving { panics: false }))
        .mapping(memory, 0)
        .mode(DeliveryMode::Thread)
        .prefetch(Prefetch::Sequential)
        .start()
        .expect("start");
    assert!(pager.wait(Some(SIGBUS_WAIT)), "the pager stops");
    match pager.stop() {
        Err(Error::Source(e)) => assert!(e.what.contains("length other than asked"), "{e:?}"),
        other => panic!("a source error, not {other:?}"),
    }
}

#[test]
fn a_panicking_source_in_sigbus_mode_fails_the_pager_and_the_sigbus_is_handed_on() {
    const NAME: &str =
        "failure::a_panicking_source_in_sigbus_mode_fails_the_pager_and_the_sigbus_is_handed_on";
    if let Some((status, output)) = testkit::isolated_outcome(NAME, WATCHDOG) {
        assert_eq!(
            status.code(),
            Some(common::HANDED_ON),
            "the pager reports the panic and hands the SIGBUS on, no abort: {status}\n{output}"
        );
        return;
    }
    common::touch_in_sigbus_mode(Arc::new(Misbehaving { panics: true }));
}

/// An image file truncated while it is served: the pages it lost are not holes of the
/// image. The pager fails with the source's error and a touch there raises SIGBUS — it
/// read them as zeros before (a read that hit the new end was taken for the image's end).
#[test]
fn a_file_image_truncated_while_served_fails_the_pager_instead_of_serving_zeros() {
    const NAME: &str =
        "a_file_image_truncated_while_served_fails_the_pager_instead_of_serving_zeros";
    if !testkit::isolated(NAME, WATCHDOG) {
        return;
    }
    match serve_a_file_truncated_under(false) {
        Err(Error::Source(e)) => assert_eq!(e.offset, (12 * PS) as u64, "{e:?}"),
        other => panic!("a source error, not {other:?}"),
    }
}

/// Serves a 16-page image file (read with `pread`, or mapped into a MINOR region of shared
/// memory), truncates it to 8 pages under the pager (as another process would), touches
/// page 12 — which must raise SIGBUS — and returns what the stopped pager says.
fn serve_a_file_truncated_under(minor: bool) -> Result<(), Error> {
    let pages = 16;
    let image = common::image(pages, PS, 0);
    let path = std::env::temp_dir().join(format!("uffdkit-test-{}-truncated", std::process::id()));
    std::fs::write(&path, &image).expect("write the image");
    let (memory, builder) = if minor {
        let memory = Arc::new(Mapping::new(MemoryKind::Shmem, pages * PS).expect("map"));
        let source = Arc::new(pager::FileSource::mmap(&path).expect("open"));
        let builder = Pager::builder(common::uffd(), source).mapping_minor(memory.clone(), 0);
        (memory, builder)
    } else {
        let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
        let source = Arc::new(pager::FileSource::pread(&path).expect("open"));
        let builder = Pager::builder(common::uffd(), source).mapping(memory.clone(), 0);
        (memory, builder)
    };
    let pager = builder.mode(DeliveryMode::Thread).start().expect("start");
    // SAFETY: the served region.
    let first = unsafe { common::bytes(memory.addr(), PS) };
    assert_eq!(first, &image[..PS], "served from the file");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len((pages / 2 * PS) as u64))
        .expect("truncate the image");
    let touched = testkit::sigbus::touch_expecting_sigbus(memory.addr() + 12 * PS, SIGBUS_WAIT);
    let _ = std::fs::remove_file(&path);
    touched.expect("a touch of a page the file lost raises SIGBUS (not the pager's thread)");
    assert!(pager.wait(Some(SIGBUS_WAIT)), "the pager stops");
    pager.stop().map(drop)
}

/// After a fatal error no thread is left blocked on a page the pager will never serve: a
/// page known zero (a hole of the image) that was not placed yet raises SIGBUS like the
/// others — it was left out of the poison, and a touch waited on the stopped pager until
/// the embedder dropped it (a VMM joining its vCPU threads first never does).
#[test]
fn after_a_fatal_error_a_touch_of_a_known_zero_page_raises_sigbus_instead_of_hanging() {
    const NAME: &str =
        "after_a_fatal_error_a_touch_of_a_known_zero_page_raises_sigbus_instead_of_hanging";
    if !testkit::isolated(NAME, WATCHDOG) {
        return;
    }
    let pages = 16;
    // Every 4th page zero: pages 3, 7, 11, 15 are known zero, never fetched.
    let source = MemorySource::new(common::image(pages, PS, 4)).with_zero_scan(PS);
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), Arc::new(source))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    assert_eq!(pager.states().get(7), Some(pager::PageState::Zero));
    pager.fail(SourceError {
        what: "the embedder gave up",
        offset: 0,
        source: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
    });
    testkit::sigbus::touch_expecting_sigbus(memory.addr() + 7 * PS, SIGBUS_WAIT)
        .expect("a known-zero page touched after the failure raises SIGBUS");
    assert!(pager.stop().is_err());
}

/// After a fatal error the workload's own changes to its address space do not wait on the
/// pager that serves nothing more: a `MADV_DONTNEED`, an `munmap` and a `fork` each raise
/// an event the kernel holds the caller on until it is read, and nobody read them any
/// more — the caller waited until the embedder dropped the pager (one joining the
/// workload first never does).
#[test]
fn after_a_fatal_error_the_workloads_madvise_munmap_and_fork_do_not_wait_on_the_pager() {
    const NAME: &str =
        "after_a_fatal_error_the_workloads_madvise_munmap_and_fork_do_not_wait_on_the_pager";
    if !testkit::isolated(NAME, WATCHDOG) {
        return;
    }
    let pages = 16;
    let image = common::image(pages, PS, 0);
    let memory = Mapping::new(MemoryKind::Anon, pages * PS).expect("map");
    let uffd = pager::Uffd::builder()
        .non_blocking(true)
        .require(
            pager::Features::EVENT_REMOVE
                | pager::Features::EVENT_UNMAP
                | pager::Features::EVENT_FORK,
        )
        .open()
        .expect("uffd");
    let builder = Pager::builder(uffd, Arc::new(MemorySource::new(image.clone())));
    let (base, len) = (memory.addr(), memory.len());
    // SAFETY: our own mapping, only read raw; unmapped only with the pager told (UNMAP).
    let pager = unsafe { builder.region(pager::RegionSpec::new(base, len, MemoryKind::Anon, 0)) }
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    // SAFETY: the served region.
    assert_eq!(unsafe { common::bytes(base, PS) }, &image[..PS]);
    pager.fail(SourceError {
        what: "the embedder gave up",
        offset: 0,
        source: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
    });
    /// Runs `f` on a thread of its own; whether it returned within `SIGBUS_WAIT`.
    fn returns(f: impl FnOnce() + Send + 'static) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        rx.recv_timeout(SIGBUS_WAIT).is_ok()
    }
    let memory = Arc::new(memory);
    let m = memory.clone();
    assert!(
        returns(move || m.madvise(0, PS, libc::MADV_DONTNEED).expect("madvise")),
        "MADV_DONTNEED returns"
    );
    assert!(
        returns(|| {
            // SAFETY: the child only `_exit`s.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(0) };
            }
            assert!(pid > 0, "fork");
            assert_eq!(common::wait(pid), 0);
        }),
        "fork returns"
    );
    assert!(
        returns(move || drop(Arc::into_inner(memory).expect("the last reference"))),
        "munmap returns"
    );
    assert!(pager.stop().is_err());
}

/// The same over shared memory resolved in MINOR mode, from a mapping of the file: the
/// pager copies a page's bytes into the page cache itself (through the alias), and that
/// copy out of the truncated file's mapping raised SIGBUS in the handler thread, which
/// ended the process. The copy fails instead (EFAULT): the pager fails, and a touch of a
/// page the file lost raises SIGBUS.
#[test]
fn a_mapped_file_image_truncated_under_a_minor_region_fails_the_pager_not_its_handler() {
    const NAME: &str =
        "a_mapped_file_image_truncated_under_a_minor_region_fails_the_pager_not_its_handler";
    if !testkit::isolated(NAME, WATCHDOG) {
        return;
    }
    assert!(
        serve_a_file_truncated_under(true).is_err(),
        "the pager failed"
    );
}
