//! The same-run baselines' handlers: a minimal raw loop built directly on uffd-core (read
//! events, copy or zero the page, wake on EEXIST), and its SIGBUS twin. And the bench's
//! image: a repeating pattern ([`Stretched::repeated`](crate::stretched::Stretched::repeated)),
//! so a sweep to many GiB costs only the memory it faults.

use super::*;

/// The minimal raw handler: read events, copy (or zero) the page, wake on EEXIST.
#[derive(Clone)]
pub(super) struct Raw {
    pub uffd: Arc<Uffd>,
    /// The repeating image (the pager's source is
    /// [`Stretched::repeated`](crate::stretched::Stretched::repeated) over it): page `i`
    /// holds the image's page `i mod` its length.
    pub image: Arc<Vec<u8>>,
    pub base: usize,
    pub page_size: usize,
    pub zero: bool,
}

impl Raw {
    fn place(&self, addr: usize) -> Result<(), UffdError> {
        let page = addr & !(self.page_size - 1);
        let at = (page - self.base) % self.image.len();
        let r = if self.zero {
            // SAFETY: `page` is a missing page of the bench's own registered region.
            unsafe {
                self.uffd
                    .zeropage(page, self.page_size, ZeropageMode::empty())
            }
        } else {
            // SAFETY: `page` is a missing page of the bench's registered region.
            unsafe {
                self.uffd.copy(
                    page,
                    &self.image[at..at + self.page_size],
                    CopyMode::empty(),
                )
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(UffdError::Exists { .. }) => self.uffd.wake(page, self.page_size),
            Err(e) => Err(e),
        }
    }

    pub fn serve(&self, cpu: Option<usize>, spin: bool, stop: &AtomicBool) -> Result<()> {
        if let Some(cpu) = cpu {
            pin_to_cpu(cpu).with_context(|| format!("pin the raw handler to CPU {cpu}"))?;
        }
        let mut buf = EventBuffer::new(64);
        // Relaxed: a stop flag only; join() synchronises.
        while !stop.load(Ordering::Relaxed) {
            if !spin && !self.uffd.wait_readable(Some(Duration::from_millis(20)))? {
                continue;
            }
            if self.uffd.read_events(&mut buf)? == ReadStatus::WouldBlock {
                continue;
            }
            for event in buf.drain() {
                if let Event::Pagefault { addr, .. } = event {
                    self.place(addr)?;
                }
            }
        }
        Ok(())
    }
}

/// The raw SIGBUS baseline: a process-wide handler that places the page itself.
pub(super) mod raw_sigbus {
    use super::*;
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

    static RAW: AtomicPtr<Raw> = AtomicPtr::new(std::ptr::null_mut());

    extern "C" fn on_sigbus(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        let raw = RAW.load(Ordering::Acquire);
        if raw.is_null() {
            return;
        }
        // SAFETY: the kernel's siginfo; `raw` lives until the guard is dropped, after the
        // faulting threads are joined.
        unsafe {
            let _ = (*raw).place((*info).si_addr() as usize);
        }
    }

    /// Restores the previous disposition on drop.
    pub struct Guard {
        previous: SigAction,
        raw: *mut Raw,
    }

    pub fn install(raw: Raw) -> Guard {
        let raw = Box::into_raw(Box::new(raw));
        RAW.store(raw, Ordering::Release);
        let action = SigAction::new(
            SigHandler::SigAction(on_sigbus),
            SaFlags::SA_SIGINFO,
            SigSet::empty(),
        );
        // SAFETY: the handler does one placement ioctl (async-signal-safe) on a `Raw` that
        // lives until the guard is dropped.
        let previous = unsafe { sigaction(Signal::SIGBUS, &action) }.expect("sigaction(SIGBUS)");
        Guard { previous, raw }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            RAW.store(std::ptr::null_mut(), Ordering::Release);
            // SAFETY: restores the saved disposition.
            let _ = unsafe { sigaction(Signal::SIGBUS, &self.previous) };
            // SAFETY: no fault is in flight (the faulting threads were joined) and the
            // handler is gone, so nothing uses `raw` any more.
            drop(unsafe { Box::from_raw(self.raw) });
        }
    }
}

/// The largest image the bench keeps: larger regions repeat it. 64 MiB is far beyond the
/// last-level cache (every copy still comes from DRAM, as from a unique image) and a
/// multiple of 2 MiB (hugetlb pages, and aligned placement runs never wrap).
pub(super) const IMAGE_PERIOD: usize = 64 << 20;
