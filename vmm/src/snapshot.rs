//! Snapshots: the vCPUs' registers and special registers (`vm.json`) and guest memory as
//! one raw file (`memory.raw`, guest physical address = file offset), in a directory.
//!
//! A snapshot is taken with every vCPU halted (between [`Vm::run`] calls, which always end
//! on the guest's `hlt`), so no I/O is half done and the registers are the whole vCPU
//! state this guest has. Files are written under a temporary name, 0600 (they hold guest
//! memory), and renamed once complete.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_regs, kvm_sregs};
use pager::MemoryKind;
use serde::{Deserialize, Serialize};

use crate::error::{kvm, Error, Result};
use crate::vm::Vm;

/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory.raw";
/// The vCPU state file's name in a snapshot directory.
pub const STATE_FILE: &str = "vm.json";

/// One vCPU's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers (segments, control registers).
    pub sregs: kvm_sregs,
}

/// What `vm.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Guest memory in MiB.
    pub mib: usize,
    /// One entry per vCPU.
    pub vcpus: Vec<VcpuState>,
}

impl VmState {
    /// Writes `vm.json` into `dir` (0600, under a temporary name, then renamed).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        let json = serde_json::to_vec(self).map_err(|source| Error::State { path, source })?;
        write_new(dir, STATE_FILE, |file| file.write_all(&json))
    }

    /// The state as bytes: what a migration carries at the switch (postcopy's RUN).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(Error::StateBytes)
    }

    /// The state from [`to_bytes`](Self::to_bytes)' bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<VmState> {
        serde_json::from_slice(bytes).map_err(Error::StateBytes)
    }

    /// Reads `vm.json` from a snapshot directory.
    pub fn load(dir: &Path) -> Result<VmState> {
        let path = dir.join(STATE_FILE);
        let file = File::open(&path).map_err(|source| Error::File {
            path: path.clone(),
            source,
        })?;
        serde_json::from_reader(std::io::BufReader::new(file))
            .map_err(|source| Error::State { path, source })
    }
}

/// Writes `dir/name` through `write` under a temporary name created 0600 with `O_EXCL`,
/// then renames it into place.
fn write_new(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let err = |path: &PathBuf| {
        let path = path.clone();
        move |source| Error::File { path, source }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(o_nofollow())
        .open(&tmp)
        .map_err(err(&tmp))?;
    let written = write(&mut file).and_then(|()| file.sync_all());
    if let Err(source) = written {
        if let Err(e) = std::fs::remove_file(&tmp) {
            log::warn!("cannot remove {}: {e}", tmp.display());
        }
        return Err(Error::File { path: tmp, source });
    }
    std::fs::rename(&tmp, &path).map_err(err(&path))
}

/// How much guest memory a snapshot copies out per write.
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// Copies `out.len()` bytes from `from` with volatile word reads (memory that may change
/// while it is read).
///
/// # Safety
///
/// `[from, from + out.len())` is readable, `from` 8-byte aligned and `out.len()` a
/// multiple of 8.
unsafe fn copy_out(from: *const u8, out: &mut [u8]) {
    for (i, word) in out.chunks_exact_mut(8).enumerate() {
        // SAFETY: the caller's promise: an aligned word inside the range.
        let w = unsafe { std::ptr::read_volatile(from.cast::<u64>().add(i)) };
        word.copy_from_slice(&w.to_ne_bytes());
    }
}

fn o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

impl Vm {
    /// Saves the halted VM into `dir` (which must exist): vCPU state and all of guest
    /// memory. Pages a lazy restore has not placed yet are read through the pager.
    ///
    /// No vCPU runs meanwhile (`run` takes `&mut self`), but other code holding
    /// [`Vm::memory`] may change guest memory as it is read (a migration destination's
    /// discard, `Mapping::madvise`): the snapshot is then torn, and consistent only if
    /// nothing does.
    pub fn snapshot(&self, dir: &Path) -> Result<()> {
        let state = self.state()?;
        let memory = self.memory();
        // Memory first: a `vm.json` beside it says the snapshot is complete.
        write_new(dir, MEMORY_FILE, |file| {
            // Copied out a chunk at a time, never held as a `&[u8]`, whose bytes must not
            // change while it lives: these may (see above).
            let mut chunk = vec![0u8; SNAPSHOT_CHUNK.min(memory.len())];
            for at in (0..memory.len()).step_by(chunk.len()) {
                let n = chunk.len().min(memory.len() - at);
                // SAFETY: `[at, at + n)` is inside the mapping, live for `&self`, and
                // 8-byte aligned in whole words (page-aligned mapping, chunks of pages).
                unsafe { copy_out(memory.as_ptr().add(at), &mut chunk[..n]) };
                file.write_all(&chunk[..n])?;
            }
            Ok(())
        })?;
        state.save(dir)
    }

    /// The vCPUs' state now (the VM halted): what travels with the memory.
    pub fn state(&self) -> Result<VmState> {
        let vcpus = self
            .vcpus()
            .iter()
            .map(|vcpu| {
                Ok(VcpuState {
                    regs: vcpu.get_regs().map_err(kvm("get regs"))?,
                    sregs: vcpu.get_sregs().map_err(kvm("get sregs"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(VmState {
            mib: self.config().mib,
            vcpus,
        })
    }

    /// Puts saved vCPU state into this VM's vCPUs (a migration destination's, at RUN).
    pub fn load_state(&self, state: &VmState) -> Result<()> {
        self.load_vcpus(state)
    }

    /// Puts saved vCPU state into this VM's vCPUs.
    pub(crate) fn load_vcpus(&self, state: &VmState) -> Result<()> {
        if state.vcpus.len() != self.vcpus().len() || state.mib != self.config().mib {
            return Err(Error::Mismatch(format!(
                "snapshot of {} vCPUs and {} MiB, VM of {} and {}",
                state.vcpus.len(),
                state.mib,
                self.vcpus().len(),
                self.config().mib
            )));
        }
        for (vcpu, saved) in self.vcpus().iter().zip(&state.vcpus) {
            vcpu.set_sregs(&saved.sregs).map_err(kvm("set sregs"))?;
            vcpu.set_regs(&saved.regs).map_err(kvm("set regs"))?;
        }
        Ok(())
    }
}

/// Whether memory of `kind` can hold a snapshot of `mib` MiB (hugetlb needs whole 2 MiB
/// pages).
pub(crate) fn fits(kind: MemoryKind, mib: usize) -> bool {
    (mib << 20) % kind.page_size() == 0
}
