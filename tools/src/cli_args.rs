//! Command-line options shared by several subcommands.

use std::path::PathBuf;

use anyhow::Result;
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
}

impl PrefetchArgs {
    /// The prefetch plan for a pager of `pages` pages (loads the replay file).
    pub fn plan(&self, pages: usize) -> Result<Prefetch> {
        Ok(match (&self.replay, self.prefetch.as_str()) {
            (Some(path), _) => Prefetch::Replay(pager::record::load(path, pages)?),
            (None, "seq") => Prefetch::Sequential,
            (None, "eager") => Prefetch::Eager,
            (None, _) => Prefetch::None,
        })
    }

    /// Applies the plan and the recording to a pager builder.
    pub fn apply(&self, builder: PagerBuilder, pages: usize) -> Result<PagerBuilder> {
        let builder = builder.prefetch(self.plan(pages)?);
        Ok(match &self.record {
            Some(path) => builder.record(path),
            None => builder,
        })
    }
}
