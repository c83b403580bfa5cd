//! A fault on a page the background prefetcher claimed, while the prefetcher cannot run
//! (preempted on a loaded machine, its pacer starved), takes over the prefetcher's whole
//! in-flight run: one stall, not one per page of the run (the handler's scratch holds a
//! run with readahead or fault-around on).

use crate::common;

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use pager::{DeliveryMode, Fetched, Mapping, MemoryKind, MemorySource, Pager, Prefetch};
use pager::{Source, SourceError};

const PS: usize = 4096;
/// The prefetcher's run (256 KiB of 4 KiB pages).
const RUN: usize = 64;

/// A source whose reads by the prefetch thread wait until released (the first one says
/// it began): a prefetcher holding its claimed run and unable to place it.
struct HeldByPrefetcher {
    inner: MemorySource,
    began: Mutex<Option<mpsc::Sender<()>>>,
    released: (Mutex<bool>, Condvar),
}

impl HeldByPrefetcher {
    fn release(&self) {
        *self.released.0.lock().expect("lock") = true;
        self.released.1.notify_all();
    }
}

impl Source for HeldByPrefetcher {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        if std::thread::current().name() == Some("uffd-prefetch") {
            if let Some(began) = self.began.lock().expect("lock").take() {
                let _ = began.send(());
            }
            let mut released = self.released.0.lock().expect("lock");
            while !*released {
                released = self.released.1.wait(released).expect("wait");
            }
        }
        self.inner.fetch(offset, scratch)
    }
}

#[test]
fn a_fault_on_a_run_the_stalled_prefetcher_holds_takes_over_the_whole_run() {
    let pages = 4 * RUN;
    let image = common::image(pages, PS, 0);
    let (began, prefetching) = mpsc::channel();
    let source = Arc::new(HeldByPrefetcher {
        inner: MemorySource::new(image.clone()),
        began: Mutex::new(Some(began)),
        released: (Mutex::new(false), Condvar::new()),
    });
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), source.clone())
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .prefetch(Prefetch::Sequential)
        // As `uffdkit` runs it: the handler's scratch then holds a whole run.
        .readahead(true)
        .start()
        .expect("start");
    // The prefetcher claimed its first run (pages 0..RUN, from the cursor at 0) and is
    // stuck reading it. (Its pacer runs at SCHED_IDLE: a loaded machine may take a while.)
    prefetching
        .recv_timeout(Duration::from_secs(120))
        .expect("the prefetcher starts its first run");
    for page in 0..RUN {
        // SAFETY: the pager's mapping, `pages` pages long.
        let byte = unsafe { std::ptr::read_volatile(memory.as_ptr().add(page * PS)) };
        assert_eq!(byte, image[page * PS], "page {page}");
    }
    let faults = pager.stats().faults();
    source.release();
    let stats = pager.stop().expect("stop");
    assert_eq!(
        faults, 1,
        "the first fault took over the whole held run (one fault per page before)"
    );
    assert!(stats.placed_fault >= RUN as u64, "{stats:?}");
}
