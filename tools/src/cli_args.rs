//! Command-line options shared by several subcommands.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use pager::{DeliveryMode, PagerBuilder, Prefetch};

/// Delivery modes as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One handler thread blocking in poll.
    Thread,
    /// One busy-polling handler thread.
    Poll,
    /// One pinned handler per CPU.
    Percpu,
    /// SIGBUS in the faulting thread (in-process memory only).
    Sigbus,
}

impl From<Mode> for DeliveryMode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Thread => DeliveryMode::Thread,
            Mode::Poll => DeliveryMode::BusyPoll,
            Mode::Percpu => DeliveryMode::PerCpu,
            Mode::Sigbus => DeliveryMode::Sigbus,
        }
    }
}

/// Delivery modes that serve another process's memory: handler threads (not SIGBUS,
/// which resolves faults inside the faulting process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerMode {
    /// One handler thread blocking in poll.
    Thread,
    /// One busy-polling handler thread.
    Poll,
    /// One pinned handler per CPU.
    Percpu,
}

impl From<HandlerMode> for DeliveryMode {
    fn from(mode: HandlerMode) -> Self {
        match mode {
            HandlerMode::Thread => DeliveryMode::Thread,
            HandlerMode::Poll => DeliveryMode::BusyPoll,
            HandlerMode::Percpu => DeliveryMode::PerCpu,
        }
    }
}

/// Background prefetch and working-set recording.
#[derive(clap::Args, Debug, Clone)]
pub struct PrefetchArgs {
    /// Background prefetch: none; seq (sequential, behind the faults); eager (everything
    /// at full priority, the copy-it-all baseline).
    #[arg(long, default_value = "seq", value_parser = ["none", "seq", "eager"])]
    pub prefetch: String,
    /// Replay this recorded working set first (then sequential).
    #[arg(long)]
    pub replay: Option<PathBuf>,
    /// Record the order of first faults to this file (written when serving ends).
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Pages placed after each faulting page, with the same fetch and one ioctl.
    #[arg(long, default_value_t = 0, value_name = "PAGES")]
    pub fault_around: usize,
    /// No sequential readahead (by default a fault right after the previous run doubles
    /// the run placed after it, up to 2 MiB: a sequential fault stream becomes large
    /// placements, a random one costs nothing extra).
    #[arg(long)]
    pub no_readahead: bool,
}

impl PrefetchArgs {
    /// Checks what can be checked before the page count is known: the replay file is
    /// a readable working set, the record path can be written.
    pub fn check(&self) -> Result<()> {
        if let Some(path) = &self.replay {
            load_replay(path, usize::MAX)?;
        }
        if let Some(path) = &self.record {
            pager::record::check_writable(path)
                .with_context(|| format!("record file {}", path.display()))?;
        }
        Ok(())
    }

    /// The prefetch plan for a pager of `pages` pages (loads the replay file).
    pub fn plan(&self, pages: usize) -> Result<Prefetch> {
        Ok(match (&self.replay, self.prefetch.as_str()) {
            (Some(path), _) => Prefetch::Replay(load_replay(path, pages)?),
            (None, "seq") => Prefetch::Sequential,
            (None, "eager") => Prefetch::Eager,
            (None, _) => Prefetch::None,
        })
    }

    /// Applies the plan and the recording to a pager builder.
    pub fn apply(&self, builder: PagerBuilder, pages: usize) -> Result<PagerBuilder> {
        let builder = builder
            .prefetch(self.plan(pages)?)
            .fault_around(self.fault_around)
            .readahead(!self.no_readahead);
        Ok(match &self.record {
            Some(path) => builder.record(path),
            None => builder,
        })
    }
}

/// Loads a working-set file (the library's error names the file; a FIFO or device at the
/// path is refused, not waited on).
fn load_replay(path: &Path, pages: usize) -> Result<Vec<u64>> {
    pager::record::load(path, pages).context("cannot use the --replay file")
}
