//! The VM: one KVM memory slot over a [`Mapping`] of guest memory, vCPUs in flat 32-bit
//! protected mode, and the run loop that answers the guest's port I/O.
//!
//! When the pager fails (its source gave up), it poisons every page it has not placed
//! (`UFFDIO_POISON`). On this nested host KVM's access to such a page comes back as an
//! MMIO exit (in SIGBUS mode completed by the vCPU thread, whose own read of the page then
//! raises SIGBUS); where KVM maps guest memory itself (not nested), KVM sends the vCPU
//! thread a hardware-poison SIGBUS (`BUS_MCEERR_AR`) and `KVM_RUN` fails with EINTR.
//! Either way the vCPU's run ends ([`Error::Poisoned`], `poison.rs`: a SIGBUS handler that
//! takes only those, in our vCPU threads), and [`Vm::run`] returns the pager's error in
//! its place. (KVM's own SIGBUS is argued, not exercised: this host gives MMIO exits.)

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use nix::errno::Errno;
use pager::{Mapping, MemoryKind, Pager};

use crate::error::{kvm, Error, Result};
use crate::guest::{
    Command, CODE, CODE_GPA, DATA_GPA, GUEST_PAGE, PORT_ARGS, PORT_COMMAND, PORT_RESULT,
};
use crate::in_thread::GuestRam;
use crate::poison::{self, Poisoned, VcpuGuard};

/// The shape of a VM: memory size and kind, vCPU count, where the vCPU threads run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest memory in MiB (even for hugetlb).
    pub mib: usize,
    /// Anonymous 4 KiB pages or 2 MiB hugetlb pages.
    pub kind: MemoryKind,
    /// vCPUs.
    pub vcpus: usize,
    /// The CPU each vCPU thread is pinned to (vCPU `i` to `pin[i % len]`); empty: unpinned.
    pub pin: Vec<usize>,
}

impl VmConfig {
    /// `mib` MiB of anonymous memory, one vCPU, unpinned.
    pub fn new(mib: usize) -> Self {
        Self {
            mib,
            kind: MemoryKind::Anon,
            vcpus: 1,
            pin: Vec::new(),
        }
    }

    /// Guest memory in bytes.
    pub fn memory_len(&self) -> usize {
        self.mib << 20
    }

    /// Data pages the guest can fill (everything above [`DATA_GPA`]).
    pub fn data_pages(&self) -> u32 {
        u32::try_from((self.memory_len() as u64 - DATA_GPA) / GUEST_PAGE)
            .expect("guest memory below 4 GiB")
    }
}

/// One vCPU run's outcome: what the guest wrote to [`PORT_RESULT`], and when it first
/// exited to the VMM for something other than a fault (its first instruction that needs
/// the VMM: the measure of "running again").
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The commands the guest read, in order (the halt that ended the run left out).
    pub commands: Vec<Command>,
    /// The guest's results, in order: one per command but [`Command::Halt`].
    pub results: Vec<u32>,
    /// When `KVM_RUN` first returned with an exit the guest's program made (port I/O, the
    /// halt), not a fault the vCPU thread resolved: by then the guest has run.
    pub first_exit: Instant,
    /// Exits the vCPU thread resolved itself (SIGBUS mode: MMIO exits and memory-fault
    /// exits inside guest RAM, instruction fetches retried; see `in_thread.rs`).
    pub resolved_in_thread: u64,
    /// Of those, the ones before [`first_exit`](Self::first_exit): the faults the guest
    /// needed resolved before it could run to its first exit.
    pub resolved_before_first_exit: u64,
}

/// A VM of our own: KVM, its memory and vCPUs, and (after a lazy restore) the pager
/// serving its memory.
pub struct Vm {
    // Field order is drop order: vCPUs and the VM go before the memory KVM maps, and the
    // pager (whose uffd covers the memory) before the memory too.
    vcpus: Vec<VcpuFd>,
    vm: VmFd,
    _kvm: Kvm,
    pager: Option<Pager>,
    /// Guest memory, shared with whatever serves it (a pager, a migration destination),
    /// which keeps it mapped for as long as it may place pages.
    memory: Arc<Mapping>,
    config: VmConfig,
    /// Resolve SIGBUS-mode faults in the vCPU threads (see `in_thread.rs`).
    in_thread: bool,
}

impl Vm {
    /// Opens `/dev/kvm`, maps guest memory and creates the vCPUs. The vCPUs have no state
    /// yet: [`Vm::boot`], a restore or [`Vm::load_state`] gives them one (a migration
    /// destination fills [`Vm::memory`] first). `KVM_CAP_USER_MEMORY` is all it needs.
    pub fn create(config: VmConfig) -> Result<Vm> {
        assert!(config.vcpus >= 1, "a VM needs a vCPU");
        assert!(
            config.memory_len() as u64 > DATA_GPA && config.memory_len() <= 1 << 31,
            "guest memory must hold the code and stay below 2 GiB"
        );
        let memory = Mapping::new(config.kind, config.memory_len()).map_err(Error::Memory)?;
        Self::with_memory(config, Arc::new(memory))
    }

    /// Like [`Vm::create`] over memory the caller mapped (and maybe registered already).
    pub(crate) fn with_memory(config: VmConfig, memory: Arc<Mapping>) -> Result<Vm> {
        assert_eq!(memory.len(), config.memory_len(), "memory of the VM's size");
        poison::install();
        let kvm_fd = Kvm::new().map_err(kvm("open /dev/kvm"))?;
        let vm = kvm_fd.create_vm().map_err(kvm("create VM"))?;
        let slot = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: memory.len() as u64,
            userspace_addr: memory.addr() as u64,
        };
        // SAFETY: the slot covers exactly `memory`: a live mapping this Vm holds and drops
        // only after the VM fd (field order); it is the VM's only slot, so nothing overlaps.
        unsafe { vm.set_user_memory_region(slot) }.map_err(kvm("set memory slot"))?;
        let vcpus = (0..config.vcpus)
            .map(|i| vm.create_vcpu(i as u64).map_err(kvm("create vCPU")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Vm {
            vcpus,
            vm,
            _kvm: kvm_fd,
            pager: None,
            memory,
            config,
            in_thread: false,
        })
    }

    /// A fresh guest: the code loaded at [`CODE_GPA`], every vCPU at its first instruction
    /// in flat 32-bit protected mode.
    pub fn boot(config: VmConfig) -> Result<Vm> {
        let vm = Self::create(config)?;
        // SAFETY: `memory` is this Vm's own fresh mapping, longer than DATA_GPA (checked in
        // `create`), registered with no userfaultfd, and no vCPU has run yet: nothing else
        // reads or writes these bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                CODE.as_ptr(),
                vm.memory.as_ptr().add(CODE_GPA as usize),
                CODE.len(),
            );
        }
        for vcpu in &vm.vcpus {
            let mut sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
            flat_protected_mode(&mut sregs);
            vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;
            let regs = kvm_regs {
                rip: CODE_GPA,
                rflags: 0x2, // bit 1 is reserved and always set
                ..Default::default()
            };
            vcpu.set_regs(&regs).map_err(kvm("set regs"))?;
        }
        Ok(vm)
    }

    /// The VM's shape.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory: hand it to what fills it (a pager's
    /// [`mapping`](pager::PagerBuilder::mapping), a migration destination's
    /// `Destination::with_memory`), which keeps it mapped while it serves it.
    pub fn memory(&self) -> &Arc<Mapping> {
        &self.memory
    }

    pub(crate) fn vcpus(&self) -> &[VcpuFd] {
        &self.vcpus
    }

    pub(crate) fn set_pager(&mut self, pager: Pager, in_thread: bool) {
        self.pager = Some(pager);
        self.in_thread = in_thread;
    }

    /// The pager serving guest memory, after a lazy restore.
    pub fn pager(&self) -> Option<&Pager> {
        self.pager.as_ref()
    }

    /// Takes the pager out (to stop it and read its stats); the memory stays mapped, and
    /// pages it had not placed yet read as zeros from then on.
    pub fn take_pager(&mut self) -> Option<Pager> {
        self.pager.take()
    }

    /// Runs every vCPU, each in a thread of its own, through its program (`programs[i]`
    /// for vCPU `i`, then [`Command::Halt`]) and returns when all have halted. A vCPU
    /// thread blocks in `KVM_RUN` while the pager places a page its guest touched. If the
    /// pager failed (its source did) and a vCPU ended on guest memory, the error is the
    /// pager's ([`Error::Pager`]), not the exit it showed as.
    pub fn run(&mut self, programs: &[Vec<Command>]) -> Result<Vec<RunReport>> {
        assert_eq!(programs.len(), self.vcpus.len(), "one program per vCPU");
        self.run_with(&|index, n| programs[index].get(n as usize).copied())
    }

    /// Runs every vCPU through the commands `next(vcpu, n)` gives for its `n`-th command
    /// until `stop` is set (checked before each command; the vCPU then halts) — a guest
    /// that keeps working while something else (a migration) goes on. Each report lists
    /// the commands its guest read, in order.
    pub fn run_until(
        &mut self,
        stop: &AtomicBool,
        next: &(dyn Fn(usize, u64) -> Command + Sync),
    ) -> Result<Vec<RunReport>> {
        // Acquire: pairs with the setter's store; nothing else is ordered by it.
        self.run_with(&|index, n| (!stop.load(Ordering::Acquire)).then(|| next(index, n)))
    }

    fn run_with(
        &mut self,
        next: &(dyn Fn(usize, u64) -> Option<Command> + Sync),
    ) -> Result<Vec<RunReport>> {
        let result = self.run_vcpus(next);
        self.blame_pager(result)
    }

    /// A run that ended on guest memory KVM could not reach while the pager had failed
    /// ended because of the pager: its error (a source error, say) is the cause, the exit
    /// (an MMIO read of a page it poisoned, on this nested host) only how that showed.
    /// The error is taken from the pager: its [`stop`](Pager::stop) then gives counters.
    fn blame_pager(&self, result: Result<Vec<RunReport>>) -> Result<Vec<RunReport>> {
        let Err(exit) = result else {
            return result;
        };
        let on_guest_memory = match &exit {
            Error::MmioRead { gpa, .. }
            | Error::MemoryFault { gpa, .. }
            | Error::Poisoned { gpa, .. } => *gpa < self.memory.len() as u64,
            // An instruction fetch the emulator could not make, an MMIO write: no address
            // to check, and only a failed pager (below) makes them its doing.
            Error::Internal { .. } | Error::Exit { .. } => true,
            _ => false,
        };
        let failed = self.pager.as_ref().filter(|_| on_guest_memory);
        match failed.and_then(Pager::take_error) {
            Some(cause) => {
                log::warn!("vCPU run ended on memory the pager could not serve ({exit})");
                Err(Error::Pager(cause))
            }
            None => Err(exit),
        }
    }

    fn run_vcpus(
        &mut self,
        next: &(dyn Fn(usize, u64) -> Option<Command> + Sync),
    ) -> Result<Vec<RunReport>> {
        let pin = &self.config.pin;
        let guest = (self.memory.addr(), self.memory.len());
        let in_thread =
            (self.in_thread && self.pager.is_some()).then(|| GuestRam::new(guest.0, guest.1));
        std::thread::scope(|scope| {
            // Every vCPU thread that started is joined (the scope would anyway), and the
            // first error — a thread that could not start included — is the result.
            let threads: Vec<_> = self
                .vcpus
                .iter_mut()
                .enumerate()
                .map(|(index, vcpu)| {
                    let cpu = (!pin.is_empty()).then(|| pin[index % pin.len()]);
                    std::thread::Builder::new()
                        .name(format!("vcpu{index}"))
                        .spawn_scoped(scope, move || {
                            if let Some(cpu) = cpu {
                                pager::pin_to_cpu(cpu).map_err(|source| Error::Pin {
                                    vcpu: index,
                                    cpu,
                                    source,
                                })?;
                            }
                            let guard = VcpuGuard::new(guest.0, guest.1);
                            run_vcpu(index, (vcpu, &guard), &|n| next(index, n), in_thread)
                        })
                        .map_err(|source| Error::Spawn {
                            vcpu: index,
                            source,
                        })
                })
                .collect();
            threads
                .into_iter()
                .enumerate()
                .map(|(index, t)| t?.join().map_err(|_| Error::VcpuPanicked(index))?)
                .collect()
        })
    }

    /// The VM fd, for what this crate does not wrap.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }
}

/// Flat 4 GiB code and data segments, protection on, paging off: guest physical addresses
/// are the addresses the code uses. The segment caches are loaded directly, so no GDT is
/// needed in guest memory (the code never reloads a segment register).
fn flat_protected_mode(sregs: &mut kvm_sregs) {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 1, // 32-bit operands and addresses
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3, // read/write, accessed
        ..code
    };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// The words the guest reads for `command`, each with the port it must read it from.
fn port_words(command: Command) -> impl Iterator<Item = (u16, u32)> {
    let [number, args @ ..] = command.words();
    std::iter::once((PORT_COMMAND, number)).chain(args.map(|a| (PORT_ARGS, a)))
}

/// Runs one vCPU through its program, on the thread `guard` marks. `ram`: resolve
/// SIGBUS-mode faults in this thread.
fn run_vcpu(
    index: usize,
    (vcpu, guard): (&mut VcpuFd, &VcpuGuard),
    next: &dyn Fn(u64) -> Option<Command>,
    ram: Option<GuestRam>,
) -> Result<RunReport> {
    let mut script = VecDeque::new();
    let mut commands = Vec::new();
    let mut halting = false;
    let mut results = Vec::new();
    // When the guest's program first exited, and the in-thread resolutions before it.
    let mut first_exit: Option<(Instant, u64)> = None;
    let mut resolved_in_thread = 0;
    let mut refetched = None; // the instruction last retried, so a failure cannot loop
    let unexpected = |exit: String| Error::Exit { vcpu: index, exit };
    let poisoned = |at: Poisoned| Error::Poisoned {
        vcpu: index,
        gpa: guard.gpa(at),
    };
    loop {
        guard.entering_run();
        let exit = vcpu.run();
        guard.left_run();
        let returned = Instant::now();
        // KVM sent this thread a hardware-poison SIGBUS (`poison.rs`): the run is over.
        if let Some(at) = guard.take_poisoned() {
            return Err(poisoned(at));
        }
        // A fault resolved below is not "the guest ran": in SIGBUS mode the first return
        // is the fault on the code page, before any instruction.
        let ran = matches!(
            exit,
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..) | VcpuExit::Hlt)
        );
        if ran {
            first_exit.get_or_insert((returned, resolved_in_thread));
        }
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                if script.is_empty() && !halting {
                    let command = next(commands.len() as u64).unwrap_or(Command::Halt);
                    halting = command == Command::Halt;
                    if !halting {
                        commands.push(command);
                    }
                    script.extend(port_words(command));
                }
                let (want, word) = script
                    .pop_front()
                    .ok_or_else(|| unexpected(format!("in from port {port:#x} after halt")))?;
                if port != want || data.len() != 4 {
                    return Err(unexpected(format!(
                        "in from port {port:#x} ({} bytes), expected {want:#x}",
                        data.len()
                    )));
                }
                data.copy_from_slice(&word.to_le_bytes());
            }
            Ok(VcpuExit::IoOut(PORT_RESULT, data)) => {
                let word: [u8; 4] = data
                    .try_into()
                    .map_err(|_| unexpected(format!("out of {} bytes", data.len())))?;
                results.push(u32::from_le_bytes(word));
            }
            Ok(VcpuExit::Hlt) if halting && script.is_empty() => {
                let (first_exit, resolved_before_first_exit) =
                    first_exit.expect("set above: a halt is an exit the guest made");
                return Ok(RunReport {
                    commands,
                    results,
                    first_exit,
                    resolved_in_thread,
                    resolved_before_first_exit,
                });
            }
            Ok(VcpuExit::MmioRead(gpa, data)) => match ram {
                Some(ram) if ram.contains(gpa, data.len()) => {
                    ram.read(gpa, data).map_err(poisoned)?;
                    resolved_in_thread += 1;
                }
                _ => return Err(Error::MmioRead { vcpu: index, gpa }),
            },
            Ok(VcpuExit::MmioWrite(gpa, data)) => match ram {
                Some(ram) if ram.contains(gpa, data.len()) => {
                    ram.write(gpa, data).map_err(poisoned)?;
                    resolved_in_thread += 1;
                }
                _ => return Err(unexpected(format!("MMIO write at {gpa:#x}"))),
            },
            Ok(VcpuExit::MemoryFault { gpa, size, .. })
                if ram.is_some_and(|ram| ram.contains(gpa, size as usize)) =>
            {
                ram.expect("checked").touch(gpa, size).map_err(poisoned)?;
                resolved_in_thread += 1;
            }
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                return Err(Error::MemoryFault {
                    vcpu: index,
                    gpa,
                    size,
                    flags,
                })
            }
            Ok(VcpuExit::InternalError) => {
                if let Some(ram) = ram {
                    let rip = vcpu.get_regs().map_err(kvm("get regs"))?.rip;
                    if refetched != Some(rip) && ram.touch_instruction(rip).map_err(poisoned)? {
                        refetched = Some(rip);
                        resolved_in_thread += 1;
                        continue;
                    }
                }
                let run = vcpu.get_kvm_run();
                // SAFETY: KVM_RUN returned with exit reason KVM_EXIT_INTERNAL_ERROR, for
                // which KVM fills the `internal` member of the exit union.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let ndata = (internal.ndata as usize).min(internal.data.len());
                return Err(Error::Internal {
                    vcpu: index,
                    suberror: internal.suberror,
                    data: internal.data[..ndata].to_vec(),
                });
            }
            Ok(other) => return Err(unexpected(format!("{other:?}"))),
            Err(e) if e.errno() == Errno::EINTR as i32 => continue,
            Err(e) => return Err(kvm("run vCPU")(e)),
        }
    }
}
