//! Helpers for the snapshot tests: real memory, real writers, real faults.
#![allow(dead_code)] // each test file uses its own part

use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::{DeliveryMode, Pager, Prefetch, Source};
use snapshot::workload::{fill_initial, WriterOptions, Writers};
use uffd_core::{Features, Mapping, MemoryKind, Uffd};

/// Writes each thread may log: 32 MiB of log per thread, far more than the seconds of a
/// test write.
pub const LOG: usize = 8 << 20;

/// A mapping of `kind` with the workload's initial content (anonymous memory keeps every
/// fourth page unpopulated) and that content as bytes.
pub fn memory(kind: MemoryKind, len: usize) -> (Mapping, Vec<u8>) {
    let map = Mapping::new(kind, len).expect("map");
    let mut initial = vec![0u8; len];
    fill_initial(&mut initial);
    for (p, page) in initial.chunks_exact(4096).enumerate() {
        if kind == MemoryKind::Anon && p % 4 == 3 {
            continue; // untouched: no page behind it yet
        }
        // SAFETY: the page lies in our fresh mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(page.as_ptr(), (map.addr() + p * 4096) as *mut u8, 4096)
        };
    }
    (map, initial)
}

/// Starts `threads` logged writers on `map` at full speed and waits until each has
/// written `warm_up` words.
pub fn writers(map: &Mapping, threads: usize, warm_up: u64) -> Writers {
    writers_at(map, map.len(), threads, 0, warm_up)
}

/// Starts `threads` logged writers on the first `span` bytes of `map`, dirtying
/// `rate_mib` MiB/s of pages (0: full speed), and waits until each has written `warm_up`
/// words.
pub fn writers_at(
    map: &Mapping,
    span: usize,
    threads: usize,
    rate_mib: u64,
    warm_up: u64,
) -> Writers {
    assert!(span <= map.len());
    let options = WriterOptions {
        threads,
        rate_mib,
        log_capacity: LOG,
        ..WriterOptions::default()
    };
    // SAFETY: the mapping outlives the writers (every test stops them before it goes).
    let w = unsafe { Writers::start(map.addr(), span, &options) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.per_thread().iter().any(|&n| n < warm_up) {
        assert!(Instant::now() < deadline, "the writers did not start");
        std::thread::sleep(Duration::from_millis(1));
    }
    w
}

/// The bytes of `map` (read directly; call with no writer running).
pub fn contents(map: &Mapping) -> Vec<u8> {
    // SAFETY: a live mapping of ours, nothing writes it now.
    unsafe { std::slice::from_raw_parts(map.as_ptr(), map.len()) }.to_vec()
}

/// Asserts that every writer keeps writing (none is left blocked): 10 000 more writes
/// each within 30 s (generous: a loaded machine may starve one of them for a while).
pub fn assert_writing(w: &Writers, after: &str) {
    let before = w.per_thread();
    let deadline = Instant::now() + Duration::from_secs(30);
    while w
        .per_thread()
        .iter()
        .zip(&before)
        .any(|(now, then)| *now < then + 10_000)
    {
        assert!(
            Instant::now() < deadline,
            "a writer is blocked {after}: {:?} writes, {before:?} before",
            w.per_thread()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Serves `source` into fresh `kind` memory through a pager and reads all of it (every
/// page faulted in, in order).
pub fn restore(source: Arc<dyn Source>, kind: MemoryKind, len: usize) -> Vec<u8> {
    let memory = Arc::new(Mapping::new(kind, len).expect("map"));
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_REMOVE)
        .optional(Features::MISSING_HUGETLBFS)
        .open()
        .expect("uffd");
    let pager = Pager::builder(uffd, source)
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .prefetch(Prefetch::None)
        .start()
        .expect("pager");
    let got = contents(&memory);
    pager.stop().expect("stop");
    got
}
