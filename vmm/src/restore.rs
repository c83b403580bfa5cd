//! Restores: eager (read the whole memory file, then run) or lazy (register guest memory
//! with the pager, serving it from the memory file, and run at once: each page the guest
//! or KVM first touches is placed while the vCPU thread waits in `KVM_RUN`).

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use pager::{DeliveryMode, Features, FileSource, Mapping, Pager, Prefetch, Source, Uffd, UserMode};

use crate::error::{Error, Result};
use crate::snapshot::{fits, VmState, MEMORY_FILE};
use crate::vm::{Vm, VmConfig};

/// How guest memory comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restore {
    /// Copy the whole memory file into guest memory before the first `KVM_RUN`.
    Eager,
    /// Serve guest memory on demand from the memory file through the pager.
    Lazy(Lazy),
}

/// The pager's settings for a lazy restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lazy {
    /// How faults reach the pager.
    pub mode: DeliveryMode,
    /// Pin the handler thread ([`DeliveryMode::Thread`], [`DeliveryMode::BusyPoll`]).
    pub handler_cpu: Option<usize>,
    /// Sequential readahead: a fault right after the previous one places a run that
    /// doubles up to 2 MiB (the guest's pass over its memory is sequential).
    pub readahead: bool,
    /// A background filler for the pages not faulted yet.
    pub prefetch: Prefetch,
    /// In [`DeliveryMode::Sigbus`], resolve in the vCPU thread what KVM could not reach
    /// (memory-fault and MMIO exits in guest RAM, failed instruction fetches; see
    /// `in_thread.rs`). Off, those exits end the run as errors: the probe of what KVM does.
    pub in_thread: bool,
}

impl Lazy {
    /// One handler thread blocking in poll, unpinned, page by page, no prefetch.
    pub const DEMAND: Lazy = Lazy {
        mode: DeliveryMode::Thread,
        handler_cpu: None,
        readahead: false,
        prefetch: Prefetch::None,
        in_thread: true,
    };
}

impl Restore {
    /// Lazy, one handler thread blocking in poll, unpinned, page by page, no prefetch.
    pub const LAZY: Restore = Restore::Lazy(Lazy::DEMAND);
}

impl Vm {
    /// Restores lazily with the vCPU state of the snapshot in `dir` and guest memory from
    /// any pager [`Source`] holding the snapshot's memory file (guest physical address =
    /// offset): a page server's `postcopy::client::RemoteSource`, a chunked image's
    /// `ChunkedSource`, a layered source. The pager's settings are `lazy`'s.
    pub fn restore_from(
        dir: &Path,
        config: VmConfig,
        source: Arc<dyn Source>,
        lazy: Lazy,
    ) -> Result<Vm> {
        let state = VmState::load(dir)?;
        check_fits(&state, &config)?;
        if source.len() < config.memory_len() as u64 {
            return Err(Error::Mismatch(format!(
                "a source of {} bytes for {} MiB of guest memory",
                source.len(),
                config.mib
            )));
        }
        let memory =
            Arc::new(Mapping::new(config.kind, config.memory_len()).map_err(Error::Memory)?);
        let in_thread = lazy.in_thread && lazy.mode == DeliveryMode::Sigbus;
        let pager = serve_from(source, &memory, lazy)?;
        let mut vm = Vm::with_memory(config, memory)?;
        vm.set_pager(pager, in_thread);
        vm.load_vcpus(&state)?;
        Ok(vm)
    }

    /// Restores the snapshot in `dir` into a new VM of `config`'s memory kind, vCPU count
    /// and pinning (its size must be the snapshot's). The VM is ready to [`Vm::run`]: the
    /// vCPUs continue after the `hlt` they were saved at.
    pub fn restore(dir: &Path, config: VmConfig, how: Restore) -> Result<Vm> {
        let state = VmState::load(dir)?;
        check_fits(&state, &config)?;
        let memory =
            Arc::new(Mapping::new(config.kind, config.memory_len()).map_err(Error::Memory)?);
        let path = dir.join(MEMORY_FILE);
        let pager = match how {
            Restore::Eager => {
                read_into(&path, &memory)?;
                None
            }
            Restore::Lazy(lazy) => {
                let in_thread = lazy.in_thread && lazy.mode == DeliveryMode::Sigbus;
                Some((serve(&path, &memory, lazy)?, in_thread))
            }
        };
        let mut vm = Vm::with_memory(config, memory)?;
        if let Some((pager, in_thread)) = pager {
            vm.set_pager(pager, in_thread);
        }
        vm.load_vcpus(&state)?;
        Ok(vm)
    }
}

/// Refuses a snapshot that does not fit the VM's memory.
fn check_fits(state: &VmState, config: &VmConfig) -> Result<()> {
    if state.mib != config.mib || !fits(config.kind, config.mib) {
        return Err(Error::Mismatch(format!(
            "snapshot of {} MiB into {} MiB of {} memory",
            state.mib,
            config.mib,
            config.kind.name()
        )));
    }
    Ok(())
}

/// Reads the whole memory file into `memory`.
fn read_into(path: &Path, memory: &Mapping) -> Result<()> {
    let err = |source| Error::File {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(err)?;
    // SAFETY: `memory` is a fresh mapping of ours that no VM maps yet and no userfaultfd
    // covers, so this is the only reference to its bytes while the slice lives.
    let bytes = unsafe { std::slice::from_raw_parts_mut(memory.as_ptr(), memory.len()) };
    file.read_exact(bytes).map_err(err)
}

/// Starts a pager serving `memory` from the memory file.
fn serve(path: &Path, memory: &Arc<Mapping>, lazy: Lazy) -> Result<Pager> {
    // The SIGBUS path answers inside a signal handler: only a mapped file is safe there.
    let source: Arc<dyn Source> = match lazy.mode {
        DeliveryMode::Sigbus => Arc::new(FileSource::mmap(path)?),
        _ => Arc::new(FileSource::pread(path)?),
    };
    log::debug!("guest memory served from {}", path.display());
    serve_from(source, memory, lazy)
}

/// Starts a pager serving `memory` from `source` (guest physical address = image offset).
fn serve_from(source: Arc<dyn Source>, memory: &Arc<Mapping>, lazy: Lazy) -> Result<Pager> {
    // Before a SIGBUS-mode pager, which then chains a poisoned page's SIGBUS to it.
    crate::poison::install();
    let mode = lazy.mode;
    let features = match mode {
        DeliveryMode::Sigbus => Features::SIGBUS,
        _ => Features::empty(),
    };
    // KVM touches guest memory from the kernel: a user-mode-only uffd would fail those
    // faults instead of waiting for the pager, so open one for kernel faults or fail.
    let uffd = Uffd::builder()
        .non_blocking(true)
        .user_mode(UserMode::KernelFaults)
        .require(features)
        .open()
        .map_err(pager::Error::from)?;
    let pager = Pager::builder(uffd, source)
        .mapping(memory.clone(), 0)
        .mode(mode)
        .handler_cpu(lazy.handler_cpu)
        .readahead(lazy.readahead)
        .prefetch(lazy.prefetch)
        .start()?;
    log::debug!(
        "guest memory {:#x}+{:#x} served lazily ({} mode)",
        memory.addr(),
        memory.len(),
        mode.name()
    );
    Ok(pager)
}
