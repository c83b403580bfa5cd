//! In the spirit of the kernel's uffd-stress: worker threads lock and bump counters that
//! live inside pages served on demand, while a background copier races the fault handler
//! to place the same pages (so `Exists` + wake is a normal path). After several bounces
//! (each a fresh region filled from the previous one) every counter must be intact.

use crate::common;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use uffd_core::{CopyMode, Error, Event, Features, Mapping, MemoryKind, RegisterMode, Uffd};

const WORKERS: usize = 4;
const BOUNCES: usize = 4;
const OPS_PER_BOUNCE: usize = 3000;

/// Places page `page` of `src` at `base`; `Exists` (the other placer won) wakes instead.
/// Returns whether this call lost the race.
fn place(uffd: &Uffd, base: usize, src: &[u8], ps: usize, page: usize) -> bool {
    let dst = base + page * ps;
    // SAFETY: `dst` is a page of the bounce's registered region, filled only from `src`.
    match unsafe { uffd.copy(dst, &src[page * ps..(page + 1) * ps], CopyMode::empty()) } {
        Ok(_) => false,
        Err(Error::Exists { .. }) => {
            uffd.wake(dst, ps).expect("wake");
            true
        }
        Err(e) => panic!("placing page {page}: {e}"),
    }
}

fn lock(word: &AtomicU32) {
    // Acquire: the counter read after taking the lock sees the previous holder's write.
    while word
        .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::hint::spin_loop();
    }
}

fn bounce_all(kind: MemoryKind, pages: usize) -> (u64, u64) {
    let ps = kind.page_size();
    let expected: Arc<Vec<AtomicU64>> = Arc::new((0..pages).map(|_| AtomicU64::new(0)).collect());
    let mut src = vec![0u8; pages * ps];
    for page in 0..pages {
        // Bytes past the lock and counter carry a pattern that must survive every bounce.
        let tail = common::pattern(page, ps, 0xB0);
        src[page * ps + 64..(page + 1) * ps].copy_from_slice(&tail[64..]);
    }
    let src_tails = src.clone();
    let (mut exists, mut faults) = (0u64, 0u64);
    for bounce in 0..BOUNCES {
        let region = Mapping::new(kind, pages * ps).expect("map");
        let uffd = Arc::new(common::open(Features::empty()));
        uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
            .expect("register");
        let base = region.addr();
        let source = Arc::new(std::mem::take(&mut src));
        let lost = Arc::new(AtomicU64::new(0));
        let handler = {
            let (source, lost) = (source.clone(), lost.clone());
            common::Handler::spawn(uffd.clone(), move |uffd, event| {
                let Event::Pagefault { addr, .. } = event else {
                    panic!("unexpected {event:?}")
                };
                if place(uffd, base, &source, ps, (addr - base) / ps) {
                    lost.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let copier = {
            let (uffd, source, lost) = (uffd.clone(), source.clone(), lost.clone());
            std::thread::spawn(move || {
                // Walk from the middle so the copier meets the workers' faults. Every
                // fourth page is left to the handler, so it serves faults however the
                // scheduler orders the threads (a loaded machine may run the copier first).
                for i in 0..pages {
                    let page = (i + pages / 2) % pages;
                    if page % 4 != 0 && place(&uffd, base, &source, ps, page) {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let expected = expected.clone();
                std::thread::spawn(move || {
                    let mut x = (w as u64 + 1) * 0x9E37_79B9 + bounce as u64;
                    for _ in 0..OPS_PER_BOUNCE {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let page = (x % pages as u64) as usize;
                        let at = base + page * ps;
                        // SAFETY: page-aligned words inside the mapped region; faults are
                        // served by the handler or the copier.
                        let (word, counter) = unsafe {
                            (&*(at as *const AtomicU32), &*((at + 8) as *const AtomicU64))
                        };
                        lock(word);
                        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                        // Release: publishes the counter to the next lock holder.
                        word.store(0, Ordering::Release);
                        expected[page].fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker");
        }
        copier.join().expect("copier");
        // Pages the copier left and no worker touched: place them now.
        for page in (0..pages).step_by(4) {
            if place(&uffd, base, &source, ps, page) {
                lost.fetch_add(1, Ordering::Relaxed);
            }
        }
        faults += handler.handled.load(Ordering::Relaxed);
        handler.stop();
        exists += lost.load(Ordering::Relaxed);
        // Every page is present now: carry the region over.
        // SAFETY: the whole region is populated.
        src = unsafe { common::bytes(region.addr(), region.len()) }.to_vec();
    }
    for page in 0..pages {
        let at = page * ps;
        let counter = u64::from_ne_bytes(src[at + 8..at + 16].try_into().expect("8 bytes"));
        assert_eq!(
            counter,
            expected[page].load(Ordering::Relaxed),
            "{kind:?}: counter of page {page} after {BOUNCES} bounces"
        );
        assert_eq!(
            src[at..at + 4],
            [0, 0, 0, 0],
            "{kind:?}: lock of page {page} released"
        );
        assert_eq!(
            src[at + 64..at + ps],
            src_tails[at + 64..at + ps],
            "{kind:?}: page {page} content"
        );
    }
    (faults, exists)
}

#[test]
fn racing_copier_and_handler_keep_every_counter_intact() {
    for kind in common::kinds("racing_copier_and_handler_keep_every_counter_intact") {
        let pages = if kind.is_hugetlb() { 8 } else { 256 };
        let (faults, exists) = bounce_all(kind, pages);
        eprintln!("{kind:?}: {faults} faults handled, {exists} placements lost the race (Exists)");
        assert!(faults > 0, "{kind:?}: the handler served faults");
    }
}
