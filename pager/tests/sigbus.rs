//! SIGBUS delivery: faults resolved inside the faulting thread. Its own test binary:
//! the SIGBUS disposition is process-wide.

mod common;

use std::sync::Arc;

use pager::{DeliveryMode, MemorySource, Pager, RegionSpec, ZeroSource};
use uffd_core::{Features, Mapping, MemoryKind, ReadStatus, Uffd};

const PS: usize = 4096;

fn sigbus_uffd() -> Uffd {
    Uffd::builder()
        .non_blocking(true)
        .require(Features::SIGBUS | Features::EVENT_REMOVE)
        .open()
        .expect("open")
}

/// One SIGBUS-mode pager per process: the tests that start one take turns.
static SIGBUS_SLOT: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn sigbus_mode_serves_every_page_in_the_faulting_threads() {
    let _turn = SIGBUS_SLOT.lock().unwrap_or_else(|p| p.into_inner());
    let pages = 512;
    let image = common::image(pages, PS, 7);
    for kind in [MemoryKind::Anon, MemoryKind::Shmem] {
        let memory = Mapping::new(kind, pages * PS).expect("map");
        let pager = Pager::builder(
            sigbus_uffd(),
            Arc::new(MemorySource::new(image.clone()).with_zero_scan(PS)),
        )
        .region(RegionSpec::new(memory.addr(), memory.len(), kind, 0))
        .mode(DeliveryMode::Sigbus);
        let pager = pager.start().expect("start");
        let addr = memory.addr();
        let image = Arc::new(image.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let image = image.clone();
                std::thread::spawn(move || {
                    for i in 0..pages {
                        let page = (i + t * 97) % pages;
                        // SAFETY: the served region.
                        let got = unsafe { common::bytes(addr + page * PS, PS) };
                        assert_eq!(got, &image[page * PS..(page + 1) * PS], "page {page}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("worker");
        }
        // No fault reached the uffd as an event.
        let mut buf = uffd_core::EventBuffer::new(4);
        assert_eq!(
            pager.uffd().read_events(&mut buf).expect("read"),
            ReadStatus::WouldBlock
        );
        let stats = pager.stop().expect("stop");
        assert_eq!(stats.placed(), pages as u64, "{kind:?}: {stats:?}");
        assert_eq!(stats.placed_zero, (pages / 7) as u64);
        assert!(
            stats.latency.iter().sum::<u64>() >= pages as u64,
            "latency recorded per fault"
        );
    }
}

#[test]
fn sigbus_mode_refuses_a_uffd_without_the_feature_or_an_unsafe_source() {
    let memory = Mapping::new(MemoryKind::Anon, 4 * PS).expect("map");
    let spec = RegionSpec::new(memory.addr(), memory.len(), MemoryKind::Anon, 0);
    let plain = Uffd::builder().non_blocking(true).open().expect("open");
    let err = Pager::builder(plain, Arc::new(ZeroSource::new(4 * PS as u64)))
        .region(spec)
        .mode(DeliveryMode::Sigbus)
        .start()
        .err()
        .expect("no SIGBUS feature");
    assert!(err.to_string().contains("SIGBUS feature"), "{err}");
    let path = std::env::temp_dir().join(format!("uffdkit-sigbus-{}", std::process::id()));
    std::fs::write(&path, vec![1u8; 4 * PS]).expect("write");
    let pread = pager::FileSource::pread(&path).expect("open");
    std::fs::remove_file(&path).ok();
    let err = Pager::builder(sigbus_uffd(), Arc::new(pread))
        .region(spec)
        .mode(DeliveryMode::Sigbus)
        .start()
        .err()
        .expect("pread is not signal safe");
    assert!(err.to_string().contains("signal handler"), "{err}");
}

#[test]
fn sigbus_mode_records_the_first_fault_order() {
    let _turn = SIGBUS_SLOT.lock().unwrap_or_else(|p| p.into_inner());
    let pages = 64;
    let memory = Mapping::new(MemoryKind::Anon, pages * PS).expect("map");
    let path = std::env::temp_dir().join(format!("uffdkit-sigbus-ws-{}", std::process::id()));
    let pager = Pager::builder(
        sigbus_uffd(),
        Arc::new(MemorySource::new(common::image(pages, PS, 0))),
    )
    .region(RegionSpec::new(
        memory.addr(),
        memory.len(),
        MemoryKind::Anon,
        0,
    ))
    .mode(DeliveryMode::Sigbus)
    .record(&path)
    .start()
    .expect("start");
    let order = [5usize, 9, 1, 40];
    for &p in &order {
        // SAFETY: the served region.
        unsafe { std::ptr::read_volatile(memory.page_addr(p) as *const u8) };
    }
    pager.stop().expect("stop");
    let recorded = pager::record::load(&path, pages).expect("load working set");
    std::fs::remove_file(&path).ok();
    assert_eq!(recorded, order.map(|p| p as u64));
}
