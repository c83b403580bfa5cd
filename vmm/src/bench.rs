//! Restore figures: restore-to-first-instruction and the first full pass over guest
//! memory, lazy (through the pager) against eager (copy the memory file, then run), each
//! run checked by the guest's checksum.
//!
//! "First instruction" is the first return from `KVM_RUN` for the guest's own port I/O:
//! the guest has fetched its code page and run up to its first `in` (three instructions
//! after the `hlt` it was saved at). In SIGBUS mode the faults the vCPU thread resolved
//! on the way (the code page's) come before it, not at it.
//! "First full pass" ends when every vCPU has reported the checksum of all its pages. Both
//! are timed from the start of the restore (reading `vm.json`, mapping memory, creating the
//! VM and, for lazy, starting the pager). The memory file is in the page cache for both.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::guest::{Command, GuestModel};
use crate::restore::Restore;
use crate::vm::{Vm, VmConfig};

/// One restore's figures.
#[derive(Debug, Clone, Copy)]
pub struct RestoreTiming {
    /// Restore start to the first vCPU's first `KVM_RUN` return for its own port I/O.
    pub first_instruction: Duration,
    /// Restore start to every vCPU's checksum of all its pages.
    pub full_pass: Duration,
}

/// Each vCPU's share of the data pages: `(first, pages)`.
pub fn shares(config: &VmConfig) -> Vec<(u32, u32)> {
    let per = config.data_pages() / config.vcpus as u32;
    (0..config.vcpus as u32).map(|i| (i * per, per)).collect()
}

/// Boots a guest of `config`, fills all its data pages (each vCPU its share, seeded by its
/// index), snapshots it into `dir` and returns the model of its memory.
pub fn prepare(config: &VmConfig, dir: &Path) -> Result<GuestModel> {
    let mut vm = Vm::boot(config.clone())?;
    let mut model = GuestModel::new(config.data_pages());
    let programs: Vec<_> = shares(config)
        .into_iter()
        .enumerate()
        .map(|(i, (first, pages))| {
            vec![Command::Fill {
                first,
                pages,
                seed: 0xc0de_0000 | i as u32,
                stride: 1,
            }]
        })
        .collect();
    vm.run(&programs)?;
    programs.iter().flatten().for_each(|&c| model.apply(c));
    vm.snapshot(dir)?;
    Ok(model)
}

/// Restores the snapshot in `dir` once, runs a checksum of every page on every vCPU, and
/// checks it against `model`.
pub fn time_restore(
    dir: &Path,
    config: &VmConfig,
    how: &Restore,
    model: &GuestModel,
) -> Result<RestoreTiming> {
    let start = Instant::now();
    let mut vm = Vm::restore(dir, config.clone(), how.clone())?;
    let shares = shares(config);
    let programs: Vec<_> = shares
        .iter()
        .map(|&(first, pages)| vec![Command::Checksum { first, pages }])
        .collect();
    let reports = vm.run(&programs)?;
    let full_pass = start.elapsed();
    let first = reports
        .iter()
        .map(|r| r.first_exit)
        .min()
        .expect("a VM has a vCPU");
    for (vcpu, (report, &(first, pages))) in reports.iter().zip(&shares).enumerate() {
        let want = model.checksum(first, pages);
        if report.results != [want] {
            return Err(Error::Checksum {
                vcpu,
                got: report.results.clone(),
                want,
            });
        }
    }
    if let Some(pager) = vm.take_pager() {
        let stats = pager.stop()?;
        log::debug!("lazy restore: {stats:?}");
    }
    Ok(RestoreTiming {
        first_instruction: first - start,
        full_pass,
    })
}

/// The median of some durations (the upper one of an even count).
pub fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}
