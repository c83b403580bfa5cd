//! Real threads hammering overlapping pages: no request is granted twice, no update lost.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use page_state::{PageState, PageStateMap, RequestOutcome};

const PAGES: usize = 200;
const THREADS: usize = 4;
const RUN_FOR: Duration = Duration::from_secs(2);

#[derive(Default)]
struct PageLog {
    granted: AtomicU32,
    received: AtomicU32,
    zeroed_from_received: AtomicU32,
}

/// Runs THREADS threads for RUN_FOR, each applying `op` to pseudo-random pages of one
/// shared map (`x` is the thread's random word). Returns the map, the per-page logs, and
/// the operations done.
fn hammer(
    seed: u64,
    op: fn(&PageStateMap, &PageLog, usize, u64),
) -> (Arc<PageStateMap>, Arc<Vec<PageLog>>, u64) {
    let map = Arc::new(PageStateMap::new(PAGES));
    let logs: Arc<Vec<PageLog>> = Arc::new((0..PAGES).map(|_| PageLog::default()).collect());
    let start = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (map, logs) = (map.clone(), logs.clone());
            std::thread::spawn(move || {
                let mut x = seed ^ (t as u64 + 1);
                let mut ops = 0u64;
                while start.elapsed() < RUN_FOR {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = (x >> 8) as usize % PAGES;
                    op(&map, &logs[page], page, x);
                    ops += 1;
                }
                ops
            })
        })
        .collect();
    let ops = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    (map, logs, ops)
}

#[test]
fn concurrent_transitions_grant_each_request_once_and_lose_no_update() {
    // Relaxed counters: only read after join(), which synchronises.
    let (map, logs, ops) = hammer(0x2545_F491_4F6C_DD1D, |map, log, page, x| match x % 8 {
        0..=3 => {
            if map.request(page) == Ok(RequestOutcome::Requested) {
                log.granted.fetch_add(1, Ordering::Relaxed);
            }
        }
        4 | 5 => {
            if map.mark_received(page).is_ok() {
                log.received.fetch_add(1, Ordering::Relaxed);
            }
        }
        6 => {
            if map.mark_zero(page) == Ok(PageState::Received) {
                log.zeroed_from_received.fetch_add(1, Ordering::Relaxed);
            }
        }
        _ => {
            let lo = page & !31;
            let _ = map.mark_zero_range(lo, (lo + 40).min(PAGES));
        }
    });
    assert!(ops > 10_000, "only {ops} operations ran");

    for (page, state) in map.states().enumerate() {
        let log = &logs[page];
        let granted = log.granted.load(Ordering::Relaxed);
        assert!(granted <= 1, "page {page}: request granted {granted} times");
        if state == PageState::Missing {
            assert_eq!(granted, 0, "page {page}: missing after a granted request");
        }
        if state == PageState::Requested {
            assert_eq!(granted, 1, "page {page}: requested without a grant");
        }
    }
    let total: usize = PageState::ALL.iter().map(|&s| map.count(s)).sum();
    assert_eq!(total, PAGES, "counts add up");
    // Range zeroing also takes pages out of Received, so per-page receive accounting is
    // checked in a second phase without it.
}

#[test]
fn concurrent_receive_and_zero_account_for_every_received_state() {
    let (map, logs, _) = hammer(0x9E37_79B9_7F4A_7C15, |map, log, page, x| {
        if x % 2 == 0 {
            if map.mark_received(page).is_ok() {
                log.received.fetch_add(1, Ordering::Relaxed);
            }
        } else if map.mark_zero(page) == Ok(PageState::Received) {
            log.zeroed_from_received.fetch_add(1, Ordering::Relaxed);
        }
    });
    for (page, state) in map.states().enumerate() {
        let log = &logs[page];
        let (r, z) = (
            log.received.load(Ordering::Relaxed),
            log.zeroed_from_received.load(Ordering::Relaxed),
        );
        let expect_received = u32::from(state == PageState::Received);
        assert_eq!(
            r - z,
            expect_received,
            "page {page} ({state}): {r} receives, {z} zeroings"
        );
    }
}
