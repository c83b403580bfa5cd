//! Whether the migration gets anywhere: what the source's give-up bound runs from.
//!
//! A new pair is not progress. A path that accepts every pair and lets none carry anything
//! (frozen or reset right after the greeting, a proxy in between) would otherwise keep
//! the source reconnecting forever, each break restarting the bound. Progress is what the
//! destination confirms: precopy pages by SYNCED (unconfirmed ones are sent again after a
//! break whatever arrived), a step acknowledged (LISTEN, RUN, the verdict), and after the
//! switch pages it holds that it did not hold before — which, postcopy pages being
//! acknowledged by nothing, only the next pair's greeting tells (RECV_BITMAP). So a pair
//! that sent what only that greeting can confirm (postcopy pages, LISTEN, RUN, SHUT) counts
//! as progress at its break until the greeting shows that none of it landed. The stop of
//! the source's own workload counts too: a step taken once, whose time is the embedder's,
//! not the destination's. And so does a postcopy pair that was up and idle (demand-only,
//! no request): it had nothing to deliver, so its time is the workload's, not a stall —
//! but only if it lived two silence deadlines after its greeting, which a pair frozen or
//! cut right after it never does (a frozen one breaks one deadline after its last byte).

use std::time::{Duration, Instant};

/// The last progress, and what the current pair did towards the next.
#[derive(Debug)]
pub(super) struct Headway {
    /// [`Timing::give_up_after`](crate::migrate::Timing::give_up_after).
    after: Duration,
    /// When the migration last progressed.
    at: Instant,
    /// The current pair progressed (or its greeting showed that the last one did).
    on_pair: bool,
    /// The current pair sent what only the next greeting can confirm.
    sent: bool,
    /// When the last pair broke, if it had sent such.
    unknown: Option<Instant>,
    /// When the current pair was greeted.
    greeted_at: Instant,
    /// The most pages the destination held since it handled LISTEN, as far as known.
    held: u64,
}

impl Headway {
    /// No progress yet: the bound runs from now.
    pub fn new(after: Duration) -> Headway {
        Headway {
            after,
            at: Instant::now(),
            on_pair: false,
            sent: false,
            unknown: None,
            greeted_at: Instant::now(),
            held: 0,
        }
    }

    /// The current pair broke with nothing to deliver on it (the caller knows: postcopy
    /// after RUN, no page sent on it, no verdict awaited): if it lived two silence
    /// deadlines (`silence`) or more since its greeting, it was up and idle, and counts as
    /// progress at its break. Call before [`Headway::broke`].
    pub fn idle_for(&mut self, silence: Duration) {
        if self.greeted_at.elapsed() >= 2 * silence {
            self.made();
        }
    }

    /// The destination confirmed something just now (or the workload stopped).
    pub fn made(&mut self) {
        self.at = Instant::now();
        self.on_pair = true;
    }

    /// The current pair sent what only the next greeting can confirm.
    pub fn sent(&mut self) {
        self.sent = true;
    }

    /// The destination holds `pages` once it handled LISTEN (set at the switch's plan).
    pub fn listening_with(&mut self, pages: u64) {
        self.held = pages;
    }

    /// The current pair broke. Returns whether it progressed (the next pair is then
    /// dialed at once).
    pub fn broke(&mut self) -> bool {
        self.unknown = std::mem::take(&mut self.sent).then(Instant::now);
        std::mem::take(&mut self.on_pair)
    }

    /// Where the give-up bound runs from: the last progress, or the last break if that
    /// pair sent what only the next greeting can confirm.
    pub fn since(&self) -> Instant {
        self.unknown.unwrap_or(self.at)
    }

    /// Whether `give_up_after` has passed since [`Headway::since`]: time to give up.
    pub fn passed(&self) -> bool {
        self.since().elapsed() >= self.after
    }

    /// A new pair was greeted with the destination's present pages (counted, if it handled
    /// LISTEN) and `stepped`: whether it reported a step we had not heard acknowledged.
    /// The bound runs from the last progress again ([`Headway::since`]): from the last
    /// break if either shows that the last pair got somewhere, else from before it.
    pub fn greeted(&mut self, present: Option<u64>, stepped: bool) {
        let more = present.is_some_and(|n| n > self.held);
        self.held = self.held.max(present.unwrap_or(0));
        let unknown = self.unknown.take();
        self.sent = false;
        self.greeted_at = Instant::now();
        self.on_pair = more || stepped;
        if self.on_pair {
            // It landed on the last pair: at the latest when that pair broke.
            self.at = unknown.unwrap_or_else(Instant::now);
        }
    }
}
