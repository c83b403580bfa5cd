//! Shared pieces of the workloads the tools run: synthetic images, access orders, timed
//! touches, percentiles.

use std::time::{Duration, Instant};

/// The content of page `index` of a synthetic image: distinct per page and per word;
/// every `zero_every`-th page (if non-zero) is all zero.
pub fn fill_page(page: &mut [u8], index: usize, zero_every: usize) {
    if zero_every != 0 && index % zero_every == zero_every - 1 {
        page.fill(0);
        return;
    }
    let seed = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (word, chunk) in page.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed ^ word as u64).to_ne_bytes());
    }
}

/// A synthetic image of `pages` pages.
pub fn synthetic_image(pages: usize, page_size: usize, zero_every: usize) -> Vec<u8> {
    let mut image = vec![0u8; pages * page_size];
    for (i, page) in image.chunks_exact_mut(page_size).enumerate() {
        fill_page(page, i, zero_every);
    }
    image
}

/// Access patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Ascending pages.
    Seq,
    /// A pseudo-random permutation.
    Random,
    /// Every 16th page, then the next residue, …
    Strided,
    /// All threads walk the same pages (racing on them).
    Shared,
    /// Runs of 1–4 MiB of contiguous pages at random places, in random order (a working
    /// set as a guest's memory has it: clustered, not spread page by page).
    Clustered,
}

/// The page order for one thread: `count` pages of its own slice (or the shared one).
pub fn order(pattern: Pattern, count: usize, seed: u64) -> Vec<usize> {
    let mut pages: Vec<usize> = match pattern {
        Pattern::Seq | Pattern::Shared => (0..count).collect(),
        Pattern::Strided => {
            let stride = 16.min(count.max(1));
            (0..stride)
                .flat_map(|r| (r..count).step_by(stride))
                .collect()
        }
        Pattern::Random => (0..count).collect(),
        Pattern::Clustered => return clustered(count, count, seed),
    };
    if pattern == Pattern::Random {
        let mut x = seed | 1;
        for i in (1..pages.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            pages.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }
    pages
}

/// `want` distinct pages of `pages`, as clusters of 256–1024 contiguous 4 KiB pages
/// (1–4 MiB) starting at random pages, each walked in order, the clusters in random order.
pub fn clustered(pages: usize, want: usize, seed: u64) -> Vec<usize> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let want = want.min(pages);
    let mut taken = vec![false; pages];
    let mut out = Vec::with_capacity(want);
    while out.len() < want {
        let len = (256 + next() % 769) as usize;
        let start = (next() % pages as u64) as usize;
        let end = (start + len).min(pages);
        for (p, seen) in taken[start..end].iter_mut().enumerate() {
            if out.len() == want {
                break;
            }
            if !std::mem::replace(seen, true) {
                out.push(start + p);
            }
        }
    }
    out
}

/// How a timed touch reaches its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Touch {
    /// A one-byte read. On fresh private anonymous memory with nothing registered it maps
    /// the shared zero page: no page is allocated or zeroed.
    Read,
    /// A one-byte write: the first touch allocates (and zeroes) a page on every kind.
    Write,
}

/// Touches one byte of each page of `order` under `base` (`touch`: a read or a write)
/// and records each access's latency in nanoseconds. Returns the latencies and the byte
/// sum of the reads (so they happen).
pub fn timed_touch(
    base: usize,
    page_size: usize,
    order: &[usize],
    touch: Touch,
) -> (Vec<u32>, u64) {
    let mut lat = Vec::with_capacity(order.len());
    let mut sum = 0u64;
    for &page in order {
        let addr = (base + page * page_size) as *mut u8;
        let t = Instant::now();
        match touch {
            // SAFETY: callers pass a mapped region covering every page of `order`.
            Touch::Read => sum += u64::from(unsafe { std::ptr::read_volatile(addr) }),
            // SAFETY: as above, and writable: callers map it read-write for this.
            Touch::Write => unsafe { std::ptr::write_volatile(addr, 1) },
        }
        lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
    }
    (lat, sum)
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Summary {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Maximum.
    pub max_us: f64,
    /// Pages per second over the wall time.
    pub pages_per_s: f64,
    /// Accesses measured.
    pub count: usize,
}

/// Summarises nanosecond latencies measured over `wall`.
pub fn summarize(mut ns: Vec<u32>, wall: Duration) -> Summary {
    ns.sort_unstable();
    let q = |p: f64| {
        if ns.is_empty() {
            return 0.0;
        }
        let i = ((ns.len() as f64 * p).ceil() as usize).clamp(1, ns.len()) - 1;
        f64::from(ns[i]) / 1000.0
    };
    Summary {
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: ns.last().map_or(0.0, |&v| f64::from(v) / 1000.0),
        pages_per_s: ns.len() as f64 / wall.as_secs_f64().max(1e-9),
        count: ns.len(),
    }
}

/// User and system CPU time of the whole process so far: every thread, gone ones too.
pub fn process_cpu() -> nix::Result<Duration> {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    let d =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    Ok(d(u.user_time()) + d(u.system_time()))
}
