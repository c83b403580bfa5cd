//! Which precopy pages the destination has confirmed.
//!
//! A page written into a socket is not a page delivered: a connection that freezes holds
//! whatever sits in its buffers (and in a proxy's, or a middlebox's) and delivers none of
//! it, and the destination's present-set cannot tell an old version of a page from the
//! new one that died on the way. So precopy sends a SYNC after every few MiB of pages and
//! at the end of every round; the destination answers SYNCED once everything before it on
//! the connection has landed. Pages sent since the last SYNCED are *unconfirmed*: after a
//! break they count as dirty (sent again, or discarded at the switch if it comes first),
//! whatever the destination's present-set says.
//!
//! SYNCED is also the source's measure of progress (`headway.rs`), so SYNCs must be close
//! enough, in bytes, that one lands well within the give-up bound on a slow link. Close in
//! time is not enough: a SYNC sent after a second sits behind whatever the kernel's (and
//! any middlebox's) buffers took before it — a few MiB on loopback, taken at once — and
//! lands only when the link has carried all of it. So the spacing is in bytes and adapts to
//! how fast confirmations come: each pair starts at [`SYNC_FIRST`] (its first SYNC
//! lands after that much, however deep the buffers), the spacing doubles while
//! confirmations come within a quarter of the pace (a fast link: up to [`SYNC_EVERY`]) and
//! halves when one took more than half of it. The precopy sends its pages in pieces of the
//! spacing, so no frame outgrows it either (a frame is one send, which the transport cuts
//! at the silence deadline).

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::error::Refusal;
use crate::Error;

/// The most page bytes between two SYNCs (on a fast link): what a break may cost to send
/// again, besides what sits in flight.
pub(super) const SYNC_EVERY: u64 = 4 << 20;

/// The fewest page bytes between two SYNCs, and what each pair starts with.
pub(super) const SYNC_FIRST: u64 = 16 << 10;

/// Runs of pages sent and not yet confirmed, grouped by the SYNC that follows them.
#[derive(Debug)]
pub(super) struct Unconfirmed {
    /// Groups closed by a SYNC, oldest first: its sequence number and the runs before it.
    marked: VecDeque<(u64, Vec<Range<usize>>)>,
    /// Runs sent since the last SYNC.
    open: Vec<Range<usize>>,
    /// Their page bytes.
    open_bytes: u64,
    /// The last SYNC's sequence number (session-wide, never reused).
    last_seq: u64,
    /// Page bytes between two SYNCs now.
    spacing: u64,
    /// How often confirmations should come: the spacing follows it.
    pace: Duration,
    /// When the last confirmation came (or the pair began).
    heard: Instant,
}

impl Unconfirmed {
    /// Nothing sent yet; SYNCs spaced for confirmations every `pace` or so.
    pub fn new(pace: Duration) -> Unconfirmed {
        Unconfirmed {
            marked: VecDeque::new(),
            open: Vec::new(),
            open_bytes: 0,
            last_seq: 0,
            spacing: SYNC_FIRST,
            pace,
            heard: Instant::now(),
        }
    }

    /// A new pair begins: nothing is known of its speed.
    pub fn new_pair(&mut self) {
        self.spacing = SYNC_FIRST;
        self.heard = Instant::now();
    }

    /// Page bytes to send before the next SYNC: the most a piece of precopy should hold.
    pub fn spacing(&self) -> u64 {
        self.spacing
    }

    /// Records `run` (`bytes` of pages) as sent and not yet confirmed; call before
    /// sending it.
    pub fn sending(&mut self, run: Range<usize>, bytes: u64) {
        self.open_bytes += bytes;
        match self.open.last_mut() {
            Some(last) if last.end == run.start => last.end = run.end,
            _ => self.open.push(run),
        }
    }

    /// Whether enough was sent since the last SYNC that another is due.
    pub fn due(&self) -> bool {
        self.open_bytes >= self.spacing
    }

    /// Closes the open group; returns the SYNC's sequence number to send, or `None` if
    /// nothing was sent since the last one.
    pub fn mark(&mut self) -> Option<u64> {
        if self.open.is_empty() {
            return None;
        }
        Some(self.barrier())
    }

    /// Closes the open group, even an empty one: the SYNC to send after a message whose
    /// application must be confirmed (DISCARD lands in order with pages).
    pub fn barrier(&mut self) -> u64 {
        self.last_seq += 1;
        let runs = std::mem::take(&mut self.open);
        self.marked.push_back((self.last_seq, runs));
        self.open_bytes = 0;
        self.last_seq
    }

    /// Whether SYNC `seq` (one sent) was confirmed.
    pub fn confirmed(&self, seq: u64) -> bool {
        !self.marked.iter().any(|&(s, _)| s == seq)
    }

    /// SYNCED `seq`: every group up to it is delivered. A sequence number never sent, or
    /// one confirmed already, is refused (a confused or replaying peer).
    pub fn confirm(&mut self, seq: u64) -> Result<(), Error> {
        if !self.marked.iter().any(|&(s, _)| s == seq) {
            return Err(Error::refused(Refusal::Confirmation { seq }));
        }
        while self.marked.front().is_some_and(|&(s, _)| s <= seq) {
            self.marked.pop_front();
        }
        let gap = std::mem::replace(&mut self.heard, Instant::now()).elapsed();
        if gap < self.pace / 4 {
            self.spacing = (self.spacing * 2).min(SYNC_EVERY);
        } else if gap > self.pace / 2 {
            self.spacing = (self.spacing / 2).max(SYNC_FIRST);
        }
        Ok(())
    }

    /// Every run not confirmed (after a break: to count as dirty), leaving none.
    pub fn take_all(&mut self) -> impl Iterator<Item = Range<usize>> {
        self.open_bytes = 0;
        let open = std::mem::take(&mut self.open);
        std::mem::take(&mut self.marked)
            .into_iter()
            .flat_map(|(_, runs)| runs)
            .chain(open)
    }

    /// Everything is delivered without a SYNCED (the destination acknowledged a later
    /// message on the same connection, which it handles only after landing every page
    /// before it).
    pub fn confirm_all(&mut self) {
        self.marked.clear();
        self.open.clear();
        self.open_bytes = 0;
    }

    /// Pages sent and not confirmed.
    #[cfg(test)]
    fn pages(&self) -> usize {
        let marked = self.marked.iter().flat_map(|(_, r)| r);
        marked.chain(&self.open).map(|r| r.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmation_covers_every_group_up_to_it_and_no_later_one() {
        let mut u = Unconfirmed::new(Duration::from_secs(1));
        u.sending(0..10, 10 * 4096);
        let a = u.mark().expect("a group");
        u.sending(10..20, 10 * 4096);
        u.sending(20..25, 5 * 4096); // adjacent: merged into one run
        let b = u.mark().expect("a group");
        u.sending(40..41, 4096);
        assert_eq!(u.pages(), 26);
        u.confirm(a).unwrap();
        assert_eq!(u.pages(), 16);
        assert!(u.confirm(a).is_err(), "confirmed twice");
        assert!(u.confirm(b + 7).is_err(), "never sent");
        let left: Vec<_> = u.take_all().collect();
        assert_eq!(left, vec![10..25, 40..41]);
        assert_eq!(u.pages(), 0);
        assert_eq!(u.mark(), None, "nothing open");
        let c = u.barrier();
        assert!(!u.confirmed(c), "an empty group waits for its SYNCED too");
        u.confirm(c).unwrap();
        assert!(u.confirmed(c));
    }

    #[test]
    fn a_sync_is_due_after_the_spacing_which_starts_at_sync_first() {
        let mut u = Unconfirmed::new(Duration::from_secs(1));
        assert_eq!(u.spacing(), SYNC_FIRST);
        u.sending(0..1, SYNC_FIRST - 1);
        assert!(!u.due());
        u.sending(1..2, 1);
        assert!(u.due());
        u.mark();
        assert!(!u.due());
    }

    /// Confirmations that come fast widen the spacing up to `SYNC_EVERY`; a slow one
    /// narrows it, never below `SYNC_FIRST`; a new pair starts again at `SYNC_FIRST`.
    #[test]
    fn the_spacing_follows_how_fast_confirmations_come() {
        let pace = Duration::from_millis(400);
        let mut u = Unconfirmed::new(pace);
        for p in 0..20 {
            u.sending(p..p + 1, 4096);
            let seq = u.barrier();
            u.confirm(seq).unwrap(); // at once: a fast link
        }
        assert_eq!(u.spacing(), SYNC_EVERY);
        std::thread::sleep(pace); // more than half the pace: slow
        let seq = u.barrier();
        u.confirm(seq).unwrap();
        assert_eq!(u.spacing(), SYNC_EVERY / 2);
        u.new_pair();
        assert_eq!(u.spacing(), SYNC_FIRST);
        std::thread::sleep(pace);
        let seq = u.barrier();
        u.confirm(seq).unwrap();
        assert_eq!(u.spacing(), SYNC_FIRST, "never below SYNC_FIRST");
    }
}
