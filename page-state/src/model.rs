//! A trivially correct reference model of [`PageStateMap`] — a `Vec` of states and the
//! transition table — and a checker that runs one [`Op`] on both and compares.
//!
//! Shared by the proptest suite and the cargo-fuzz target, so both check the same thing.

use crate::{Error, PageState, PageStateMap, RequestOutcome, Transition, TransitionError};

/// The model: one state per page, no cleverness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    /// Page states.
    pub states: Vec<PageState>,
}

impl Model {
    /// `pages` Missing pages.
    pub fn new(pages: usize) -> Self {
        Self {
            states: vec![PageState::Missing; pages],
        }
    }

    fn check(&self, start: usize, end: usize) -> Result<(), Error> {
        if start > end || end > self.states.len() {
            return Err(Error::OutOfRange {
                start,
                end,
                len: self.states.len(),
            });
        }
        Ok(())
    }

    /// Single-page transition by the table.
    pub fn transition(&mut self, page: usize, t: Transition) -> Result<PageState, Error> {
        self.check(page, page + 1)?;
        let found = self.states[page];
        if !t.allowed_from(found) {
            return Err(TransitionError {
                page,
                found,
                transition: t,
            }
            .into());
        }
        self.states[page] = t.target();
        Ok(found)
    }

    /// [`PageStateMap::request`].
    pub fn request(&mut self, page: usize) -> Result<RequestOutcome, Error> {
        self.check(page, page + 1)?;
        Ok(match self.states[page] {
            PageState::Missing => {
                self.states[page] = PageState::Requested;
                RequestOutcome::Requested
            }
            PageState::Requested => RequestOutcome::AlreadyRequested,
            PageState::Received => RequestOutcome::AlreadyReceived,
            PageState::Zero => RequestOutcome::IsZero,
        })
    }

    /// Range transition, page by page.
    pub fn transition_range(
        &mut self,
        start: usize,
        end: usize,
        t: Transition,
    ) -> Result<usize, Error> {
        self.check(start, end)?;
        let (mut changed, mut refused, mut first) = (0, 0, None);
        for page in start..end {
            let found = self.states[page];
            if found == t.target() {
                continue;
            }
            if t.allowed_from(found) {
                self.states[page] = t.target();
                changed += 1;
            } else {
                refused += 1;
                first.get_or_insert(TransitionError {
                    page,
                    found,
                    transition: t,
                });
            }
        }
        match first {
            None => Ok(changed),
            Some(first) => Err(Error::PartlyRefused {
                first,
                refused,
                changed,
            }),
        }
    }

    /// Pages in `state` within `start..end`.
    pub fn count_range(&self, state: PageState, start: usize, end: usize) -> Result<usize, Error> {
        self.check(start, end)?;
        Ok(self.states[start..end]
            .iter()
            .filter(|&&s| s == state)
            .count())
    }

    /// First missing page at or after `from`.
    pub fn next_missing(&self, from: usize) -> Option<usize> {
        (from..self.states.len()).find(|&p| self.states[p] == PageState::Missing)
    }

    /// First missing page at or after `from`, wrapping.
    pub fn next_missing_wrapping(&self, from: usize) -> Option<usize> {
        let from = from.min(self.states.len());
        self.next_missing(from)
            .or_else(|| (0..from).find(|&p| self.states[p] == PageState::Missing))
    }

    /// Runs of missing pages from `cursor` to the end, then from 0 to `cursor`.
    pub fn missing_runs(&self, cursor: usize) -> Vec<std::ops::Range<usize>> {
        let cursor = cursor.min(self.states.len());
        let mut runs = Vec::new();
        for (lo, hi) in [(cursor, self.states.len()), (0, cursor)] {
            let mut p = lo;
            while p < hi {
                if self.states[p] == PageState::Missing {
                    let start = p;
                    while p < hi && self.states[p] == PageState::Missing {
                        p += 1;
                    }
                    runs.push(start..p);
                } else {
                    p += 1;
                }
            }
        }
        runs
    }

    /// The set of pages in any of `states` as a bitmap.
    fn export(&self, states: &[PageState]) -> Vec<u64> {
        let mut out = vec![0u64; self.states.len().div_ceil(64)];
        for (p, s) in self.states.iter().enumerate() {
            if states.contains(s) {
                out[p / 64] |= 1 << (p % 64);
            }
        }
        out
    }

    /// The Received set as a bitmap.
    pub fn export_received(&self) -> Vec<u64> {
        self.export(&[PageState::Received])
    }

    /// The present set (Received ∪ Zero) as a bitmap.
    pub fn export_present(&self) -> Vec<u64> {
        self.export(&[PageState::Received, PageState::Zero])
    }
}

/// One operation on a map, as the proptest strategies and the fuzzer generate them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `request(page)`.
    Request(usize),
    /// `mark_received(page)`.
    Receive(usize),
    /// `mark_zero(page)`.
    MarkZero(usize),
    /// `discard(page)`.
    Discard(usize),
    /// `release(page)`.
    Release(usize),
    /// A range transition over `start..end`.
    Range(Transition, usize, usize),
    /// `count_range(state, start, end)`.
    Count(PageState, usize, usize),
    /// `next_missing(from)` and `next_missing_wrapping(from)`.
    NextMissing(usize),
    /// `missing_runs(cursor)`, collected.
    Runs(usize),
    /// Export the received and present bitmaps, and import the received one into a
    /// fresh map.
    ExportImport,
    /// Import a bitmap with the given seed bits into the map (and the model).
    Import(u64),
}

impl Op {
    /// Decodes one op from bytes (for the fuzzer): an opcode byte and two 16-bit indices,
    /// which may exceed `pages` so that out-of-range handling is exercised too.
    pub fn decode(bytes: &[u8], pages: usize) -> Option<(Op, &[u8])> {
        let (head, rest) = bytes.split_first_chunk::<5>()?;
        let span = pages + 2;
        let a = usize::from(u16::from_le_bytes([head[1], head[2]])) % span;
        let b = usize::from(u16::from_le_bytes([head[3], head[4]])) % span;
        let (lo, hi) = if head[0] & 0x80 == 0 {
            (a.min(b), a.max(b))
        } else {
            (a, b)
        };
        let kind = usize::from(head[0] / 11);
        let op = match head[0] % 11 {
            0 => Op::Request(a),
            1 => Op::Receive(a),
            2 => Op::MarkZero(a),
            3 => Op::Discard(a),
            4 => Op::Release(a),
            5 => Op::Range(Transition::ALL[kind % Transition::ALL.len()], lo, hi),
            6 => Op::Count(PageState::ALL[kind % 4], lo, hi),
            7 => Op::NextMissing(a),
            8 => Op::Runs(a),
            9 => Op::ExportImport,
            _ => Op::Import(u64::from_le_bytes([
                head[1], head[2], head[3], head[4], head[0], head[2], head[1], head[4],
            ])),
        };
        Some((op, rest))
    }
}

/// Applies `op` to both the map and the model; returns a description of the first
/// disagreement (results or resulting states).
pub fn check(map: &PageStateMap, model: &mut Model, op: Op) -> Result<(), String> {
    let differ = |what: &str, m: &dyn std::fmt::Debug, r: &dyn std::fmt::Debug| {
        Err(format!("{op:?}: {what}: map {m:?}, model {r:?}"))
    };
    match op {
        Op::Request(p) => {
            let (m, r) = (map.request(p), model.request(p));
            if m != r {
                return differ("result", &m, &r);
            }
        }
        Op::Receive(p) | Op::MarkZero(p) | Op::Discard(p) | Op::Release(p) => {
            let (m, t) = match op {
                Op::Receive(_) => (map.mark_received(p), Transition::Receive),
                Op::MarkZero(_) => (map.mark_zero(p), Transition::MarkZero),
                Op::Release(_) => (map.release(p), Transition::Release),
                _ => (map.discard(p), Transition::Discard),
            };
            let r = model.transition(p, t);
            if m != r {
                return differ("result", &m, &r);
            }
        }
        Op::Range(t, a, b) => {
            let m = match t {
                Transition::Receive => map.mark_received_range(a, b),
                Transition::MarkZero => map.mark_zero_range(a, b),
                Transition::Discard => map.discard_range(a, b),
                Transition::Release => map.release_range(a, b),
                // No range request exists: requests are per fault.
                Transition::Request => return Ok(()),
            };
            let r = model.transition_range(a, b, t);
            if m != r {
                return differ("result", &m, &r);
            }
        }
        Op::Count(s, a, b) => {
            let (m, r) = (map.count_range(s, a, b), model.count_range(s, a, b));
            if m != r {
                return differ("count", &m, &r);
            }
        }
        Op::NextMissing(from) => {
            let (m, r) = (map.next_missing(from), model.next_missing(from));
            if m != r {
                return differ("next_missing", &m, &r);
            }
            let (m, r) = (
                map.next_missing_wrapping(from),
                model.next_missing_wrapping(from),
            );
            if m != r {
                return differ("next_missing_wrapping", &m, &r);
            }
        }
        Op::Runs(cursor) => {
            let m: Vec<_> = map.missing_runs(cursor).collect();
            let r = model.missing_runs(cursor);
            if m != r {
                return differ("missing_runs", &m, &r);
            }
        }
        Op::ExportImport => {
            let (m, r) = (map.export_present(), model.export_present());
            if m != r {
                return differ("export present", &m, &r);
            }
            let (m, r) = (map.export_received(), model.export_received());
            if m != r {
                return differ("export", &m, &r);
            }
            let fresh = PageStateMap::new(map.len());
            let imported = fresh.import_received(&m);
            let expected = r.iter().map(|w| w.count_ones() as usize).sum::<usize>();
            if imported != Ok(expected) || fresh.export_received() != r {
                return differ("import into a fresh map", &imported, &expected);
            }
        }
        Op::Import(seed) => {
            let mut bitmap = vec![0u64; map.len().div_ceil(64)];
            for (i, w) in bitmap.iter_mut().enumerate() {
                *w = seed.rotate_left(i as u32 * 7);
            }
            let tail = map.len() % 64;
            if let (Some(last), true) = (bitmap.last_mut(), tail != 0) {
                *last &= (1u64 << tail) - 1;
            }
            let m = map.import_received(&bitmap);
            let mut changed = 0;
            for p in 0..model.states.len() {
                if bitmap[p / 64] >> (p % 64) & 1 == 1 && model.states[p] != PageState::Received {
                    model.states[p] = PageState::Received;
                    changed += 1;
                }
            }
            if m != Ok(changed) {
                return differ("import", &m, &changed);
            }
        }
    }
    let states: Vec<PageState> = map.states().collect();
    if states != model.states {
        let page = (0..states.len())
            .find(|&p| states[p] != model.states[p])
            .unwrap_or(0);
        return Err(format!(
            "{op:?}: page {page} is {:?} in the map, {:?} in the model",
            states.get(page),
            model.states.get(page)
        ));
    }
    Ok(())
}
