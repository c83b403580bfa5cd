//! Whether a session is paused on a broken pair, and how often it resumed: what a
//! session's owner shows while it waits for the next pair.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Whether a session is paused (its connection pair broke) and how often it resumed.
#[derive(Debug, Default)]
pub struct LinkStatus {
    paused: Mutex<Option<(Instant, String)>>,
    reconnects: AtomicU64,
}

impl LinkStatus {
    /// How long it has been paused and why, if it is.
    pub fn paused(&self) -> Option<(Duration, String)> {
        let p = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        p.as_ref()
            .map(|(since, why)| (since.elapsed(), why.clone()))
    }

    /// Pairs re-established after a break, as this side counts them: once it finished its
    /// half of the greeting. A pair that breaks while the greeting is under way may count
    /// at one side only, so the two ends' counts can differ when breaks come close together.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// `side` (a name for the log) paused in `phase` over `cause`.
    pub fn pause(&self, side: &str, phase: &str, cause: &dyn std::error::Error) {
        let why = crate::chain(cause);
        log::warn!("{side}: paused in {phase}: {why}");
        *self.paused.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), why));
    }

    /// `side` resumed on a new pair.
    pub fn resumed(&self, side: &str) {
        let was = self.paused.lock().unwrap_or_else(|p| p.into_inner()).take();
        let n = self.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
        let after = was.map_or(Duration::ZERO, |(since, _)| since.elapsed());
        log::info!("{side}: resumed after {after:.2?} (reconnection {n})");
    }
}
