//! What an embedder (a VMM) uses of the pager beyond serving faults: the kernel-fault
//! user mode it must ask for, and the pager's account of a page it saw touched.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::{
    DeliveryMode, Features, Mapping, MemoryKind, MemorySource, PageState, Pager, Uffd, UserMode,
};

const PS: usize = 4096;

/// A uffd that serves faults taken in kernel mode (KVM's, a `read(2)` into guest memory),
/// or fails to open: never a user-mode-only one that would fail those faults.
fn kernel_faults_uffd() -> Uffd {
    let uffd = Uffd::builder()
        .non_blocking(true)
        .user_mode(UserMode::KernelFaults)
        .require(Features::EVENT_REMOVE)
        .open()
        .expect("a uffd for kernel-mode faults (run as root or with vm.unprivileged_userfaultfd)");
    assert!(!uffd.user_mode_only());
    uffd
}

#[test]
fn wait_placed_reports_a_touched_page_received_and_an_untouched_one_missing_at_its_bound() {
    let pages = 16;
    let image: Vec<u8> = (0..pages * PS).map(|i| (i / PS) as u8 + 1).collect();
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(kernel_faults_uffd(), Arc::new(MemorySource::new(image)))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    // A kernel-mode fault: the pager resolves it like any other.
    let addr = memory.addr();
    let touched = std::thread::spawn(move || {
        // SAFETY: inside the served mapping, which the pager keeps alive.
        unsafe { std::ptr::read_volatile((addr + 3 * PS) as *const u8) }
    })
    .join()
    .expect("the touching thread");
    assert_eq!(touched, 4);
    assert_eq!(
        pager.wait_placed(3, Duration::from_secs(10)),
        Some(PageState::Received),
        "a page whose touch returned is reported placed"
    );

    let bound = Duration::from_millis(50);
    let began = Instant::now();
    assert_eq!(pager.wait_placed(7, bound), Some(PageState::Missing));
    assert!(
        began.elapsed() >= bound,
        "an untouched page waits out the bound"
    );
    assert_eq!(pager.wait_placed(pages, bound), None, "beyond the end");

    let stats = pager.stop().expect("stop");
    assert_eq!(stats.placed_fault, 1, "{stats:?}");
}
