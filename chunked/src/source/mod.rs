//! [`ChunkedSource`]: a [`pager::Source`] that serves an image a chunk at a time.
//!
//! A fault asks for a page; [`Source::fetch`] marks the page's chunk wanted and answers
//! [`Fetched::Pending`] at once (or [`Fetched::Zero`] for a zero chunk) — the fault loop
//! never waits on storage. A dispatcher on the source's own runtime turns wanted chunks
//! into ranged reads: urgent ones (asked for by a fault) first, adjacent wanted chunks
//! coalesced into one read, up to `max_in_flight` chunks at once; then, with the
//! remaining capacity, the background plan (a replayed working set, then every chunk in
//! order from the last fault). A chunk is fetched once however many faults hit it. When it
//! arrives and verifies, the faulted pages are placed first and woken, the rest of the
//! chunk right after with one placement.
//!
//! Use it with the pager's own prefetch off ([`pager::Prefetch::None`]): the source
//! prefetches itself, because it knows which chunks are already on their way and keeps
//! every page it has not placed `Missing`, so a fault on a chunk still queued in the
//! background reaches the source and is served first.
//!
//! Here the source, its shared state and the [`Source`] side; `dispatch.rs` what is read
//! next, `place.rs` how what arrives is placed.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use pager::{ChildSource, Fetched, Placer, Source, SourceError};

use crate::cache::ChunkCache;
use crate::error::{Error, Result};
use crate::fetch::{FetchStats, Fetcher, RetryPolicy};
use crate::layout::{Layout, Slot};
use crate::manifest::Geometry;

mod dispatch;
mod place;

/// What the source fetches when no fault asks for anything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Background {
    /// Nothing: chunks arrive only when faulted.
    None,
    /// Every chunk, in order from just after the last fault.
    #[default]
    Sequential,
    /// These image offsets first (a recorded working set, in fault order), then sequential.
    Replay(Vec<u64>),
}

/// Tuning of a [`ChunkedSource`].
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Chunks being fetched at once, at most (their bytes are the memory in flight).
    pub max_in_flight: usize,
    /// Chunks kept free of background fetches for faults.
    pub reserved_for_faults: usize,
    /// Chunks the background plan fetches at once, at most: enough to keep a store busy,
    /// few enough that a fault's read and placement do not queue behind a flood of them
    /// for the CPUs.
    pub max_background: usize,
    /// Most bytes one ranged read covers when coalescing adjacent chunks.
    pub max_read: u64,
    /// The background plan.
    pub background: Background,
    /// Hold the background plan back until the first fault (a VMM touches memory first).
    pub background_after_first_fault: bool,
    /// Retries.
    pub retry: RetryPolicy,
    /// Threads of the source's runtime.
    pub threads: usize,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            reserved_for_faults: 16,
            max_background: 16,
            max_read: 4 << 20,
            background: Background::Sequential,
            background_after_first_fault: false,
            retry: RetryPolicy::default(),
            threads: 2,
        }
    }
}

/// Counters of a [`ChunkedSource`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Fetching.
    pub fetch: FetchStats,
    /// Chunks placed.
    pub chunks_placed: u64,
    /// Chunks asked for by faults (each counted once while wanted).
    pub chunks_faulted: u64,
    /// Chunks fetched by the background plan.
    pub chunks_background: u64,
    /// Time from the source's first fault to its first placement, if any.
    pub first_fault_to_place: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    /// Wanted by a fault, waiting for a fetch slot.
    Queued,
    InFlight,
    Done,
    Zero,
}

struct Table {
    state: Vec<State>,
    /// Chunks faults asked for, in order (entries no longer Queued are skipped).
    urgent: VecDeque<usize>,
    /// Faulted page offsets per chunk in flight or queued: placed before the rest.
    waiting: HashMap<usize, Vec<u64>>,
    /// Zero pages to place for requests that straddled a zero and a data chunk.
    zero_pages: Vec<Range<u64>>,
    replay: VecDeque<usize>,
    in_flight: usize,
    /// Of which fetched by the background plan.
    background_in_flight: usize,
    /// Where the sequential background plan looks next.
    scan: usize,
    started_background: bool,
}

struct Shared {
    fetcher: Fetcher,
    table: Mutex<Table>,
    wake: tokio::sync::Notify,
    placer: OnceLock<Placer>,
    options: SourceOptions,
    stopped: AtomicBool,
    /// Chunk after the last fault: where the sequential plan resumes.
    cursor: AtomicUsize,
    placed: AtomicU64,
    faulted: AtomicU64,
    background: AtomicU64,
    first_fault: OnceLock<Instant>,
    first_place: OnceLock<Instant>,
}

/// A chunked image served lazily to a pager (see the module docs).
pub struct ChunkedSource {
    shared: Arc<Shared>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    len: u64,
}

impl std::fmt::Debug for ChunkedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkedSource")
            .field("geometry", &self.geometry())
            .finish_non_exhaustive()
    }
}

impl ChunkedSource {
    pub(crate) fn new(
        layout: Layout,
        cache: Option<Arc<ChunkCache>>,
        options: SourceOptions,
    ) -> Result<Self> {
        let g = layout.geometry;
        let chunks = layout.slots.len();
        let state = layout
            .slots
            .iter()
            .map(|s| match s {
                Slot::Zero => State::Zero,
                Slot::Data { .. } => State::Idle,
            })
            .collect();
        let replay = match &options.background {
            Background::Replay(offsets) => {
                let mut seen = vec![false; chunks];
                offsets
                    .iter()
                    .map(|&o| g.chunk_of(o))
                    .filter(|&c| c < chunks && !std::mem::replace(&mut seen[c], true))
                    .collect()
            }
            _ => VecDeque::new(),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.threads.max(1))
            .thread_name("chunked-fetch")
            .enable_all()
            .build()
            .map_err(Error::io("start the fetch runtime", "tokio"))?;
        let fetcher = Fetcher::new(layout, cache, options.retry, options.max_read);
        let len = g.len.next_multiple_of(u64::from(g.page_size));
        let shared = Arc::new(Shared {
            fetcher,
            table: Mutex::new(Table {
                state,
                urgent: VecDeque::new(),
                waiting: HashMap::new(),
                zero_pages: Vec::new(),
                replay,
                in_flight: 0,
                background_in_flight: 0,
                scan: 0,
                started_background: !options.background_after_first_fault,
            }),
            wake: tokio::sync::Notify::new(),
            placer: OnceLock::new(),
            options,
            stopped: AtomicBool::new(false),
            cursor: AtomicUsize::new(0),
            placed: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
            background: AtomicU64::new(0),
            first_fault: OnceLock::new(),
            first_place: OnceLock::new(),
        });
        Ok(Self {
            shared,
            runtime: Mutex::new(Some(runtime)),
            len,
        })
    }

    /// Page size, chunk size, length of the image.
    pub fn geometry(&self) -> Geometry {
        self.shared.fetcher.layout.geometry
    }

    /// Counters so far.
    pub fn stats(&self) -> SourceStats {
        let s = &self.shared;
        SourceStats {
            fetch: s.fetcher.stats(),
            chunks_placed: s.placed.load(Ordering::Relaxed),
            chunks_faulted: s.faulted.load(Ordering::Relaxed),
            chunks_background: s.background.load(Ordering::Relaxed),
            first_fault_to_place: match (s.first_fault.get(), s.first_place.get()) {
                (Some(f), Some(p)) => Some(p.saturating_duration_since(*f)),
                _ => None,
            },
        }
    }

    /// Whether every data chunk has been placed.
    pub fn is_complete(&self) -> bool {
        let t = self.shared.lock();
        t.state
            .iter()
            .all(|s| matches!(s, State::Done | State::Zero))
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn geometry(&self) -> Geometry {
        self.fetcher.layout.geometry
    }
}

impl Source for ChunkedSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let s = &self.shared;
        let g = s.geometry();
        let end = (offset + scratch.len() as u64).min(g.len);
        if offset >= end {
            return Ok(Fetched::Zero); // the padding after the image
        }
        let _ = s.first_fault.set(Instant::now());
        let (first, last) = (g.chunk_of(offset), g.chunk_of(end - 1));
        let mut t = s.lock();
        if (first..=last).all(|c| t.state[c] == State::Zero) {
            return Ok(Fetched::Zero);
        }
        t.started_background = true;
        for c in first..=last {
            let r = g.chunk_range(c);
            let wanted = offset.max(r.start);
            match t.state[c] {
                State::Zero => t.zero_pages.push(wanted..end.min(r.end)),
                State::Idle | State::Done => {
                    t.state[c] = State::Queued;
                    t.urgent.push_back(c);
                    t.waiting.entry(c).or_default().push(wanted);
                }
                State::Queued | State::InFlight => t.waiting.entry(c).or_default().push(wanted),
            }
        }
        drop(t);
        // Relaxed: a hint for the background plan.
        s.cursor.store(last + 1, Ordering::Relaxed);
        s.wake.notify_one();
        Ok(Fetched::Pending)
    }

    fn zero_ranges(&self) -> Vec<Range<u64>> {
        self.shared.fetcher.layout.zero_ranges()
    }

    /// Arrivals go to the placer of the pager attached first: a forked child is refused
    /// (its missing pages poisoned), never left waiting.
    fn child(&self) -> ChildSource {
        ChildSource::Refuse("a chunked source places into one address space")
    }

    fn attach(&self, placer: Placer) {
        if self.shared.placer.set(placer).is_err() {
            return; // attached once already
        }
        if let Some(rt) = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            rt.spawn(dispatch::run(self.shared.clone()));
        }
    }
}

impl Drop for ChunkedSource {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
        self.shared.wake.notify_one();
        if let Some(rt) = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            rt.shutdown_background();
        }
    }
}
