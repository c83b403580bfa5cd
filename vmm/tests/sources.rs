//! Lazy restores from the other sources an embedder has: a page server (the one `uffdkit
//! serve` runs, over loopback TCP) and a chunked image in an object store (a local
//! directory store). The vCPU state comes from the snapshot's `vm.json`; only memory
//! travels. Checked by the guest's checksum, as in `restore.rs`.

use crate::common;

use std::sync::Arc;

use chunked::{push, Image, PushOptions, SourceOptions, StoreOptions};
use common::{
    boot_and_snapshot, checksum_programs, fill_programs, kvm_available, pager_page, run_checked,
    SnapshotDir, SETTLE,
};
use pager::{Fetched, FileSource, PageState, Source, SourceError};
use postcopy::client::RemoteSource;
use postcopy::server::PageServer;
use postcopy::Timing;
use transport::Key;
use vmm::snapshot::MEMORY_FILE;
use vmm::{GuestModel, Lazy, Vm, VmConfig};

/// Restores the snapshot in `dir` (of `model`) with memory from `source`, checks the
/// checksum and that every data page was placed, then lets the guest write on.
fn restore_from_matches(
    config: VmConfig,
    dir: &SnapshotDir,
    mut model: GuestModel,
    source: Arc<dyn Source>,
) {
    let mut vm =
        Vm::restore_from(dir.path(), config.clone(), source, Lazy::DEMAND).expect("restore");
    run_checked(&mut vm, &mut model, &checksum_programs(&config));
    let pager = vm.pager().expect("the pager");
    for page in 0..config.data_pages() {
        assert_eq!(
            pager.wait_placed(pager_page(&config, page), SETTLE),
            Some(PageState::Received),
            "data page {page} was placed"
        );
    }
    run_checked(&mut vm, &mut model, &fill_programs(&config, 1));
    let stats = vm.take_pager().expect("the pager").stop().expect("stop");
    assert_eq!(stats.source_errors, 0, "{stats:?}");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn lazy_restore_from_a_page_server_matches_checksum() {
    let test = "lazy_restore_from_a_page_server_matches_checksum";
    if !kvm_available(test) {
        return;
    }
    let config = VmConfig {
        vcpus: 2,
        ..VmConfig::new(8)
    };
    let dir = SnapshotDir::new(test);
    // The server opens the memory file when bound: snapshot first.
    let model = boot_and_snapshot(&config, &dir);
    let key = || Key::new(*b"uffdkit-vmm-test-key-0123").expect("key");
    let image = Arc::new(FileSource::pread(dir.path().join(MEMORY_FILE)).expect("image"));
    let addr = "127.0.0.1:0".parse().expect("addr");
    let server = PageServer::bind(&addr, image, key(), Timing::default()).expect("bind");
    let source = RemoteSource::connect(&server.local_addr().expect("addr"), key()).expect("dial");
    restore_from_matches(config, &dir, model, Arc::new(source));
    assert!(server.stats().pages_sent > 0, "{:?}", server.stats());
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn lazy_restore_from_a_chunked_image_matches_checksum() {
    let test = "lazy_restore_from_a_chunked_image_matches_checksum";
    if !kvm_available(test) {
        return;
    }
    let config = VmConfig {
        vcpus: 2,
        ..VmConfig::new(8)
    };
    let dir = SnapshotDir::new(test);
    let store = SnapshotDir::new(&format!("{test}-store"));
    let model = boot_and_snapshot(&config, &dir);
    let url = format!("file://{}/vm", store.path().display());
    push(&dir.path().join(MEMORY_FILE), &url, &PushOptions::default()).expect("push");
    let image = Image::open(&url, &StoreOptions::default()).expect("open image");
    let source = image
        .source(None, SourceOptions::default())
        .expect("chunked source");
    restore_from_matches(config, &dir, model, Arc::new(source));
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn restore_from_refuses_a_source_smaller_than_guest_memory() {
    let test = "restore_from_refuses_a_source_smaller_than_guest_memory";
    if !kvm_available(test) {
        return;
    }
    let config = VmConfig::new(4);
    let dir = SnapshotDir::new(test);
    boot_and_snapshot(&config, &dir);
    let short = Arc::new(pager::MemorySource::new(vec![0u8; 1 << 20]));
    let err = Vm::restore_from(dir.path(), config, short, Lazy::DEMAND).err();
    assert!(matches!(err, Some(vmm::Error::Mismatch(_))), "{err:?}");
}

/// The memory file, failing every read at or above the data pages: a source that broke
/// while the guest ran. Signal-safe if the file source is (its error allocates nothing).
struct FailingAboveCode(FileSource);

impl Source for FailingAboveCode {
    fn len(&self) -> u64 {
        self.0.len()
    }

    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        if offset + scratch.len() as u64 > vmm::guest::DATA_GPA {
            return Err(SourceError {
                what: "read the test's failing image",
                offset,
                source: std::io::Error::from_raw_os_error(5), // EIO,
            });
        }
        self.0.fetch(offset, scratch)
    }

    fn signal_safe(&self) -> Option<pager::SignalSafe> {
        // Its error is built without allocating; otherwise the file source's fetch.
        self.0.signal_safe()
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn a_source_failing_under_a_running_guest_ends_the_run_with_the_pagers_error() {
    let test = "a_source_failing_under_a_running_guest_ends_the_run_with_the_pagers_error";
    if !kvm_available(test) {
        return;
    }
    let config = VmConfig::new(4);
    let dir = SnapshotDir::new(test);
    boot_and_snapshot(&config, &dir);
    let image = FileSource::pread(dir.path().join(MEMORY_FILE)).expect("image");
    let source = Arc::new(FailingAboveCode(image));
    let mut vm =
        Vm::restore_from(dir.path(), config.clone(), source, Lazy::DEMAND).expect("restore");
    let err = vm.run(&checksum_programs(&config)).err();
    assert!(
        matches!(err, Some(vmm::Error::Pager(pager::Error::Source(ref e))) if e.offset >= vmm::guest::DATA_GPA),
        "{err:?}"
    );
}

/// SIGBUS mode, the vCPU thread completing the guest's reads itself: once the source
/// fails, the pager poisons the data pages and the vCPU thread's own read of one raises a
/// SIGBUS in that thread (as KVM's access to it would on a host where KVM maps guest
/// memory itself). The run ends with the pager's error; the process lives on, and a run
/// again meets the poison again, and ends with an error again.
#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn a_poisoned_page_read_by_the_vcpu_thread_ends_the_run_with_the_pagers_error_not_the_process() {
    let test = "a_poisoned_page_read_by_the_vcpu_thread_ends_the_run_with_the_pagers_error_not_the_process";
    // One SIGBUS-mode pager per process: this test runs in a process of its own.
    if !kvm_available(test) || !testkit::isolated(test, std::time::Duration::from_secs(120)) {
        return;
    }
    for vcpus in [1, 2] {
        let config = VmConfig {
            vcpus,
            ..VmConfig::new(4)
        };
        let dir = SnapshotDir::new(&format!("{test}-{vcpus}"));
        boot_and_snapshot(&config, &dir);
        let image = FileSource::mmap(dir.path().join(MEMORY_FILE)).expect("image");
        let source = Arc::new(FailingAboveCode(image));
        let lazy = Lazy {
            mode: pager::DeliveryMode::Sigbus,
            in_thread: true,
            ..Lazy::DEMAND
        };
        let mut vm = Vm::restore_from(dir.path(), config.clone(), source, lazy).expect("restore");
        let err = vm.run(&checksum_programs(&config)).err();
        assert!(
            matches!(err, Some(vmm::Error::Pager(pager::Error::Source(ref e))) if e.offset >= vmm::guest::DATA_GPA),
            "{vcpus} vCPUs: {err:?}"
        );
        // The guest retries its read of a page now poisoned: another SIGBUS in the vCPU
        // thread, the pager's error again.
        let again = vm.run(&checksum_programs(&config)).err();
        assert!(
            matches!(again, Some(vmm::Error::Pager(pager::Error::Source(_)))),
            "{vcpus} vCPUs, again: {again:?}"
        );
    }
}
