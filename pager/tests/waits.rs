//! Waits on a page in flight sleep until it lands: the prefetcher of a remote source,
//! which asks for a run and waits for its first page before asking for the next (it
//! polled every 200 µs, 5 % of a CPU for as long as a run was in flight). A forked
//! child's wait on its parent's page is `fork_shared.rs`'s.

use crate::common;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pager::{
    DeliveryMode, Fetched, Mapping, MemoryKind, Pager, Placer, Prefetch, Source, SourceError,
};

const PS: usize = 4096;
const PAGES: usize = 1024;
const WATCHDOG: Duration = Duration::from_secs(120);
const HOLD: Duration = Duration::from_secs(1);

/// A remote source that answers every fetch later, when the test places its pages.
struct Later {
    asked: AtomicU64,
    placer: Mutex<Option<Placer>>,
}

impl Source for Later {
    fn len(&self) -> u64 {
        (PAGES * PS) as u64
    }
    fn fetch<'a>(&'a self, _: u64, _: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        self.asked.fetch_add(1, SeqCst);
        Ok(Fetched::Pending)
    }
    fn attach(&self, placer: Placer) {
        *self.placer.lock().expect("placer") = Some(placer);
    }
}

/// CPU time this process has used (every thread).
fn cpu_time() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
    };
    t(usage.user_time()) + t(usage.system_time())
}

fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_prefetcher_waiting_on_a_remote_run_sleeps_until_its_page_lands() {
    let name = "waits::a_prefetcher_waiting_on_a_remote_run_sleeps_until_its_page_lands";
    if !testkit::isolated(name, WATCHDOG) {
        return;
    }
    let source = Arc::new(Later {
        asked: AtomicU64::new(0),
        placer: Mutex::new(None),
    });
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, PAGES * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), source.clone())
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .prefetch(Prefetch::Eager)
        .start()
        .expect("start");
    until("the prefetcher asks for its first run", || {
        source.asked.load(SeqCst) == 1
    });
    let cpu0 = cpu_time();
    std::thread::sleep(HOLD);
    let cpu = cpu_time().saturating_sub(cpu0);
    assert_eq!(source.asked.load(SeqCst), 1, "one run in flight at a time");
    assert!(
        cpu < HOLD / 100,
        "the process burnt {cpu:?} of CPU in {HOLD:?} with one run in flight"
    );
    // The run's first page lands: the prefetcher goes on to the next run at once.
    let placer = source
        .placer
        .lock()
        .expect("placer")
        .clone()
        .expect("attached");
    let image = common::image(1, PS, 0);
    placer.place(0, Some(&image)).expect("place");
    until("the prefetcher asks for its next run", || {
        source.asked.load(SeqCst) >= 2
    });
    drop(pager);
}
