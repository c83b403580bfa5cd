//! A reference workload for measuring and checking snapshots: threads writing 8-byte words
//! at random places of a region, at full speed or at a set rate of pages dirtied, each
//! write logged with a sequence number, each blocked write timed, pausable (it is a
//! [`Quiesce`]). It is what `uffdkit snapshot` runs, and what the tests check snapshots
//! with: from the log, [`WriteLog::check_cut`] rebuilds the memory at the instant a
//! snapshot claims to hold and compares it byte for byte.
//!
//! Thread `t` of `T` writes only the words whose index within their page is `t` modulo
//! `T`, and the value of
//! its `n`-th write (from 1) is `(t + 1) << 48 | n`; the initial content
//! ([`fill_initial`]) has zero in the top 16 bits. So every word of a snapshot says which
//! write it holds, and the included writes of each thread must be a prefix of its log.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::chain::{Quiesce, QuiesceError};

/// Bytes per page of the workload's address arithmetic (its "pages dirtied" are 4 KiB).
const PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE / 8;

/// Writes the initial content of a region: page `p` holds words `p << 20 | w` (top 16
/// bits zero), except every fourth page, left as it is (zero, and unpopulated if fresh).
pub fn fill_initial(memory: &mut [u8]) {
    for (p, page) in memory.chunks_exact_mut(PAGE).enumerate() {
        if p % 4 == 3 {
            continue;
        }
        for (w, word) in page.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&((p as u64) << 20 | w as u64).to_ne_bytes());
        }
    }
}

/// How the writers write.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Writer threads.
    pub threads: usize,
    /// 4 KiB pages dirtied per second, in MiB/s, over all threads (0: as fast as they can).
    pub rate_mib: u64,
    /// Send 90 % of the writes to a hot 5 % of the pages (the region's first), the rest
    /// anywhere: a working set, as a guest's writes have one. Otherwise uniform.
    pub hot: bool,
    /// Writes each thread logs (and then stops writing): bounds the log's memory, 4 bytes
    /// a write. 0: no log (no check possible), write until stopped.
    pub log_capacity: usize,
    /// A write taking longer than this counts as blocked, and its time is kept.
    pub stall_threshold: Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            threads: 1,
            rate_mib: 0,
            hot: false,
            log_capacity: 0,
            stall_threshold: Duration::from_micros(4),
        }
    }
}

/// Running writers. Stop them with [`Writers::stop`]; dropping stops them too.
pub struct Writers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<ThreadLog>>,
    started: Instant,
}

struct Shared {
    stop: AtomicBool,
    pause: AtomicBool,
    parked: AtomicUsize,
    /// Writes per thread, each on its own cache line.
    writes: Vec<Counter>,
}

/// A thread's write count, alone on its cache line (updated on every write).
#[repr(align(64))]
struct Counter(AtomicU64);

/// One thread's record.
#[derive(Debug, Default)]
struct ThreadLog {
    /// Word index (from the region's start) of each write, in order.
    words: Vec<u32>,
    writes: u64,
    /// (end of the write since the writers started, its duration), both in ns, for the
    /// writes that took longer than the threshold.
    stalls: Vec<(u64, u32)>,
}

/// A blocked write: when it ended and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// When the write completed, since the writers started.
    pub at: Duration,
    /// How long it took.
    pub took: Duration,
}

/// What the writers did: their logs and their blocked writes.
#[derive(Debug)]
pub struct WriteLog {
    threads: Vec<ThreadLog>,
}

/// How a snapshot matched the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// Per thread: writes the snapshot holds (a prefix of its log), and writes logged.
    pub included: Vec<(u64, u64)>,
}

impl Writers {
    /// Starts `options.threads` writers on `[base, base + len)` (`len` a multiple of 4 KiB).
    ///
    /// # Safety
    /// The range is mapped, writable memory that stays mapped until the writers are
    /// stopped (or dropped), and nothing else writes it meanwhile.
    pub unsafe fn start(base: usize, len: usize, options: &WriterOptions) -> Writers {
        let threads = options.threads.max(1);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            writes: (0..threads).map(|_| Counter(AtomicU64::new(0))).collect(),
        });
        let started = Instant::now();
        let handles = (0..threads)
            .map(|t| {
                let shared = shared.clone();
                let options = options.clone();
                std::thread::spawn(move || {
                    write_loop(&shared, base, len, t, threads, &options, started)
                })
            })
            .collect();
        Writers {
            shared,
            threads: handles,
            started,
        }
    }

    /// Writes so far, all threads.
    pub fn writes(&self) -> u64 {
        self.per_thread().iter().sum()
    }

    /// Writes so far of each thread.
    pub fn per_thread(&self) -> Vec<u64> {
        // Relaxed: progress figures.
        self.shared
            .writes
            .iter()
            .map(|w| w.0.load(Ordering::Relaxed))
            .collect()
    }

    /// When the writers started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Stops the writers and returns what they did.
    pub fn stop(mut self) -> WriteLog {
        self.halt()
    }

    fn halt(&mut self) -> WriteLog {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.pause.store(false, Ordering::Relaxed);
        let threads = self
            .threads
            .drain(..)
            .map(|h| h.join().unwrap_or_default())
            .collect();
        WriteLog { threads }
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.halt();
        }
    }
}

impl Quiesce for Writers {
    fn pause(&mut self) -> Result<(), QuiesceError> {
        self.shared.pause.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        // Acquire: pairs with each writer's Release when it parks, so its writes are
        // visible to whoever reads the memory after the pause.
        while self.shared.parked.load(Ordering::Acquire) < self.threads.len() {
            if Instant::now() > deadline {
                self.shared.pause.store(false, Ordering::Relaxed);
                return Err("the writers did not park within 30 s".into());
            }
            std::thread::yield_now();
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), QuiesceError> {
        self.shared.pause.store(false, Ordering::Release);
        Ok(())
    }
}

/// xorshift64: the writers' cheap random numbers.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn write_loop(
    shared: &Shared,
    base: usize,
    len: usize,
    t: usize,
    threads: usize,
    options: &WriterOptions,
    started: Instant,
) -> ThreadLog {
    let pages = (len / PAGE) as u64;
    let lanes = (WORDS_PER_PAGE / threads).max(1) as u64;
    let mut log = ThreadLog {
        words: Vec::with_capacity(options.log_capacity),
        ..ThreadLog::default()
    };
    let threshold = options.stall_threshold.as_nanos() as u64;
    // Writes per second for this thread (each dirties a random page), checked against the
    // clock about every millisecond.
    let per_s = options.rate_mib * 256 / threads as u64;
    let check_every = (per_s / 1000).max(1);
    let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ ((t as u64 + 1) << 32);
    let throttle_start = Instant::now();
    let mut seq = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        if shared.pause.load(Ordering::Relaxed) {
            // Release: the writes before parking are visible to the pauser.
            shared.parked.fetch_add(1, Ordering::Release);
            while shared.pause.load(Ordering::Acquire) && !shared.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(50));
            }
            shared.parked.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        if options.log_capacity > 0 && log.words.len() == options.log_capacity {
            std::thread::sleep(Duration::from_micros(200)); // log full: write no more
            continue;
        }
        let r = next(&mut x);
        let page = if options.hot && r % 10 != 0 {
            (r >> 8) % (pages / 20).max(1)
        } else {
            (r >> 8) % pages
        };
        let lane = (next(&mut x) >> 8) % lanes;
        let word = page as usize * WORDS_PER_PAGE + lane as usize * threads + t;
        if word >= len / 8 {
            continue;
        }
        seq += 1;
        let value = ((t as u64 + 1) << 48) | seq;
        let before = started.elapsed();
        // SAFETY: `word` lies in the range, which `Writers::start`'s caller keeps mapped
        // and writable until the writers are joined; no one else writes it.
        unsafe { ((base + word * 8) as *mut u64).write_volatile(value) };
        let after = started.elapsed();
        let took = (after - before).as_nanos() as u64;
        if took > threshold {
            log.stalls.push((
                after.as_nanos() as u64,
                took.min(u64::from(u32::MAX)) as u32,
            ));
        }
        if options.log_capacity > 0 {
            log.words.push(word as u32);
        }
        log.writes += 1;
        // Relaxed: a progress figure; only this thread writes it.
        shared.writes[t].0.store(log.writes, Ordering::Relaxed);
        if options.rate_mib > 0 && log.writes % check_every == 0 {
            // Throttle: n writes should take n / per_s seconds.
            let due = Duration::from_nanos(log.writes * 1_000_000_000 / per_s.max(1));
            if let Some(ahead) = due.checked_sub(throttle_start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    }
    log
}

impl WriteLog {
    /// Writes done, all threads.
    pub fn writes(&self) -> u64 {
        self.threads.iter().map(|t| t.writes).sum()
    }

    /// The blocked writes of all threads, in no particular order.
    pub fn stalls(&self) -> Vec<Stall> {
        self.threads
            .iter()
            .flat_map(|t| &t.stalls)
            .map(|&(at, took)| Stall {
                at: Duration::from_nanos(at),
                took: Duration::from_nanos(u64::from(took)),
            })
            .collect()
    }

    /// Checks that `snapshot` is the memory at one consistent instant of the run: starting
    /// from `expected` (the region's initial content, overwritten here), the writes each
    /// thread's words in `snapshot` show must be a prefix of its log, and replaying
    /// exactly those prefixes must give `snapshot` byte for byte.
    pub fn check_cut(&self, expected: &mut [u8], snapshot: &[u8]) -> Result<Cut, String> {
        if expected.len() != snapshot.len() || snapshot.len() % 8 != 0 {
            return Err(format!(
                "sizes differ: initial {} bytes, snapshot {}",
                expected.len(),
                snapshot.len()
            ));
        }
        let threads = self.threads.len() as u64;
        let word = |i: usize| u64::from_ne_bytes(snapshot[i * 8..i * 8 + 8].try_into().expect("8"));
        // The newest write of each thread the snapshot holds.
        let mut newest = vec![0u64; self.threads.len()];
        for i in 0..snapshot.len() / 8 {
            let v = word(i);
            let tag = v >> 48;
            if tag == 0 {
                continue;
            }
            let t = (tag - 1) as usize;
            let seq = v & ((1 << 48) - 1);
            if tag > threads || (i % WORDS_PER_PAGE) as u64 % threads != t as u64 {
                return Err(format!(
                    "word {i} holds {v:#x}, which no writer of its lane wrote"
                ));
            }
            let logged = &self.threads[t].words;
            if seq == 0 || seq as usize > logged.len() || logged[seq as usize - 1] as usize != i {
                return Err(format!(
                    "word {i} holds write {seq} of thread {t}, which the log puts elsewhere"
                ));
            }
            newest[t] = newest[t].max(seq);
        }
        for (t, log) in self.threads.iter().enumerate() {
            for (n, &w) in log.words[..newest[t] as usize].iter().enumerate() {
                let value = ((t as u64 + 1) << 48) | (n as u64 + 1);
                expected[w as usize * 8..w as usize * 8 + 8].copy_from_slice(&value.to_ne_bytes());
            }
        }
        if let Some(i) = (0..snapshot.len() / 8)
            .find(|&i| expected[i * 8..i * 8 + 8] != snapshot[i * 8..i * 8 + 8])
        {
            let want = u64::from_ne_bytes(expected[i * 8..i * 8 + 8].try_into().expect("8"));
            return Err(format!(
                "word {i} (page {}): the instant the snapshot shows needs {want:#x} there, it holds {:#x}: not a consistent cut",
                i * 8 / PAGE,
                word(i)
            ));
        }
        Ok(Cut {
            included: newest
                .iter()
                .zip(&self.threads)
                .map(|(&n, t)| (n, t.words.len() as u64))
                .collect(),
        })
    }
}
