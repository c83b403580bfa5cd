//! What can go wrong in the VMM, typed so a caller (and a test) can match on it.

use std::path::PathBuf;

/// A VMM error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("KVM: {what}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped.
    #[error("guest memory: {0}")]
    Memory(#[source] std::io::Error),
    /// A snapshot file could not be read or written.
    #[error("snapshot file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot's vCPU state could not be encoded or decoded.
    #[error("snapshot state {path}")]
    State {
        /// The state file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// vCPU state could not be encoded as, or decoded from, bytes (a migration's device
    /// state).
    #[error("vCPU state bytes")]
    StateBytes(#[source] serde_json::Error),
    /// The snapshot does not fit the VM asked for (size, vCPUs, memory kind).
    #[error("snapshot does not fit: {0}")]
    Mismatch(String),
    /// The pager could not be started or stopped, or failed while serving.
    #[error("pager")]
    Pager(#[from] pager::Error),
    /// The pager's source could not be opened.
    #[error("pager source")]
    Source(#[from] pager::SourceError),
    /// The guest read guest memory KVM could not reach, and KVM reported it as MMIO (what
    /// the nested host here does when a page is registered in SIGBUS mode).
    #[error("vCPU {vcpu}: guest memory at {gpa:#x} came back as an MMIO read")]
    MmioRead {
        /// The vCPU.
        vcpu: usize,
        /// The guest physical address.
        gpa: u64,
    },
    /// A poisoned guest page (a page the failed pager poisoned or could not serve, or
    /// memory the hardware lost) met by the vCPU thread: its own access, or KVM's
    /// hardware-poison SIGBUS to it.
    #[error("vCPU {vcpu}: guest memory at {gpa:#x} is poisoned")]
    Poisoned {
        /// The vCPU.
        vcpu: usize,
        /// The guest physical address.
        gpa: u64,
    },
    /// `KVM_EXIT_MEMORY_FAULT`: KVM could not fault the page in and said where.
    #[error("vCPU {vcpu}: memory fault at {gpa:#x} (+{size:#x}, flags {flags:#x})")]
    MemoryFault {
        /// The vCPU.
        vcpu: usize,
        /// Guest physical address.
        gpa: u64,
        /// Size of the range.
        size: u64,
        /// KVM's flags.
        flags: u64,
    },
    /// `KVM_EXIT_INTERNAL_ERROR`: KVM could not go on (suberror 1 is an emulation
    /// failure: the nested host's emulator could not fetch or decode an instruction).
    #[error("vCPU {vcpu}: KVM internal error, suberror {suberror}, data {data:x?}")]
    Internal {
        /// The vCPU.
        vcpu: usize,
        /// `KVM_INTERNAL_ERROR_*`.
        suberror: u32,
        /// KVM's extra words (for an emulation failure: the instruction bytes, the
        /// guest physical address when known).
        data: Vec<u64>,
    },
    /// The guest did something the protocol does not allow (an exit we do not serve, a
    /// port out of turn, more reads than commands).
    #[error("vCPU {vcpu}: unexpected exit: {exit}")]
    Exit {
        /// The vCPU.
        vcpu: usize,
        /// The exit, as KVM reported it.
        exit: String,
    },
    /// The guest reported a checksum its model does not expect: memory came back wrong.
    #[error("vCPU {vcpu}: guest checksum {got:x?}, model {want:#x}")]
    Checksum {
        /// The vCPU.
        vcpu: usize,
        /// What the guest reported.
        got: Vec<u32>,
        /// What the model expects.
        want: u32,
    },
    /// A vCPU thread could not be started.
    #[error("vCPU {vcpu}: cannot start its thread")]
    Spawn {
        /// The vCPU.
        vcpu: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU thread could not be pinned to the CPU its configuration names.
    #[error("vCPU {vcpu}: cannot pin to CPU {cpu}")]
    Pin {
        /// The vCPU.
        vcpu: usize,
        /// The CPU.
        cpu: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU thread panicked.
    #[error("vCPU {0} thread panicked")]
    VcpuPanicked(usize),
}

/// A VMM result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}
