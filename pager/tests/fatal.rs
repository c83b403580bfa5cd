//! A fatal error while several pager threads are placing: handlers (one per CPU, with
//! readahead), the eager prefetcher, and the workload's faults, `MADV_DONTNEED`s and
//! faults from the kernel (`process_vm_readv`, as a VMM's kernel reads guest memory). The
//! first thread to leave settles the stop — poisons what is not placed, then lets the
//! regions go (release.rs) — while the others' placements are still under way. Every
//! page then holds its image bytes or is poisoned (a read fails, a touch raises SIGBUS),
//! never zeros the workload did not make; no read waits for good; the pager stops within
//! a bound.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::mman::{madvise, MmapAdvise};
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use pager::{DeliveryMode, Fetched, Mapping, MemoryKind, Pager, Prefetch, Source, SourceError};

const PS: usize = 4096;
const PAGES: usize = 8192;
const WATCHDOG: Duration = Duration::from_secs(600);
/// Workload threads reading pages through the kernel.
const READERS: usize = 4;
/// How long a stop may take from the failure (the ENOENT grace is 1 s).
const STOP_BOUND: Duration = Duration::from_secs(5);

/// The image, until `budget` bytes have been fetched: every fetch after fails.
struct Breaking {
    image: Vec<u8>,
    budget: AtomicI64,
    failed_at: OnceLock<Instant>,
}

impl Source for Breaking {
    fn len(&self) -> u64 {
        self.image.len() as u64
    }
    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let len = scratch.len() as i64;
        if self.budget.fetch_sub(len, SeqCst) < len {
            self.failed_at.get_or_init(Instant::now);
            return Err(SourceError {
                what: "read the test image (broken on purpose)",
                offset,
                source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
            });
        }
        let at = offset as usize;
        Ok(Fetched::Data(&self.image[at..at + scratch.len()]))
    }
}

/// What reading a page through the kernel found.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// Its image bytes.
    Image,
    /// Poisoned (the kernel's read fails with EFAULT).
    Poisoned,
    /// All zeros.
    Zeros,
    /// Anything else.
    Other(String),
}

/// Reads page `page` of `memory` with `process_vm_readv(2)` on this process: a fault the
/// kernel takes (served by the pager while it runs), EFAULT on a poisoned page.
fn read_page(memory: &Mapping, image: &[u8], page: usize, buf: &mut [u8]) -> Read {
    let remote = [RemoteIoVec {
        base: memory.addr() + page * PS,
        len: PS,
    }];
    let mut local = [std::io::IoSliceMut::new(buf)];
    match process_vm_readv(nix::unistd::getpid(), &mut local, &remote) {
        Ok(PS) if buf == &image[page * PS..][..PS] => Read::Image,
        Ok(PS) if buf.iter().all(|&b| b == 0) => Read::Zeros,
        Ok(n) => Read::Other(format!("{n} bytes, not the image's")),
        Err(Errno::EFAULT) => Read::Poisoned,
        Err(e) => Read::Other(e.to_string()),
    }
}

/// The next of a xorshift sequence.
fn next(x: &mut u64) -> usize {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x as usize
}

/// One run: a pager whose source breaks after `budget` bytes, read and dropped by the
/// workload until it has stopped and a while after. Returns the pages found wrong.
fn run_once(image: &Arc<Vec<u8>>, budget: i64, seed: u64) -> Vec<(usize, Read)> {
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, PAGES * PS).expect("map"));
    let source = Arc::new(Breaking {
        image: image.to_vec(),
        budget: AtomicI64::new(budget),
        failed_at: OnceLock::new(),
    });
    let pager = Arc::new(
        Pager::builder(common::uffd(), source.clone())
            .mapping(memory.clone(), 0)
            .mode(DeliveryMode::PerCpu)
            .readahead(true)
            .prefetch(Prefetch::Eager)
            .start()
            .expect("start"),
    );
    // Pages the workload dropped itself (MADV_DONTNEED): those may read zeros.
    let dropped: Arc<Vec<AtomicBool>> = Arc::new((0..PAGES).map(|_| false.into()).collect());
    let stopped_reads = Arc::new(AtomicUsize::new(0));
    let (done, finished) = mpsc::channel::<Vec<(usize, Read)>>();
    for t in 0..=READERS {
        let (memory, image, pager) = (memory.clone(), image.clone(), pager.clone());
        let (dropped, stopped_reads, done) = (dropped.clone(), stopped_reads.clone(), done.clone());
        std::thread::spawn(move || {
            let mut x = seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut wrong = Vec::new();
            let mut buf = vec![0u8; PS];
            // Until 300 reads after the pager stopped (each thread's share).
            while stopped_reads.load(SeqCst) < 300 * READERS {
                let page = next(&mut x) % PAGES;
                if pager.has_stopped() {
                    stopped_reads.fetch_add(1, SeqCst);
                }
                if t == READERS {
                    // The dropper: the workload's own zeros, and REMOVE events queued as
                    // the pager fails (its madvise must not wait on the stopped pager).
                    dropped[page].store(true, SeqCst);
                    let at = std::ptr::NonNull::new((memory.addr() + page * PS) as *mut _)
                        .expect("mapped");
                    // SAFETY: a page of our own mapping, whose content we do not rely on.
                    unsafe { madvise(at, PS, MmapAdvise::MADV_DONTNEED) }.expect("madvise");
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                match read_page(&memory, &image, page, &mut buf) {
                    Read::Image | Read::Poisoned => {}
                    Read::Zeros if dropped[page].load(SeqCst) => {}
                    other => wrong.push((page, other)),
                }
            }
            drop(pager); // before the word: the test then holds the only one
            let _ = done.send(wrong);
        });
    }
    drop(done);
    assert!(
        pager.wait(Some(Duration::from_secs(60))),
        "the pager stops (budget {budget})"
    );
    let failed_at = *source.failed_at.get().expect("the source broke");
    assert!(
        failed_at.elapsed() < STOP_BOUND,
        "the pager settled {:?} after the failure",
        failed_at.elapsed()
    );
    let mut wrong = Vec::new();
    for _ in 0..=READERS {
        match finished.recv_timeout(Duration::from_secs(60)) {
            Ok(w) => wrong.extend(w),
            Err(_) => panic!("a workload thread hung (budget {budget})"),
        }
    }
    let pager = Arc::into_inner(pager).expect("the workload let go of the pager");
    let stopping = Instant::now();
    assert!(pager.stop().is_err(), "the pager failed");
    assert!(
        stopping.elapsed() < STOP_BOUND,
        "stop took {:?}",
        stopping.elapsed()
    );
    // Every page, once more, after the stop.
    let mut buf = vec![0u8; PS];
    for page in 0..PAGES {
        match read_page(&memory, image, page, &mut buf) {
            Read::Image | Read::Poisoned => {}
            Read::Zeros if dropped[page].load(SeqCst) => {}
            other => wrong.push((page, other)),
        }
    }
    wrong
}

#[test]
fn a_fatal_error_amid_busy_placements_leaves_each_page_its_bytes_or_poisoned_never_zeros() {
    let name = "fatal::a_fatal_error_amid_busy_placements_leaves_each_page_its_bytes_or_poisoned_never_zeros";
    if !testkit::isolated(name, WATCHDOG) {
        return;
    }
    let image = Arc::new(common::image(PAGES, PS, 0));
    let len = image.len() as i64;
    for round in 0..24u64 {
        // The failure lands anywhere from early to late in the eager copy.
        let budget = len * (round as i64 % 12 + 1) / 14;
        let wrong = run_once(&image, budget, round * 7919 + 1);
        assert!(
            wrong.is_empty(),
            "round {round} (failure after {budget} bytes): {} page(s) wrong, first {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(8)]
        );
    }
}
