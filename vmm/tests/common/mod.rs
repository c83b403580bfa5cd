//! Shared by the VMM's tests: the KVM check, snapshot directories, the guest's programs
//! and their check against the model.
// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::guest::{DATA_GPA, GUEST_PAGE};
use vmm::{Command, GuestModel, Vm, VmConfig};

/// Whether `/dev/kvm` can be opened; if not, reports the skip loudly.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            testkit::skip(test, &format!("/dev/kvm: {e}"));
            false
        }
    }
}

/// A fresh 0700 directory for one test's snapshot, removed on drop.
pub struct SnapshotDir(PathBuf);

impl SnapshotDir {
    pub fn new(test: &str) -> Self {
        let path = std::env::temp_dir().join(format!("uffdkit-vmm-{test}-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).expect("remove a stale snapshot directory");
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .expect("create the snapshot directory");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SnapshotDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("cannot remove {}: {e}", self.0.display());
        }
    }
}

/// Data pages `[first, first + pages)` of vCPU `index` among `vcpus`: each its own share.
pub fn share(config: &VmConfig, index: usize) -> (u32, u32) {
    let per = config.data_pages() / config.vcpus as u32;
    (index as u32 * per, per)
}

/// Runs `programs` (one per vCPU), applies them to the model and checks every checksum
/// the guest reported against it.
pub fn run_checked(vm: &mut Vm, model: &mut GuestModel, programs: &[Vec<Command>]) {
    let reports = vm.run(programs).expect("the guest runs its programs");
    for (index, (program, report)) in programs.iter().zip(&reports).enumerate() {
        let mut results = report.results.iter();
        for &command in program {
            let got = *results.next().expect("a result per command");
            match command {
                Command::Fill { .. } => {
                    model.apply(command);
                    assert_eq!(got, 1, "vCPU {index}: fill reports its command number");
                }
                Command::Checksum { first, pages } => assert_eq!(
                    got,
                    model.checksum(first, pages),
                    "vCPU {index}: checksum of pages {first}+{pages}"
                ),
                Command::Halt => unreachable!("programs end in a halt of their own"),
            }
        }
    }
}

/// Every vCPU fills its share, rewrites every 7th page with a second seed, and checksums.
pub fn fill_programs(config: &VmConfig, round: u32) -> Vec<Vec<Command>> {
    (0..config.vcpus)
        .map(|i| {
            let (first, pages) = share(config, i);
            vec![
                Command::Fill {
                    first,
                    pages,
                    seed: 0x5eed_0000 + round * 16 + i as u32,
                    stride: 1,
                },
                Command::Fill {
                    first: first + 3,
                    pages: (pages - 3).div_ceil(7),
                    seed: 0xbeef_0000 + round * 16 + i as u32,
                    stride: 7,
                },
                Command::Checksum { first, pages },
            ]
        })
        .collect()
}

pub fn checksum_programs(config: &VmConfig) -> Vec<Vec<Command>> {
    (0..config.vcpus)
        .map(|i| {
            let (first, pages) = share(config, i);
            vec![Command::Checksum { first, pages }]
        })
        .collect()
}

/// Boots, runs a round of fills and snapshots; returns the model of the snapshot.
pub fn boot_and_snapshot(config: &VmConfig, dir: &SnapshotDir) -> GuestModel {
    let mut vm = Vm::boot(config.clone()).expect("boot the guest");
    let mut model = GuestModel::new(config.data_pages());
    run_checked(&mut vm, &mut model, &fill_programs(config, 0));
    vm.snapshot(dir.path()).expect("snapshot the guest");
    model
}

/// The pager's page index of data page `page`.
pub fn pager_page(config: &VmConfig, page: u32) -> usize {
    ((DATA_GPA + u64::from(page) * GUEST_PAGE) / config.kind.page_size() as u64) as usize
}

/// How long a page the guest read may take to show placed (see `Pager::wait_placed`).
pub const SETTLE: Duration = Duration::from_secs(10);
