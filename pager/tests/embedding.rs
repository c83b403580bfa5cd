//! What an embedder (a VMM) uses of the pager beyond serving faults: the kernel-fault
//! user mode it must ask for, the pager's account of a page it saw touched, and the
//! userfaultfd a safe `mapping` needs (this process's own).

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::{
    DeliveryMode, Features, Mapping, MemoryKind, MemorySource, PageState, Pager, Uffd, UserMode,
};

use crate::common;

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

/// A `Mapping` is this process's memory, so `mapping` needs a userfaultfd that serves this
/// process: an adopted one (`Uffd::from_fd`) may serve another, and is refused. It was
/// taken: the pager registered the mapping's addresses in the other process (here a
/// forked child, which has its own copy of the mapping there) and filled them with image
/// pages — memory of that process nobody had named, which read zeros before.
#[test]
fn a_mapping_is_refused_with_a_userfaultfd_adopted_from_elsewhere() {
    let image = common::image(4, PS, 0);
    assert_ne!(image[0], 0, "the image's first byte tells it from zeros");
    // Mapped before the fork: the child has its own copy at the same address, untouched.
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, 4 * PS).expect("map"));
    let (go, wait) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let first = memory.addr();
    let (pid, uffd, _, _) = common::child_with_uffd(1, move |_| {
        let mut byte = [0u8; 1];
        let _ = (&wait).read(&mut byte);
        // SAFETY: the child's own copy of the parent's mapping, mapped since the fork.
        let got = unsafe { std::ptr::read_volatile(first as *const u8) };
        i32::from(got != 0)
    });
    let started = Pager::builder(uffd, Arc::new(MemorySource::new(image)))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start();
    (&go).write_all(b"g").expect("tell the child to read");
    let child_read_image = common::wait(pid) == 1;
    match started {
        Err(pager::Error::BadRegion { reason, .. }) => {
            assert!(reason.contains("adopted"), "{reason}");
            assert!(!child_read_image, "the child's memory untouched");
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(pager) => panic!(
            "started (the child read image data where its memory held zeros: \
             {child_read_image}); {:?}",
            pager.stop()
        ),
    }
}
