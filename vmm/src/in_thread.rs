//! The SIGBUS path from `KVM_RUN`: the vCPU thread resolves its own faults.
//!
//! With guest memory registered in SIGBUS mode (`UFFD_FEATURE_SIGBUS`), a missing page
//! makes KVM's own access fail instead of waiting for a handler thread. Where the kernel
//! says so with `KVM_EXIT_MEMORY_FAULT` (`KVM_CAP_MEMORY_FAULT_INFO`), the VMM touches the
//! range from the vCPU thread (the pager's SIGBUS handler places the page in that thread)
//! and runs again. This nested host (`kvm_pvm`, the guest's kernel-mode code emulated)
//! reports no memory-fault exit: a data access the emulator could not make comes back as
//! an MMIO exit at the guest address, and an instruction fetch as an emulation failure.
//! Both are completed here too: an MMIO access inside guest RAM is done by the VMM on the
//! guest's behalf (its touch places the page), and a failed fetch is retried once its page
//! is placed. Anything else stays an error.

use crate::guest::GUEST_PAGE;
use crate::poison::{read_byte, write_byte, Poisoned};

/// Guest RAM as the vCPU thread sees it: guest physical address 0 at `base`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuestRam {
    base: usize,
    len: usize,
}

/// The longest x86 instruction: a fetch may cross into the next page.
const MAX_INSTRUCTION: u64 = 15;

impl GuestRam {
    /// Guest RAM at `base`, `len` bytes. The caller keeps the mapping alive and mapped
    /// for as long as this value is used (it lives inside one `Vm::run`).
    pub(crate) fn new(base: usize, len: usize) -> Self {
        Self { base, len }
    }

    /// Whether `[gpa, gpa + len)` is guest RAM.
    pub(crate) fn contains(&self, gpa: u64, len: usize) -> bool {
        gpa.checked_add(len as u64)
            .is_some_and(|end| end <= self.len as u64)
    }

    /// Reads one byte of every guest page in `[gpa, gpa + len)`, so the pager's SIGBUS
    /// handler places each in this thread. The caller checked [`contains`](Self::contains).
    pub(crate) fn touch(&self, gpa: u64, len: u64) -> Result<(), Poisoned> {
        let first = gpa / GUEST_PAGE;
        let last = (gpa + len.max(1) - 1) / GUEST_PAGE;
        for page in first..=last {
            // SAFETY: inside the mapping (the caller checked `contains`), which is live
            // for this run, on the vCPU thread that guards it (`run_vcpu`); the byte's
            // value is not used.
            unsafe { read_byte((self.base + (page * GUEST_PAGE) as usize) as *const u8) }?;
        }
        Ok(())
    }

    /// Touches the pages of the instruction at `rip` (flat segments: linear = physical).
    /// Returns false if it is not in guest RAM.
    pub(crate) fn touch_instruction(&self, rip: u64) -> Result<bool, Poisoned> {
        let len = MAX_INSTRUCTION.min((self.len as u64).saturating_sub(rip));
        if len == 0 || !self.contains(rip, len as usize) {
            return Ok(false);
        }
        self.touch(rip, len)?;
        Ok(true)
    }

    /// Completes a guest read KVM handed to the VMM: copies guest RAM at `gpa` into
    /// `data`. The caller checked [`contains`](Self::contains).
    pub(crate) fn read(&self, gpa: u64, data: &mut [u8]) -> Result<(), Poisoned> {
        for (i, byte) in data.iter_mut().enumerate() {
            // SAFETY: as in `touch`; byte by byte, inside the live mapping.
            *byte = unsafe { read_byte((self.base + gpa as usize + i) as *const u8) }?;
        }
        Ok(())
    }

    /// Completes a guest write KVM handed to the VMM. The caller checked
    /// [`contains`](Self::contains).
    pub(crate) fn write(&self, gpa: u64, data: &[u8]) -> Result<(), Poisoned> {
        for (i, &byte) in data.iter().enumerate() {
            // SAFETY: as in `touch`: inside the live mapping of guest RAM, which only the
            // guest and this VMM write (no Rust reference covers it); the guest is stopped
            // in this very access.
            unsafe { write_byte((self.base + gpa as usize + i) as *mut u8, byte) }?;
        }
        Ok(())
    }
}
