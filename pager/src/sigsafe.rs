//! The few system calls the signal path needs, each async-signal-safe (POSIX
//! `signal-safety(7)`), and the thread-local flag that marks the SIGBUS handler.

use std::cell::Cell;
use std::io::IoSliceMut;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::time::TimeSpec;
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::time::{clock_nanosleep, ClockId, ClockNanosleepFlags};

thread_local! {
    // A const-initialised Cell<bool> has no destructor and no lazy initialisation: reading
    // or writing it is a plain TLS access, safe inside a signal handler.
    static IN_HANDLER: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is inside the pager's SIGBUS handler.
///
/// For allocators and debug assertions of an embedder: nothing the handler calls may
/// allocate or lock, and a global allocator can check this to prove it (the pager's own
/// tests do).
pub fn in_fault_handler() -> bool {
    IN_HANDLER.with(Cell::get)
}

/// Marks the calling thread as inside the handler until the guard drops.
pub(crate) struct HandlerScope(bool);

impl HandlerScope {
    pub fn enter() -> Self {
        Self(IN_HANDLER.with(|f| f.replace(true)))
    }
}

impl Drop for HandlerScope {
    fn drop(&mut self) {
        let previous = self.0;
        IN_HANDLER.with(|f| f.set(previous));
    }
}

/// Sleeps `d` with `clock_nanosleep(2)` (an interrupted sleep just ends early).
pub(crate) fn sleep(d: Duration) {
    let _ = clock_nanosleep(
        ClockId::CLOCK_MONOTONIC,
        ClockNanosleepFlags::empty(),
        &TimeSpec::from_duration(d),
    );
}

/// Waits a little, longer the longer we have waited (`spins` counts the calls): spin, then
/// yield, then sleep 20 µs — a 2 MiB placement takes hundreds of µs, and a SCHED_IDLE
/// prefetcher needs the CPU to finish its ioctl. Async-signal-safe: `sched_yield(2)` and
/// `clock_nanosleep(2)`.
pub(crate) fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    match *spins {
        0..=64 => std::hint::spin_loop(),
        65..=256 => {
            let _ = nix::sched::sched_yield();
        }
        _ => sleep(Duration::from_micros(20)),
    }
}

/// Copies `src` to `dst` (a MINOR region's alias: the page cache a `UFFDIO_CONTINUE` maps
/// next) as the kernel copies from user memory: a page of `src` that cannot be read (a
/// mapping of an image file truncated since) fails the placement with EFAULT instead of
/// raising SIGBUS in the calling thread (`process_vm_readv(2)` on this process; a plain
/// copy where a seccomp filter refuses that call). Async-signal-safe.
///
/// # Safety
/// `dst..dst + src.len()` is writable memory that nothing else reads or writes meanwhile.
pub(crate) unsafe fn copy_or_efault(dst: usize, src: &[u8]) -> uffd_core::Result<()> {
    let failed = |errno| uffd_core::Error::Os {
        op: uffd_core::Op::Continue,
        errno,
    };
    let remote = [RemoteIoVec {
        base: src.as_ptr() as usize,
        len: src.len(),
    }];
    // SAFETY: the caller's promise.
    let local = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, src.len()) };
    match process_vm_readv(
        nix::unistd::getpid(),
        &mut [IoSliceMut::new(local)],
        &remote,
    ) {
        Ok(n) if n == src.len() => Ok(()),
        Ok(_) => Err(failed(Errno::EFAULT)),
        Err(Errno::EPERM | Errno::ENOSYS) => {
            // SAFETY: the caller's promise; `src` is readable (a shared borrow).
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
            Ok(())
        }
        Err(e) => Err(failed(e)),
    }
}
