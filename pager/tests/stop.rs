//! Stopping a pager with faults pending. In a process of its own (`testkit::isolated`), so
//! that counting this process's threads is not disturbed by other tests.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::{DeliveryMode, Fetched, Pager, Source, SourceError};
use uffd_core::{Mapping, MemoryKind};

const PS: usize = 4096;

#[test]
fn stopping_with_faults_pending_returns_and_leaks_no_thread() {
    const NAME: &str = "stopping_with_faults_pending_returns_and_leaks_no_thread";
    if !testkit::isolated(NAME, Duration::from_secs(60)) {
        return;
    }
    let threads_before = std::fs::read_dir("/proc/self/task").expect("tasks").count();
    // A remote source that never answers.
    struct Silent;
    impl Source for Silent {
        fn len(&self) -> u64 {
            1 << 20
        }
        fn fetch<'a>(&'a self, _: u64, _: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
            Ok(Fetched::Pending)
        }
    }
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, 16 * PS).expect("map"));
    let pager = Pager::builder(common::uffd(), Arc::new(Silent))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::PerCpu)
        .start()
        .expect("start");
    let addr = memory.addr();
    // SAFETY: served region; this read waits on a page that never arrives.
    let stuck = std::thread::spawn(move || unsafe { std::ptr::read_volatile(addr as *const u8) });
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    let stats = pager.stop().expect("stop");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "stop took {:?}",
        t.elapsed()
    );
    assert_eq!(stats.faults(), 1);
    // The pager held the last reference to the uffd: closing it released the reader.
    assert_eq!(stuck.join().expect("reader released"), 0);
    let threads_after = std::fs::read_dir("/proc/self/task").expect("tasks").count();
    assert!(
        threads_after <= threads_before,
        "{threads_before} threads before, {threads_after} after"
    );
}
