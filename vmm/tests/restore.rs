//! A real guest under real KVM, snapshotted and restored eagerly and lazily through the
//! pager (real userfaultfd): the guest's own checksum must match the model's, before and
//! after, and keep matching as the restored guest writes on.

use crate::common;

use std::time::Duration;

use common::{
    boot_and_snapshot, checksum_programs, fill_programs, kvm_available, pager_page, run_checked,
    share, SnapshotDir, SETTLE,
};
use pager::{DeliveryMode, MemoryKind, PageState, Prefetch};
use vmm::guest::CODE_GPA;
use vmm::{Command, Error, GuestModel, Lazy, Restore, Vm, VmConfig};

/// Restores lazily, checks nothing was placed before the first `KVM_RUN`, that the
/// checksum matches, that every data page was placed by a fault from KVM_RUN, and that the
/// guest then writes on and snapshots again.
/// (With a prefetcher, pages may be placed before the guest runs, and all of them before
/// it faults: those two checks are left out.)
fn lazy_restore_matches(test: &str, config: VmConfig, lazy: Lazy) {
    let dir = SnapshotDir::new(test);
    let mut model = boot_and_snapshot(&config, &dir);
    let demand_only = lazy.prefetch == Prefetch::None;

    let how = Restore::Lazy(lazy);
    let mut vm = Vm::restore(dir.path(), config.clone(), how.clone()).expect("restore");
    let pager = vm.pager().expect("a lazy restore has a pager");
    if demand_only {
        assert_eq!(
            pager.states().count(PageState::Missing),
            pager.states().len(),
            "nothing is placed before the guest runs"
        );
    }
    run_checked(&mut vm, &mut model, &checksum_programs(&config));
    let pager = vm.pager().expect("still there");
    for page in 0..config.data_pages() {
        assert_eq!(
            pager.wait_placed(pager_page(&config, page), SETTLE),
            Some(PageState::Received),
            "data page {page} was placed"
        );
    }
    let stats = pager.stats();
    assert!(
        !demand_only || (stats.faults_missing > 0 && stats.placed_fault > 0),
        "the pages came by faults: {stats:?}"
    );

    // The restored guest writes on, and a snapshot of it restores too.
    run_checked(&mut vm, &mut model, &fill_programs(&config, 1));
    let again = SnapshotDir::new(&format!("{test}-again"));
    vm.snapshot(again.path())
        .expect("snapshot the restored guest");
    let stats = vm
        .take_pager()
        .expect("the pager")
        .stop()
        .expect("stop the pager");
    assert_eq!(stats.source_errors, 0);
    let mut vm = Vm::restore(again.path(), config.clone(), how).expect("restore");
    run_checked(&mut vm, &mut model, &checksum_programs(&config));
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn booted_guest_checksums_match_the_model() {
    if !kvm_available("booted_guest_checksums_match_the_model") {
        return;
    }
    for vcpus in [1, 2] {
        let config = VmConfig {
            vcpus,
            ..VmConfig::new(4)
        };
        let mut vm = Vm::boot(config.clone()).expect("boot");
        let mut model = GuestModel::new(config.data_pages());
        run_checked(&mut vm, &mut model, &fill_programs(&config, 0));
        run_checked(&mut vm, &mut model, &fill_programs(&config, 1));
    }
}

#[test]
fn model_sees_a_changed_page() {
    // The check the tests lean on can fail: one rewritten page changes the checksum.
    let mut model = GuestModel::new(64);
    let fill = Command::Fill {
        first: 0,
        pages: 64,
        seed: 1,
        stride: 1,
    };
    model.apply(fill);
    let before = model.checksum(0, 64);
    model.apply(Command::Fill {
        first: 40,
        pages: 1,
        seed: 2,
        stride: 1,
    });
    assert_ne!(model.checksum(0, 64), before);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn lazy_restore_one_vcpu_matches_checksum() {
    let test = "lazy_restore_one_vcpu_matches_checksum";
    if kvm_available(test) {
        lazy_restore_matches(test, VmConfig::new(8), Lazy::DEMAND);
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn lazy_restore_two_vcpus_matches_checksum() {
    let test = "lazy_restore_two_vcpus_matches_checksum";
    if kvm_available(test) {
        let config = VmConfig {
            vcpus: 2,
            ..VmConfig::new(8)
        };
        lazy_restore_matches(test, config, Lazy::DEMAND);
    }
}

#[test]
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn lazy_restore_into_hugetlb_matches_checksum() {
    let test = "lazy_restore_into_hugetlb_matches_checksum";
    // Two VMs at a time at most (the restored one and the one restored from it), 4 pages each.
    if kvm_available(test) && testkit::hugepages::available(test, 8) {
        let config = VmConfig {
            kind: MemoryKind::Hugetlb,
            vcpus: 2,
            ..VmConfig::new(8)
        };
        lazy_restore_matches(test, config, Lazy::DEMAND);
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn lazy_restore_with_readahead_matches_checksum() {
    let test = "lazy_restore_with_readahead_matches_checksum";
    if kvm_available(test) {
        let lazy = Lazy {
            readahead: true,
            ..Lazy::DEMAND
        };
        lazy_restore_matches(test, VmConfig::new(8), lazy);
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn lazy_restore_with_sequential_prefetch_matches_checksum() {
    let test = "lazy_restore_with_sequential_prefetch_matches_checksum";
    if kvm_available(test) {
        let config = VmConfig {
            vcpus: 2,
            ..VmConfig::new(8)
        };
        let lazy = Lazy {
            readahead: true,
            prefetch: Prefetch::Sequential,
            ..Lazy::DEMAND
        };
        lazy_restore_matches(test, config, lazy);
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn eager_restore_matches_checksum() {
    let test = "eager_restore_matches_checksum";
    if !kvm_available(test) {
        return;
    }
    let config = VmConfig::new(8);
    let dir = SnapshotDir::new(test);
    let mut model = boot_and_snapshot(&config, &dir);
    let mut vm = Vm::restore(dir.path(), config.clone(), Restore::Eager).expect("restore");
    assert!(vm.pager().is_none());
    run_checked(&mut vm, &mut model, &checksum_programs(&config));
    run_checked(&mut vm, &mut model, &fill_programs(&config, 1));
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn restore_refuses_a_snapshot_of_another_size() {
    let test = "restore_refuses_a_snapshot_of_another_size";
    if !kvm_available(test) {
        return;
    }
    let dir = SnapshotDir::new(test);
    boot_and_snapshot(&VmConfig::new(4), &dir);
    let err = Vm::restore(dir.path(), VmConfig::new(8), Restore::LAZY).err();
    assert!(matches!(err, Some(Error::Mismatch(_))), "{err:?}");
}

/// What a SIGBUS-mode restore did on this host, for the log.
fn sigbus_outcome(config: &VmConfig, vm: &mut Vm, model: &GuestModel) -> String {
    let programs = checksum_programs(config);
    let missing = |vm: &Vm, gpa: u64| {
        let page = (gpa / config.kind.page_size() as u64) as usize;
        vm.pager().expect("the pager").states().get(page) == Some(PageState::Missing)
    };
    match vm.run(&programs) {
        Ok(reports) => {
            let (first, pages) = share(config, 0);
            assert_eq!(reports[0].results, [model.checksum(first, pages)]);
            "the guest ran: KVM faulted the pages in through the signal handler".into()
        }
        Err(e @ (Error::MmioRead { gpa, .. } | Error::MemoryFault { gpa, .. })) => {
            assert!(gpa < config.memory_len() as u64, "{e}: inside guest memory");
            assert!(missing(vm, gpa), "{e}: at a page never placed");
            e.to_string()
        }
        // An emulation failure: the emulator could not fetch the instruction.
        Err(e @ Error::Internal { suberror: 1, .. }) => {
            assert!(missing(vm, CODE_GPA), "{e}: the code page was never placed");
            e.to_string()
        }
        Err(e) => panic!("SIGBUS restore: {e}"),
    }
}

/// The SIGBUS path: the vCPU thread would resolve its own fault. What KVM does with a
/// SIGBUS-registered page touched from `KVM_RUN` depends on the host (the nested host here
/// turns a read by emulated guest code into an MMIO exit). Either the guest's checksum is
/// right, or KVM says it could not reach a page the pager never placed — never a wrong
/// checksum. Once for an instruction fetch (nothing placed), once for a data read (the code
/// page placed first by the VMM thread's own touch, through the pager's signal handler).
#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn sigbus_restore_serves_the_guest_or_reports_the_unreached_page() {
    let test = "sigbus_restore_serves_the_guest_or_reports_the_unreached_page";
    // One SIGBUS-mode pager per process: this test runs in a process of its own.
    if !kvm_available(test) || !testkit::isolated(test, Duration::from_secs(120)) {
        return;
    }
    let config = VmConfig::new(4);
    let dir = SnapshotDir::new(test);
    let mut model = boot_and_snapshot(&config, &dir);
    let how = Restore::Lazy(Lazy {
        mode: DeliveryMode::Sigbus,
        in_thread: false,
        ..Lazy::DEMAND
    });
    let mut vm = Vm::restore(dir.path(), config.clone(), how.clone()).expect("restore");
    eprintln!(
        "SIGBUS restore, code fetch: {}",
        sigbus_outcome(&config, &mut vm, &model)
    );
    drop(vm);

    let mut vm = Vm::restore(dir.path(), config.clone(), how.clone()).expect("restore");
    // SAFETY: the guest memory mapping is live and no vCPU runs; the read faults and the
    // pager's SIGBUS handler places the page in this thread.
    let code = unsafe { std::ptr::read_volatile(vm.memory().as_ptr().add(CODE_GPA as usize)) };
    assert_eq!(code, vmm::guest::CODE[0]);
    eprintln!(
        "SIGBUS restore, data read: {}",
        sigbus_outcome(&config, &mut vm, &model)
    );
    drop(vm);

    // Whatever happened, the memory file restores with the handler thread.
    let mut vm = Vm::restore(dir.path(), config.clone(), Restore::LAZY).expect("restore");
    run_checked(&mut vm, &mut model, &checksum_programs(&config));
}

/// SIGBUS mode with the vCPU thread resolving what KVM could not reach (memory-fault exits
/// where the kernel gives them; here, MMIO exits and failed fetches): the guest's checksum
/// is right, every data page was placed, and the vCPU threads did resolve exits.
#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn sigbus_restore_resolved_in_the_vcpu_thread_matches_checksum() {
    let test = "sigbus_restore_resolved_in_the_vcpu_thread_matches_checksum";
    // One SIGBUS-mode pager per process: this test runs in a process of its own.
    if !kvm_available(test) || !testkit::isolated(test, Duration::from_secs(120)) {
        return;
    }
    for vcpus in [1, 2] {
        let config = VmConfig {
            vcpus,
            ..VmConfig::new(4)
        };
        let dir = SnapshotDir::new(&format!("{test}-{vcpus}"));
        let mut model = boot_and_snapshot(&config, &dir);
        let how = Restore::Lazy(Lazy {
            mode: DeliveryMode::Sigbus,
            ..Lazy::DEMAND
        });
        let mut vm = Vm::restore(dir.path(), config.clone(), how).expect("restore");
        let reports = vm.run(&checksum_programs(&config)).expect("run");
        for (index, report) in reports.iter().enumerate() {
            let (first, pages) = share(&config, index);
            assert_eq!(
                report.results,
                [model.checksum(first, pages)],
                "vCPU {index}"
            );
            assert!(report.resolved_in_thread > 0, "vCPU {index}: {report:?}");
        }
        // The code page was missing: the vCPU that fetched it first reached its first exit
        // (its first `in`) after its thread resolved that fault, not at it.
        assert!(
            reports.iter().any(|r| r.resolved_before_first_exit > 0),
            "{reports:?}"
        );
        let pager = vm.pager().expect("the pager");
        for page in 0..config.data_pages() {
            assert_eq!(
                pager.wait_placed(pager_page(&config, page), SETTLE),
                Some(PageState::Received),
                "data page {page} was placed"
            );
        }
        // Writes go through the same path (MMIO writes completed by the vCPU thread).
        run_checked(&mut vm, &mut model, &fill_programs(&config, 1));
    }
}

/// Answers the first fetch only when the test says so (and reports it asked), zeros
/// always: a pager over memory a snapshot is reading, to hold that read partway.
struct Held {
    asked: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    go: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    len: u64,
}

impl pager::Source for Held {
    fn len(&self) -> u64 {
        self.len
    }

    fn fetch<'a>(
        &'a self,
        _: u64,
        _: &'a mut [u8],
    ) -> Result<pager::Fetched<'a>, pager::SourceError> {
        if let Some(asked) = self.asked.lock().expect("lock").take() {
            asked.send(()).expect("the test waits");
            self.go
                .lock()
                .expect("lock")
                .recv()
                .expect("the test says go");
        }
        Ok(pager::Fetched::Zero)
    }
}

/// What `Vm::snapshot` reads can change while it reads it, through safe code elsewhere:
/// here `Mapping::madvise` on a clone of `Vm::memory` drops a page the snapshot has not
/// reached yet, and the snapshot holds the page's new bytes (zeros), not the guest's. So
/// the snapshot may never hold guest memory as a `&[u8]` (whose bytes must not change
/// while it lives); it copies it out, and a snapshot racing such a change is torn.
#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn guest_memory_can_change_under_a_snapshot_through_safe_code() {
    let test = "guest_memory_can_change_under_a_snapshot_through_safe_code";
    if !kvm_available(test) {
        return;
    }
    let config = VmConfig::new(4);
    let mut vm = Vm::boot(config.clone()).expect("boot");
    let mut model = GuestModel::new(config.data_pages());
    run_checked(&mut vm, &mut model, &fill_programs(&config, 0));
    let memory = vm.memory().clone();
    let page = vmm::guest::GUEST_PAGE as usize;
    let (held, changed) = (
        vmm::guest::DATA_GPA as usize,
        memory.len() - page, // the last data page, read after `held`
    );
    // SAFETY: inside the live mapping; no vCPU runs.
    let filled = (0..page)
        .any(|i| unsafe { std::ptr::read_volatile(memory.as_ptr().add(changed + i)) } != 0);
    assert!(filled, "the guest filled the page");
    memory
        .madvise(held, page, libc_dontneed())
        .expect("drop the first data page");
    let (asked_tx, asked) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let source = std::sync::Arc::new(Held {
        asked: std::sync::Mutex::new(Some(asked_tx)),
        go: std::sync::Mutex::new(go_rx),
        len: memory.len() as u64,
    });
    let uffd = pager::Uffd::builder()
        .non_blocking(true)
        .user_mode(pager::UserMode::KernelFaults)
        .open()
        .expect("uffd");
    let pager = pager::Pager::builder(uffd, source)
        .mapping(memory.clone(), 0)
        .start()
        .expect("pager");
    let dir = SnapshotDir::new(test);
    let path = dir.path().to_owned();
    let snapshot = std::thread::spawn(move || vm.snapshot(&path));
    // The snapshot's write(2) reached the dropped page and waits for it: it is reading.
    asked
        .recv_timeout(Duration::from_secs(10))
        .expect("the snapshot reads the dropped page");
    memory
        .madvise(changed, page, libc_dontneed())
        .expect("safe code drops a page the snapshot has not read yet");
    go.send(()).expect("the source waits");
    snapshot.join().expect("thread").expect("snapshot");
    let file = std::fs::read(dir.path().join(vmm::snapshot::MEMORY_FILE)).expect("read");
    assert!(
        file[changed..changed + page].iter().all(|&b| b == 0),
        "the snapshot holds the page as changed during it"
    );
    pager.stop().expect("pager");
}

/// `MADV_DONTNEED` (4 on Linux), without a libc dependency in this crate.
fn libc_dontneed() -> i32 {
    4
}
