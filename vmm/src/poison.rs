//! A poisoned guest page ends the vCPU's run with an error, not the process.
//!
//! When the pager fails it poisons every page it has not placed (`UFFDIO_POISON`), and
//! guest memory can also hold a page the hardware lost. A touch of one from user space
//! raises SIGBUS in the toucher (`BUS_MCEERR_AR` on a kernel built with
//! `CONFIG_MEMORY_FAILURE`, `BUS_ADRERR` without, as here): the VMM's own access from a
//! vCPU thread, completing an MMIO exit or a memory-fault exit in SIGBUS mode
//! (`in_thread.rs`). In SIGBUS mode its access to a page the failing pager could not serve
//! comes first: the pager chains that `BUS_ADRERR` on, and poisons the page after. Where
//! KVM maps guest memory itself (not on this nested host), KVM's own access from
//! `KVM_RUN` makes it send the vCPU thread a `BUS_MCEERR_AR` (`kvm_send_hwpoison_signal`),
//! and `KVM_RUN` returns EINTR. At SIGBUS's default action each of these ends the whole
//! process without a word.
//!
//! So the first [`Vm`](crate::Vm) installs a process-wide SIGBUS handler that takes such a
//! SIGBUS only at an address of the guest memory of a vCPU thread of ours ([`VcpuGuard`]),
//! and only where returning is safe:
//! - the VMM's access, made through the two instructions below (`read_byte`,
//!   `write_byte`), `BUS_MCEERR_AR` or `BUS_ADRERR`: the handler resumes at their fixup,
//!   which returns [`Poisoned`] instead of retrying the access (the kernel's
//!   exception-table idea; no frame is skipped);
//! - inside `KVM_RUN`, `BUS_MCEERR_AR`: the handler returns and the ioctl fails with EINTR.
//!
//! The thread notes the address; the run loop turns it into [`Error::Poisoned`], and the
//! run ends with the pager's error if the pager failed (`Vm::run`). Every other SIGBUS is
//! chained to the disposition found at install. The handler is installed before the
//! VMM's pager starts, so a SIGBUS-mode pager sees each SIGBUS first (serving the missing
//! pages) and chains the rest to it; whatever installs a SIGBUS handler later without
//! chaining takes this back.
//!
//! [`Error::Poisoned`]: crate::Error::Poisoned

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{compiler_fence, AtomicBool, Ordering};
use std::sync::OnceLock;

use nix::libc;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

// The VMM's one-byte accesses to guest memory, each a function whose access instruction
// and shared fixup the handler knows: `rdi` the address, `rsi` where a read byte goes (the
// byte to write, for a write). `eax` is 0 after the access, 1 when the fixup ran instead.
std::arch::global_asm!(
    ".pushsection .text.uffdkit_vmm_guest_access,\"ax\",@progbits",
    ".globl uffdkit_vmm_read_byte",
    ".hidden uffdkit_vmm_read_byte",
    ".type uffdkit_vmm_read_byte,@function",
    "uffdkit_vmm_read_byte:",
    "xor eax, eax",
    ".globl uffdkit_vmm_read_access",
    ".hidden uffdkit_vmm_read_access",
    "uffdkit_vmm_read_access:",
    "movzx ecx, byte ptr [rdi]",
    "mov byte ptr [rsi], cl",
    "ret",
    ".globl uffdkit_vmm_write_byte",
    ".hidden uffdkit_vmm_write_byte",
    ".type uffdkit_vmm_write_byte,@function",
    "uffdkit_vmm_write_byte:",
    "xor eax, eax",
    ".globl uffdkit_vmm_write_access",
    ".hidden uffdkit_vmm_write_access",
    "uffdkit_vmm_write_access:",
    "mov byte ptr [rdi], sil",
    "ret",
    ".globl uffdkit_vmm_access_fixup",
    ".hidden uffdkit_vmm_access_fixup",
    "uffdkit_vmm_access_fixup:",
    "mov eax, 1",
    "ret",
    ".popsection",
);

extern "C" {
    fn uffdkit_vmm_read_byte(addr: *const u8, out: *mut u8) -> u32;
    fn uffdkit_vmm_write_byte(addr: *mut u8, byte: u8) -> u32;
    // Labels, not functions: only their addresses are used.
    fn uffdkit_vmm_read_access();
    fn uffdkit_vmm_write_access();
    fn uffdkit_vmm_access_fixup();
}

/// The address of a poisoned page an access met (or of a page a failed SIGBUS-mode pager
/// could not serve, which it poisons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Poisoned(pub usize);

/// Reads the byte at `addr`, or says it is poisoned.
///
/// # Safety
///
/// `addr` is inside a live mapping, readable but for poison (guest memory, which the guest
/// may write concurrently: a byte read is what every VMM does), and the calling thread
/// holds a [`VcpuGuard`] over it.
pub(crate) unsafe fn read_byte(addr: *const u8) -> Result<u8, Poisoned> {
    let mut byte = 0u8;
    // SAFETY: the caller's promise; the function writes one byte to `byte`.
    match unsafe { uffdkit_vmm_read_byte(addr, &mut byte) } {
        0 => Ok(byte),
        _ => Err(Poisoned(addr as usize)),
    }
}

/// Writes `byte` at `addr`, or says it is poisoned.
///
/// # Safety
///
/// `addr` is inside a live writable mapping that no Rust reference covers (guest memory),
/// and the calling thread holds a [`VcpuGuard`] over it.
pub(crate) unsafe fn write_byte(addr: *mut u8, byte: u8) -> Result<(), Poisoned> {
    // SAFETY: the caller's promise.
    match unsafe { uffdkit_vmm_write_byte(addr, byte) } {
        0 => Ok(()),
        _ => Err(Poisoned(addr as usize)),
    }
}

thread_local! {
    /// The guest memory this thread runs (`[base, base + len)`, empty for any other thread).
    static GUEST: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    /// Whether this thread is inside `KVM_RUN` (where a SIGBUS handler may return).
    static IN_RUN: Cell<bool> = const { Cell::new(false) };
    /// The first poisoned address this thread met and did not report yet (0: none).
    static MET: Cell<usize> = const { Cell::new(0) };
}

/// Marks the calling thread, until dropped, as a vCPU thread running the guest memory
/// `[base, base + len)`: a hardware-poison SIGBUS there becomes an error.
pub(crate) struct VcpuGuard {
    base: usize,
    /// Not `Send`: it marks this thread.
    _thread: std::marker::PhantomData<*const ()>,
}

impl VcpuGuard {
    pub(crate) fn new(base: usize, len: usize) -> VcpuGuard {
        GUEST.set((base, len));
        MET.set(0);
        VcpuGuard {
            base,
            _thread: std::marker::PhantomData,
        }
    }

    /// The thread is about to enter `KVM_RUN`, where the handler may return.
    pub(crate) fn entering_run(&self) {
        IN_RUN.set(true);
        // The handler reads the flag on this thread: the store comes before the ioctl.
        compiler_fence(Ordering::SeqCst);
    }

    /// The thread is out of `KVM_RUN`.
    pub(crate) fn left_run(&self) {
        compiler_fence(Ordering::SeqCst);
        IN_RUN.set(false);
    }

    /// The poisoned address met since the last call, if any.
    pub(crate) fn take_poisoned(&self) -> Option<Poisoned> {
        // The handler's store on this thread comes before this load.
        compiler_fence(Ordering::SeqCst);
        match MET.replace(0) {
            0 => None,
            addr => Some(Poisoned(addr)),
        }
    }

    /// The guest physical address of `at`, a poisoned address in this guest's memory.
    pub(crate) fn gpa(&self, at: Poisoned) -> u64 {
        (at.0 - self.base) as u64
    }
}

impl Drop for VcpuGuard {
    fn drop(&mut self) {
        GUEST.set((0, 0));
        MET.set(0);
    }
}

/// The SIGBUS disposition found at install, as `sigaction(2)` reported it.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// Set once the handler is installed (or installing failed, which is logged).
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Installs the handler, once per process. Call before a SIGBUS-mode pager starts.
pub(crate) fn install() {
    // SeqCst: once per process; nothing else is ordered by it.
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::uninit();
    // SAFETY: a null new action only queries; `old` is written on success.
    if unsafe { libc::sigaction(libc::SIGBUS, ptr::null(), old.as_mut_ptr()) } < 0 {
        log::warn!(
            "cannot read the SIGBUS disposition: a poisoned guest page will end the process"
        );
        return;
    }
    // SAFETY: initialised by the successful call above.
    let _ = PREVIOUS.set(unsafe { old.assume_init() });
    let action = SigAction::new(
        SigHandler::SigAction(on_sigbus),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    // SAFETY: `on_sigbus` is async-signal-safe: thread-locals of const initialisers
    // without destructors, the context's registers, and `chain`.
    if let Err(e) = unsafe { sigaction(Signal::SIGBUS, &action) } {
        log::warn!(
            "cannot install the SIGBUS handler ({e}): a poisoned guest page will end the process"
        );
    }
}

extern "C" fn on_sigbus(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: `info` is the kernel's siginfo for this SIGBUS (SA_SIGINFO).
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // SAFETY: `ctx` is the kernel's ucontext for this signal, which it restores from.
    if unsafe { take(code, addr, ctx.cast()) } {
        return;
    }
    // SAFETY: the kernel's `info` and `ctx`, passed on unchanged.
    unsafe { chain(sig, info, ctx, code) };
}

/// Takes a SIGBUS (`code`) at `addr` if this is a vCPU thread whose guest memory holds it
/// and returning is safe (see the module docs): notes it, and moves an access of ours
/// to its fixup.
///
/// # Safety
///
/// `ctx` is the kernel's ucontext of the signal being handled.
unsafe fn take(code: i32, addr: usize, ctx: *mut libc::ucontext_t) -> bool {
    let (base, len) = GUEST.get();
    if len == 0 || addr.wrapping_sub(base) >= len {
        return false;
    }
    // SAFETY: the caller's promise: the kernel's ucontext, ours to change.
    let rip = unsafe { &mut (*ctx).uc_mcontext.gregs[libc::REG_RIP as usize] };
    let ours = [
        uffdkit_vmm_read_access as *const () as usize,
        uffdkit_vmm_write_access as *const () as usize,
    ];
    match code {
        libc::BUS_MCEERR_AR | libc::BUS_ADRERR if ours.contains(&(*rip as usize)) => {
            *rip = uffdkit_vmm_access_fixup as *const () as usize as libc::greg_t;
        }
        libc::BUS_MCEERR_AR if IN_RUN.get() => {}
        _ => return false,
    }
    if MET.get() == 0 {
        MET.set(addr);
    }
    true
}

/// Hands a SIGBUS that is not ours to the disposition found at install: its handler as
/// the kernel would have called it, else the default action (restored; a fault meets it
/// on return, a sent signal is raised again). Async-signal-safe.
///
/// # Safety
///
/// Called from the SIGBUS handler with the kernel's `info` and `ctx`.
unsafe fn chain(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void, code: i32) {
    let Some(previous) = PREVIOUS.get() else {
        return; // not installed: unreachable
    };
    match previous.sa_sigaction {
        libc::SIG_IGN if code <= 0 => {}
        libc::SIG_DFL | libc::SIG_IGN => {
            let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            // SAFETY: restoring the default disposition of a signal about to end us.
            let _ = unsafe { sigaction(Signal::SIGBUS, &default) };
            if code <= 0 {
                let _ = nix::sys::signal::raise(Signal::SIGBUS);
            }
        }
        handler if previous.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: a three-argument handler installed for SIGBUS (SA_SIGINFO), called
            // as the kernel would have.
            let f: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(handler) };
            f(sig, info, ctx);
        }
        handler => {
            // SAFETY: a one-argument handler installed for SIGBUS.
            let f: extern "C" fn(i32) = unsafe { std::mem::transmute(handler) };
            f(sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pager::{Fetched, Mapping, MemoryKind, Pager, Source, SourceError, Uffd};

    use super::*;

    /// A source whose every read fails: the pager poisons what it has not placed.
    struct Broken;

    impl Source for Broken {
        fn len(&self) -> u64 {
            4 << 12
        }

        fn fetch<'a>(&'a self, offset: u64, _: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
            Err(SourceError {
                what: "read the test's broken image",
                offset,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            })
        }
    }

    /// A real poison SIGBUS (`BUS_ADRERR` on this kernel, built without
    /// `CONFIG_MEMORY_FAILURE`): a vCPU thread's read and write of pages that a pager whose
    /// source failed poisoned (the read waits in the fault until the pager fails and
    /// poisons it, then faults on the poison) come back as errors at the page; the thread
    /// goes on.
    #[test]
    fn a_vcpu_threads_access_to_a_poisoned_page_is_an_error_not_the_end_of_the_process() {
        install();
        let memory = Arc::new(Mapping::new(MemoryKind::Anon, 4 << 12).expect("memory"));
        let uffd = Uffd::builder().non_blocking(true).open().expect("uffd");
        let pager = Pager::builder(uffd, Arc::new(Broken))
            .mapping(memory.clone(), 0)
            .start()
            .expect("pager");
        let (base, len) = (memory.addr(), memory.len());
        let vcpu = std::thread::spawn(move || {
            let guard = VcpuGuard::new(base, len);
            let page = |i: usize| (base + (i << 12) + 7) as *mut u8;
            // SAFETY: inside `memory`, alive until joined; this thread holds the guard.
            let read = unsafe { read_byte(page(1)) };
            // SAFETY: as above; no reference covers the mapping.
            let written = unsafe { write_byte(page(3), 1) };
            (read, written, guard.take_poisoned())
        });
        let (read, written, met) = vcpu.join().expect("the vCPU thread lives");
        assert_eq!(read, Err(Poisoned(base + (1 << 12) + 7)));
        assert_eq!(written, Err(Poisoned(base + (3 << 12) + 7)));
        assert_eq!(
            met,
            Some(Poisoned(base + (1 << 12) + 7)),
            "the first one met"
        );
        assert!(pager.take_error().is_some(), "the pager failed");
    }
}
