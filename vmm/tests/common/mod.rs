//! Shared by the VMM's tests: the KVM check and snapshot directories.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

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
