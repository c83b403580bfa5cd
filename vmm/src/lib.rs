//! # vmm: the pager embedded in a minimal KVM VMM
//!
//! A VMM of our own on rust-vmm's `kvm-ioctls`, small enough to read in one sitting, that
//! runs a tiny guest of our own ([`guest`]: hand-assembled 32-bit code that fills guest
//! memory with per-page values and reports checksums over port I/O), snapshots it
//! ([`snapshot`]: vCPU registers and a raw memory file) and restores it eagerly or lazily
//! ([`restore`]): guest memory registered with the [`pager`], the vCPU thread blocking in
//! `KVM_RUN` while the handler thread places the page the guest (or KVM on its behalf)
//! touched — from the memory file, or from any pager `Source` ([`Vm::restore_from`]: a
//! page server, a chunked image). In SIGBUS mode the vCPU thread resolves what KVM could
//! not reach itself (`in_thread.rs`). The guest's own checksum, against [`GuestModel`],
//! says the restore was right. [`bench`](mod@bench) times lazy against eager restore.
//! [`Vm::run_until`], [`VmState::to_bytes`] and [`Vm::memory`] are what a live migration
//! needs: a guest that keeps working while precopy runs, its vCPU state as the device
//! state postcopy's RUN carries, and the VM's own guest memory (already KVM's memory slot)
//! for the migration destination to register and fill (`Destination::with_memory`). The
//! `uffdkit-vmm` program's `migrate-in`/`migrate-out` commands (in the tools package,
//! `tools/src/bin/uffdkit-vmm/`) and `tests/migrate.rs` use `postcopy` with them; this library prints
//! nothing (it logs).
//!
//! Why a VMM and not a thread touching memory: KVM resolves a guest access through the
//! host page tables from inside `KVM_RUN`, so the uffd fault comes from the kernel, on a
//! thread the VMM owns, with vCPU state that must travel beside the memory. This crate is
//! the worked example of embedding the pager there, using only its public API.
//!
//! ```no_run
//! use vmm::{Command, GuestModel, Restore, Vm, VmConfig};
//!
//! let config = VmConfig::new(16);
//! let pages = config.data_pages();
//! let mut vm = Vm::boot(config.clone())?;
//! let fill = Command::Fill { first: 0, pages, seed: 42, stride: 1 };
//! vm.run(&[vec![fill]])?;
//! let dir = std::env::temp_dir().join("uffdkit-vmm-doc");
//! std::fs::create_dir_all(&dir)?;
//! vm.snapshot(&dir)?;
//!
//! let mut restored = Vm::restore(&dir, config, Restore::LAZY)?;
//! let report = restored.run(&[vec![Command::Checksum { first: 0, pages }]])?;
//! let mut model = GuestModel::new(pages);
//! model.apply(fill);
//! assert_eq!(report[0].results, [model.checksum(0, pages)]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bench;
pub mod error;
pub mod guest;
mod in_thread;
mod poison;
pub mod restore;
pub mod snapshot;
pub mod vm;

pub use error::{Error, Result};
pub use guest::{Command, GuestModel};
pub use restore::{Lazy, Restore};
pub use snapshot::VmState;
pub use vm::{RunReport, Vm, VmConfig};
