//! page-state micro-benchmarks, each beside a baseline measured in the same run:
//! single-page ops vs one bare `AtomicU64::compare_exchange`; range ops and scans over
//! 1 Mi pages; 2-thread contended transitions vs the `Mutex<Vec<u8>>` map of the
//! original postcopy design.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use page_state::{PageState, PageStateMap};

const MI: usize = 1 << 20;

fn single_page_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("single_page");
    g.measurement_time(Duration::from_secs(3));
    // Baseline: one CAS per op on the same word layout (32 pages per word).
    g.bench_function("baseline_atomic_cas", |b| {
        b.iter_custom(|iters| {
            let words: Vec<AtomicU64> = (0..(iters as usize).div_ceil(32))
                .map(|_| AtomicU64::new(0))
                .collect();
            let start = Instant::now();
            for i in 0..iters as usize {
                let w = &words[i / 32];
                let old = w.load(Ordering::Acquire);
                let _ = black_box(w.compare_exchange(
                    old,
                    old | 1 << (2 * (i % 32)),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ));
            }
            start.elapsed()
        })
    });
    g.bench_function("get", |b| {
        let map = PageStateMap::new(MI);
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters as usize {
                black_box(map.get(i & (MI - 1))).ok();
            }
            start.elapsed()
        })
    });
    g.bench_function("request_missing", |b| {
        b.iter_custom(|iters| {
            let map = PageStateMap::new(iters as usize);
            let start = Instant::now();
            for i in 0..iters as usize {
                black_box(map.request(i)).ok();
            }
            start.elapsed()
        })
    });
    g.bench_function("request_already_requested", |b| {
        let map = PageStateMap::new(MI);
        for p in 0..MI {
            map.request(p).ok();
        }
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters as usize {
                black_box(map.request(i & (MI - 1))).ok();
            }
            start.elapsed()
        })
    });
    g.bench_function("mark_received", |b| {
        b.iter_custom(|iters| {
            let map = PageStateMap::new(iters as usize);
            let start = Instant::now();
            for i in 0..iters as usize {
                black_box(map.mark_received(i)).ok();
            }
            start.elapsed()
        })
    });
    g.finish();
}

fn range_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("range_1Mi_pages");
    g.sample_size(30);
    g.bench_function("discard_range", |b| {
        b.iter_batched(
            || PageStateMap::filled(MI, PageState::Received),
            |map| black_box(map.discard_range(0, MI)),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("mark_zero_range", |b| {
        b.iter_batched(
            || PageStateMap::new(MI),
            |map| black_box(map.mark_zero_range(0, MI)),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("count_received", |b| {
        let map = PageStateMap::filled(MI, PageState::Received);
        b.iter(|| black_box(map.count(PageState::Received)))
    });
    g.bench_function("export_received", |b| {
        let map = PageStateMap::filled(MI, PageState::Received);
        let mut out = vec![0u64; map.bitmap_words()];
        b.iter(|| map.export_received_into(black_box(&mut out)))
    });
    g.finish();
}

fn scans(c: &mut Criterion) {
    let mut g = c.benchmark_group("next_missing_full_pass_1Mi");
    g.sample_size(20);
    for percent in [1u64, 50, 99] {
        let map = PageStateMap::new(MI);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for p in 0..MI {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 100 < percent {
                map.mark_received(p).ok();
            }
        }
        g.bench_function(format!("{percent}pct_received"), |b| {
            b.iter(|| {
                // Visit every missing page, as the background stream does.
                let (mut p, mut seen) = (0, 0usize);
                while let Some(m) = map.next_missing(p) {
                    seen += 1;
                    p = m + 1;
                }
                black_box(seen)
            })
        });
    }
    g.finish();
}

fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("contended_2_threads");
    g.measurement_time(Duration::from_secs(4));
    // Both threads share one map; "dense" packs it into 16 cache lines (worst case for
    // the lock-free map: most ops bounce a line), "1Mi" is a realistic guest size.
    for (name, pages) in [("dense_4Ki_pages", 4096usize), ("1Mi_pages", MI)] {
        g.bench_function(format!("page_state_map/{name}"), |b| {
            b.iter_custom(|iters| {
                let map = Arc::new(PageStateMap::new(pages));
                run_two(iters, pages, move |page| {
                    map.request(page).ok();
                    map.mark_received(page).ok();
                    map.discard(page).ok();
                })
            })
        });
        g.bench_function(format!("baseline_mutex_vec_u8/{name}"), |b| {
            b.iter_custom(|iters| {
                let map = Arc::new(Mutex::new(vec![0u8; pages]));
                run_two(iters, pages, move |page| {
                    // The same three transitions, each under the lock as the original did.
                    let step = |apply: fn(&mut u8)| apply(&mut map.lock().expect("lock")[page]);
                    step(|s| {
                        if *s == 0 {
                            *s = 1
                        }
                    });
                    step(|s| *s = 2);
                    step(|s| {
                        if *s == 2 {
                            *s = 0
                        }
                    });
                })
            })
        });
    }
    g.finish();
}

/// Two threads (unpinned, on this 2-vCPU machine one per CPU) each run `iters` ops on\n/// pseudo-random pages; each op is request, mark received, discard. Returns wall time.
fn run_two(iters: u64, pages: usize, op: impl Fn(usize) + Send + Sync + 'static) -> Duration {
    let op = Arc::new(op);
    let barrier = Arc::new(Barrier::new(3));
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let (op, barrier) = (op.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut x = 0x2545_F491_4F6C_DD1Du64 + t;
                barrier.wait();
                for _ in 0..iters {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    op(x as usize % pages);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for t in threads {
        t.join().expect("bench thread");
    }
    start.elapsed()
}

criterion_group!(benches, single_page_ops, range_ops, scans, contended);
criterion_main!(benches);
