//! `UFFD_FEATURE_SIGBUS`: a fault raises SIGBUS in the faulting thread, nothing is queued.
//! Its own test binary, because the SIGBUS handler is process-wide.

mod common;

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::OnceLock;

use uffd_core::{
    CopyMode, EventBuffer, Features, Mapping, MemoryKind, ReadStatus, RegisterMode, Uffd,
};

const PS: usize = 4096;
static UFFD: OnceLock<Uffd> = OnceLock::new();
static PAGE: OnceLock<Vec<u8>> = OnceLock::new();
static HANDLER_TID: AtomicU32 = AtomicU32::new(0);
static FAULT_ADDR: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigbus(_sig: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    // SAFETY: gettid is async-signal-safe.
    HANDLER_TID.store(unsafe { libc::gettid() } as u32, Ordering::SeqCst);
    FAULT_ADDR.store(addr, Ordering::SeqCst);
    // Only atomic loads and one ioctl here: async-signal-safe.
    let (Some(uffd), Some(page)) = (UFFD.get(), PAGE.get()) else {
        // SAFETY: _exit is async-signal-safe; an unexpected SIGBUS ends the test loudly.
        unsafe { libc::_exit(99) };
    };
    // SAFETY: `addr` lies in the region the test registered with this uffd.
    if unsafe { uffd.copy(addr & !(PS - 1), page, CopyMode::empty()) }.is_err() {
        // SAFETY: as above.
        unsafe { libc::_exit(98) };
    }
}

#[test]
fn sigbus_mode_signals_the_faulting_thread_and_queues_no_event() {
    let region = Mapping::new(MemoryKind::Anon, 4 * PS).expect("map");
    let uffd = common::open(Features::SIGBUS);
    uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
        .expect("register");
    UFFD.set(uffd).expect("set once");
    PAGE.set(common::pattern(2, PS, 42)).expect("set once");
    // SAFETY: installs an SA_SIGINFO handler that only does async-signal-safe work.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        assert_eq!(libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()), 0);
    }

    let target = region.page_addr(2) + 100;
    let faulter = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions; the read faults into our SIGBUS handler.
        let tid = unsafe { libc::gettid() } as u32;
        // SAFETY: inside the registered region; resolved by the handler.
        let value = unsafe { std::ptr::read_volatile(target as *const u8) };
        (tid, value)
    });
    let (tid, value) = faulter.join().expect("faulting thread");
    assert_eq!(
        HANDLER_TID.load(Ordering::SeqCst),
        tid,
        "signal ran in the faulting thread"
    );
    assert_eq!(
        FAULT_ADDR.load(Ordering::SeqCst),
        target,
        "si_addr is the faulting address"
    );
    assert_eq!(value, common::pattern(2, PS, 42)[100], "resolved in-thread");

    let uffd = UFFD.get().expect("set");
    assert_eq!(
        uffd.read_events(&mut EventBuffer::new(4)).expect("read"),
        ReadStatus::WouldBlock,
        "SIGBUS mode queues no event"
    );
}
