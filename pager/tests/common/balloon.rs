//! The balloon stress: a workload reads and verifies pages while another thread drops
//! random ranges with `MADV_DONTNEED` (what a balloon driver inflating does), with the
//! prefetcher, fault-around and readahead placing pages (runs, too) at the same time. Every read is checked
//! against a log of the drops: a page reads its image content until a drop of it has
//! completed, and zeros from then on (pages are never written by the workload). A page
//! that reads zeros but was never dropped, or image data after its drop completed, or
//! anything else while no drop of it is in flight, is a wrong page.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::{
    DeliveryMode, Features, Fetched, Mapping, MemoryKind, MemorySource, Pager, Prefetch, Source,
    SourceError, StatsSnapshot, Uffd,
};

/// What a stress run did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Rounds (a fresh mapping and pager each).
    pub rounds: u64,
    /// Reads verified while drops ran.
    pub reads: u64,
    /// `MADV_DONTNEED` calls.
    pub drops: u64,
    /// EAGAINs the placements met, summed over rounds.
    pub again: u64,
    /// Claims given back, summed over rounds.
    pub released: u64,
    /// Pages placed as zeros because a REMOVE hit them in flight.
    pub removed_in_flight: u64,
    /// REMOVE events.
    pub removes: u64,
}

impl Outcome {
    fn add(&mut self, reads: u64, drops: u64, s: &StatsSnapshot) {
        self.rounds += 1;
        self.reads += reads;
        self.drops += drops;
        self.again += s.again;
        self.released += s.released;
        self.removed_in_flight += s.removed_in_flight;
        self.removes += s.events_remove;
    }
}

/// A memory source that busy-waits `delay` per fetch: pages stay Missing long enough for
/// drops to race their placements. Busy-waiting on the clock is signal-safe.
struct Slow {
    inner: MemorySource,
    delay: Duration,
}

impl Source for Slow {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let start = Instant::now();
        while start.elapsed() < self.delay {
            std::hint::spin_loop();
        }
        self.inner.fetch(offset, scratch)
    }

    fn signal_safe(&self) -> Option<pager::SignalSafe> {
        // SAFETY: the test's `fetch` copies from memory it owns (or fails), no more.
        Some(unsafe { pager::SignalSafe::promise() })
    }
}

/// Per-page counts of drops started and completed.
struct DropLog {
    started: Vec<AtomicU32>,
    done: Vec<AtomicU32>,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Reads page `page` at `addr` word by word (volatile: memory another thread drops).
fn read_page(addr: usize, buf: &mut [u64]) {
    for (i, w) in buf.iter_mut().enumerate() {
        // SAFETY: inside the mapped region the pager serves; volatile because another
        // thread drops pages under us.
        *w = unsafe { std::ptr::read_volatile((addr as *const u64).add(i)) };
    }
}

/// Checks one read of `page`: `done_before` drops had completed before the read began,
/// `started_after` had started by the time it ended.
fn check(page: usize, got: &[u64], want: &[u8], done_before: u32, started_after: u32) {
    let is_data = got
        .iter()
        .zip(want.chunks_exact(8))
        .all(|(g, w)| g.to_ne_bytes() == w);
    let is_zero = got.iter().all(|&w| w == 0);
    if is_data {
        assert_eq!(
            done_before, 0,
            "page {page} reads its image data after a drop of it completed"
        );
    } else if is_zero {
        assert!(
            started_after > 0,
            "page {page} reads zeros but was never dropped"
        );
    } else {
        assert!(
            started_after > done_before,
            "page {page} holds neither its data nor zeros, with no drop of it in flight"
        );
    }
}

/// Runs rounds of the stress for about `total` in `mode` on `kind` memory (the uffd also
/// gets `features`), and returns what happened; panics on the first wrong page.
pub fn run(mode: DeliveryMode, kind: MemoryKind, features: Features, total: Duration) -> Outcome {
    let ps = kind.page_size();
    let pages = if kind.is_hugetlb() { 16 } else { 2048 };
    let image = Arc::new(super::image(pages, ps, 0));
    let deadline = Instant::now() + total;
    let mut outcome = Outcome::default();
    let mut seed = 0x9E37_79B9_7F4A_7C15 ^ (ps as u64);
    while Instant::now() < deadline {
        seed = xorshift(&mut seed);
        let (reads, drops, stats) = round(mode, kind, features, &image, pages, seed);
        outcome.add(reads, drops, &stats);
    }
    outcome
}

fn round(
    mode: DeliveryMode,
    kind: MemoryKind,
    features: Features,
    image: &Arc<Vec<u8>>,
    pages: usize,
    seed: u64,
) -> (u64, u64, StatsSnapshot) {
    let ps = kind.page_size();
    let memory = Arc::new(Mapping::new(kind, pages * ps).expect("map"));
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_REMOVE | features)
        .open()
        .expect("uffd");
    let source = Slow {
        inner: MemorySource::new(image.as_slice().to_vec()),
        delay: Duration::from_micros(if kind.is_hugetlb() { 200 } else { 20 }),
    };
    let pager = Pager::builder(uffd, Arc::new(source))
        .mapping(memory.clone(), 0)
        .mode(mode)
        .fault_around(4)
        .readahead(true)
        .prefetch(Prefetch::Sequential)
        .start()
        .expect("start");
    let log = DropLog {
        started: (0..pages).map(|_| AtomicU32::new(0)).collect(),
        done: (0..pages).map(|_| AtomicU32::new(0)).collect(),
    };
    let stop = AtomicBool::new(false);
    let (reads, drops) = (AtomicU64::new(0), AtomicU64::new(0));
    let max_run = if kind.is_hugetlb() { 2 } else { 8 };
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut x = seed | 1;
            while !stop.load(SeqCst) {
                let first = xorshift(&mut x) as usize % pages;
                let count = (1 + xorshift(&mut x) as usize % max_run).min(pages - first);
                for p in first..first + count {
                    log.started[p].fetch_add(1, SeqCst);
                }
                memory
                    .madvise(first * ps, count * ps, libc::MADV_DONTNEED)
                    .expect("MADV_DONTNEED");
                for p in first..first + count {
                    log.done[p].fetch_add(1, SeqCst);
                }
                drops.fetch_add(1, SeqCst);
                // Let placements and faults interleave with the next drop.
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        for t in 0..2u64 {
            let (log, stop, reads) = (&log, &stop, &reads);
            let (addr, image) = (memory.addr(), image.clone());
            s.spawn(move || {
                let mut x = seed.rotate_left(17) ^ (t + 1);
                let mut buf = vec![0u64; ps / 8];
                while !stop.load(SeqCst) {
                    let page = xorshift(&mut x) as usize % pages;
                    let done_before = log.done[page].load(SeqCst);
                    read_page(addr + page * ps, &mut buf);
                    let started_after = log.started[page].load(SeqCst);
                    check(
                        page,
                        &buf,
                        &image[page * ps..(page + 1) * ps],
                        done_before,
                        started_after,
                    );
                    reads.fetch_add(1, SeqCst);
                }
            });
        }
        std::thread::sleep(Duration::from_millis(250));
        stop.store(true, SeqCst);
    });
    // Quiet now: every page reads exactly its data, or zeros if it was ever dropped.
    let mut buf = vec![0u64; ps / 8];
    for page in 0..pages {
        read_page(memory.addr() + page * ps, &mut buf);
        let dropped = log.done[page].load(SeqCst);
        let want = &image[page * ps..(page + 1) * ps];
        check(page, &buf, want, dropped, dropped);
    }
    let stats = pager.stop().expect("stop");
    (reads.into_inner(), drops.into_inner(), stats)
}
