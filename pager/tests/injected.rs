//! Failures the kernel does not produce on demand, injected (feature `fault-injection`):
//! `cargo test -p pager --features fault-injection --test injected`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::{
    DeliveryMode, Error, Fetched, Mapping, MemoryKind, Pager, Placer, Source, SourceError,
};

const PS: usize = 4096;

/// A remote source whose peer places a page only once the test lets it.
struct Held {
    image: Arc<Vec<u8>>,
    release: Arc<AtomicBool>,
}

impl Source for Held {
    fn len(&self) -> u64 {
        self.image.len() as u64
    }
    fn fetch<'a>(&'a self, _: u64, _: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        Ok(Fetched::Pending)
    }
    fn attach(&self, placer: Placer) {
        let (image, release) = (self.image.clone(), self.release.clone());
        std::thread::spawn(move || {
            while !release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = placer.place(0, Some(&image[..PS]));
        });
    }
}

/// A wake the kernel refuses (after the page arrived for a second thread waiting on it)
/// is a fatal error returned by `stop`, not a result thrown away.
#[test]
fn a_refused_wake_is_a_fatal_error_not_discarded() {
    let image = Arc::new(common::image(4, PS, 0));
    let release = Arc::new(AtomicBool::new(false));
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, 4 * PS).expect("map"));
    let pager = Pager::builder(
        common::uffd(),
        Arc::new(Held {
            image: image.clone(),
            release: release.clone(),
        }),
    )
    .mapping(memory.clone(), 0)
    .mode(DeliveryMode::Thread)
    .start()
    .expect("start");
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let addr = memory.addr();
    // SAFETY: the served region's page 0 (placed once released).
    let read = move || unsafe { std::ptr::read_volatile(addr as *const u64) };
    let first = std::thread::spawn(read);
    wait_for("the first fault", &|| pager.stats().faults_missing == 1);
    let second = std::thread::spawn(read);
    wait_for("the second fault, watching", &|| {
        pager.stats().faults_duplicate == 1
    });
    pager::inject::fail_wakes(1);
    release.store(true, Ordering::SeqCst);
    let want = u64::from_ne_bytes(image[..8].try_into().expect("8 bytes"));
    assert_eq!(first.join().expect("first reader"), want);
    assert_eq!(second.join().expect("second reader"), want);
    assert!(
        pager.wait(Some(Duration::from_secs(10))),
        "the pager stopped"
    );
    match pager.stop() {
        Err(Error::Uffd(uffd_core::Error::Os { op, .. })) => {
            assert_eq!(op, uffd_core::Op::Wake)
        }
        other => panic!("stop returned {other:?}"),
    }
}
