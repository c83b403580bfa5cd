//! Outputs that are complete or absent: a file is written under a temporary name in its
//! own directory (`O_EXCL`, 0600, unguessable: [`uffd_core::private_fs::create_temp_for`])
//! and renamed to its name only once complete. A failure drops it (removed); SIGINT,
//! SIGTERM or SIGHUP removes every one still being written ([`remove_on_termination`]).
//! A sparse snapshot that stopped half-way would otherwise look whole: its unsaved pages
//! are holes, and holes read as zero pages.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};

/// Temporary files being written, for the termination handler to remove.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes the outputs still being written when SIGINT, SIGTERM or SIGHUP arrives (then
/// exits 128 + signal). Same rule as [`crate::signals::on_termination`]: call it before
/// the command starts any thread.
pub fn remove_on_termination() -> Result<()> {
    crate::signals::on_termination(|_| {
        for path in pending().drain(..) {
            if let Err(e) = std::fs::remove_file(&path) {
                log::warn!("remove the partial output {}: {e}", path.display());
            }
        }
    })
}

/// An output file being written under a temporary name (see the module docs).
#[derive(Debug)]
pub struct PartialOutput {
    temp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl PartialOutput {
    /// Creates the temporary file for `dest` in `dest`'s directory; returns it, empty.
    pub fn create(dest: &Path) -> Result<(File, PartialOutput)> {
        // Registered under the lock, so a signal sees it as soon as it exists.
        let mut pending = pending();
        let (file, temp) = uffd_core::private_fs::create_temp_for(dest)
            .with_context(|| format!("create a temporary file for {}", dest.display()))?;
        pending.push(temp.clone());
        Ok((
            file,
            PartialOutput {
                temp,
                dest: dest.to_owned(),
                committed: false,
            },
        ))
    }

    /// Where the output is being written.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// The output is complete: renames it to its name.
    pub fn commit(mut self) -> Result<()> {
        // Under the lock: a termination either removed the file before, or finds it
        // renamed and no longer pending.
        let mut pending = pending();
        std::fs::rename(&self.temp, &self.dest).with_context(|| {
            format!("rename {} to {}", self.temp.display(), self.dest.display())
        })?;
        pending.retain(|p| p != &self.temp);
        self.committed = true;
        Ok(())
    }
}

impl Drop for PartialOutput {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let mut pending = pending();
        pending.retain(|p| p != &self.temp);
        if let Err(e) = std::fs::remove_file(&self.temp) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("remove the partial output {}: {e}", self.temp.display());
            }
        }
    }
}
