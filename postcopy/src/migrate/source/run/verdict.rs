//! The end of a migration: the destination's digests checked against the final content,
//! the verdict, and the close that lets the destination hear it.

use super::*;

impl Run<'_> {
    /// Checks DIGESTS against the final content until every page is checked; returns
    /// the pages that differ, in order, and how many the destination's workload dropped
    /// before they landed ([`DROPPED`](crate::wire::DROPPED): not checked). Each page is read from memory again (its final
    /// content, whatever was sent), in pieces on two threads: the pages are cold by now,
    /// and one thread reading them all was most of the time from END to the verdict.
    pub(super) fn digests(&self, pair: &Pair) -> Result<(Vec<u64>, u64), Error> {
        const PIECE: usize = 512;
        let (mut checked, bad) = (0, Mutex::new(Vec::new()));
        let mut dropped = 0;
        let helper = pager::Helper::new("pc-verify");
        while checked < self.memory.pages {
            match pair.wait()? {
                (_, Message::Digests { first, digests }) => {
                    if checked == 0 {
                        event!(self.m.control, Digests);
                    }
                    self.progress().set_phase(Phase::Verifying);
                    dropped += digests.iter().filter(|&&d| d == DROPPED).count() as u64;
                    helper.for_each(digests.len().div_ceil(PIECE), |k| {
                        let at = k * PIECE;
                        let piece = &digests[at..digests.len().min(at + PIECE)];
                        let first = first + at as u64;
                        let differ = (first..)
                            .zip(piece)
                            .filter(|&(p, &d)| d != DROPPED && self.memory.digest(p) != d);
                        let differ: Vec<u64> = differ.map(|(p, _)| p).collect();
                        if !differ.is_empty() {
                            bad.lock().unwrap_or_else(|p| p.into_inner()).extend(differ);
                        }
                        Ok::<_, Error>(())
                    })?;
                    checked += digests.len() as u64;
                }
                (channel, other) => return Err(unexpected(other, "DIGESTS", channel)),
            }
        }
        let mut bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
        bad.sort_unstable();
        Ok((bad, dropped))
    }

    /// Sends the verdict; a match waits for the destination to acknowledge it.
    pub(super) fn verdict(
        &mut self,
        pair: &Pair,
        (bad, dropped): (Vec<u64>, u64),
    ) -> Result<(), Error> {
        let pages = self.memory.pages;
        if let Some(&first) = bad.first() {
            let e = Error::Mismatch {
                pages: bad.len() as u64,
                first,
            };
            let detail = e.to_string();
            if pair
                .main
                .send(&Message::Shut {
                    reason: ShutReason::Error,
                    detail,
                })
                .is_ok()
            {
                self.until_closed(pair);
            }
            return Err(e);
        }
        let detail = match dropped {
            0 => format!("verified {pages} pages"),
            n => format!(
                "verified {} pages; {n} dropped by the destination's workload before they \
                 landed, not checked",
                pages - n
            ),
        };
        self.checked = Some((pages - dropped, dropped));
        pair.main.send(&Message::Shut {
            reason: ShutReason::Done,
            detail,
        })?;
        self.headway.sent();
        event!(self.m.control, Sent("SHUT"));
        self.expect_step(pair, step::VERIFIED)?;
        self.heard_end(pair);
        Ok(())
    }

    /// Echoes the destination's ACK of step 3, so it stops waiting for us, then waits
    /// (bounded by the silence deadline) for it to close the pair first: closing ours
    /// while its heartbeats sit unread would reset the connection, and a reset may
    /// discard the echo before the destination read it (it would then wait out its
    /// bound). If the echo is lost anyway, the destination stops at its bound.
    pub(super) fn heard_end(&self, pair: &Pair) {
        if let Err(e) = pair.main.send(&Message::Ack {
            seq: step::VERIFIED,
        }) {
            return log::debug!("source: the last ACK was not sent: {e}");
        }
        self.until_closed(pair);
    }

    /// Waits (bounded by the silence deadline) for the destination to close the pair
    /// after our last message: closing first, with its heartbeats unread, would reset the
    /// connection, and the reset may discard that message before the destination read it
    /// — a failed verdict lost so left it waiting out its give-up bound.
    fn until_closed(&self, pair: &Pair) {
        let until = Instant::now() + self.m.opts.timing.silence;
        while let Ok(Some(_)) = pair.next_within(until.saturating_duration_since(Instant::now())) {}
    }
}
