//! The same-run baselines' handlers: a minimal raw loop built directly on uffd-core (read
//! events, copy or zero the page, wake on EEXIST), and its SIGBUS twin. And the bench's
//! image: a repeating pattern, so a sweep to many GiB costs only the memory it faults.

use super::*;

/// The minimal raw handler: read events, copy (or zero) the page, wake on EEXIST.
#[derive(Clone)]
pub(super) struct Raw {
    pub uffd: Arc<Uffd>,
    /// The repeating image ([`Cyclic`]'s): page `i` holds the image's page `i mod` its
    /// length.
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
            self.uffd
                .zeropage(page, self.page_size, ZeropageMode::empty())
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

/// A source of `len` bytes repeating `image`: a sweep to 8 GiB needs no 8 GiB image.
/// Answers from the image itself (no copy) unless a run wraps round its end.
pub(super) struct Cyclic {
    pub image: Arc<Vec<u8>>,
    pub len: u64,
}

impl Source for Cyclic {
    fn len(&self) -> u64 {
        self.len
    }

    fn fetch<'a>(
        &'a self,
        offset: u64,
        scratch: &'a mut [u8],
    ) -> Result<pager::Fetched<'a>, pager::SourceError> {
        let period = self.image.len();
        let at = (offset % period as u64) as usize;
        let want = scratch.len();
        if at + want <= period {
            return Ok(pager::Fetched::Data(&self.image[at..at + want]));
        }
        let (mut filled, mut from) = (0, at);
        while filled < want {
            let n = (period - from).min(want - filled);
            scratch[filled..filled + n].copy_from_slice(&self.image[from..from + n]);
            filled += n;
            from = 0;
        }
        Ok(pager::Fetched::Data(scratch))
    }

    fn is_signal_safe(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cyclic_source_repeats_its_image_across_the_wrap() {
        let image: Vec<u8> = (0..16u8).collect();
        let src = Cyclic {
            image: Arc::new(image),
            len: 64,
        };
        let mut scratch = [0u8; 8];
        let pager::Fetched::Data(d) = src.fetch(12, &mut scratch).unwrap() else {
            panic!("data")
        };
        assert_eq!(d, &[12, 13, 14, 15, 0, 1, 2, 3]);
        let mut scratch = [0u8; 4];
        let pager::Fetched::Data(d) = src.fetch(36, &mut scratch).unwrap() else {
            panic!("data")
        };
        assert_eq!(d, &[4, 5, 6, 7]);
        let mut long = [0u8; 40];
        let pager::Fetched::Data(d) = src.fetch(10, &mut long).unwrap() else {
            panic!("data")
        };
        let want: Vec<u8> = (10..50).map(|i| (i % 16) as u8).collect();
        assert_eq!(d, want.as_slice());
    }
}
