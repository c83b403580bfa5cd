//! Faults at protocol events: the source reports its events (`postcopy::fault::Event`) to
//! an [`Injector`], which makes the proxy cut when a planned fault is due — so a planned
//! fault always lands (the events happen whatever the timing), unlike a cut at a byte
//! offset of traffic whose volume depends on timing.
//!
//! Landing is not enough for a plan of one fault per pair: a cut must also be *noticed*
//! by both ends before the migration moves past the event it was planned at, or the
//! phase it belongs to may end (a whole postcopy streamed on `main` while the reset of
//! `urgent` is still on its way) and the next fault find no event left to make it due.
//! How soon a cut is noticed is timing (a reset is read when it arrives, a freeze at the
//! silence deadline), so the injector does not race it: it holds the source's thread at
//! the event until both ends closed the pair ([`Cutoff::noticed`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postcopy::fault::Event;
use postcopy::migrate::{DestControl, SourceControl};
use postcopy::wire::Channel;
use testkit::proxy::{CutMode, Cutoff, Proxy, Target};

/// Where in the protocol a fault is due: events ranked in the order a migration makes
/// them (a resumed migration makes some again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Precopy round `round`, once `frames` page frames went out in it.
    Round { round: u32, frames: u32 },
    /// The workload stopped.
    Stopped,
    /// This message sent (EARLY DISCARD: the DISCARD before the stop; DISCARD, LISTEN,
    /// RUN, SHUT).
    Sent(&'static str),
    /// Postcopy, once `frames` page frames went out in it.
    Postcopy { frames: u32 },
    /// The digests arrived.
    Digests,
}

/// The first rank after precopy: above any round a migration runs (a plan may let
/// precopy run a thousand rounds; round 100 must not rank as the stop).
const AFTER_ROUNDS: u32 = 1 << 24;

impl Trigger {
    pub fn rank(self) -> u32 {
        match self {
            Trigger::Round { round, .. } => round.min(AFTER_ROUNDS - 1),
            Trigger::Sent("EARLY DISCARD") => AFTER_ROUNDS,
            Trigger::Stopped => AFTER_ROUNDS + 1,
            Trigger::Sent("DISCARD") => AFTER_ROUNDS + 2,
            Trigger::Sent("LISTEN") => AFTER_ROUNDS + 3,
            Trigger::Sent("RUN") => AFTER_ROUNDS + 4,
            Trigger::Postcopy { .. } => AFTER_ROUNDS + 5,
            Trigger::Digests => AFTER_ROUNDS + 6,
            Trigger::Sent(_) => AFTER_ROUNDS + 7, // SHUT
        }
    }

    /// Whether `rank` is a precopy round's.
    pub fn in_precopy(rank: u32) -> bool {
        rank < AFTER_ROUNDS
    }

    pub fn frames(self) -> u32 {
        match self {
            Trigger::Round { frames, .. } | Trigger::Postcopy { frames } => frames,
            _ => 0,
        }
    }

    /// The phase it falls in, for summaries.
    pub fn phase(self) -> &'static str {
        match self {
            Trigger::Round { round: 1, .. } => "precopy round 1",
            Trigger::Round { round: 2, .. } => "precopy round 2",
            Trigger::Round { .. } => "precopy round 3+",
            Trigger::Sent("EARLY DISCARD") => "switch: discard before the stop",
            Trigger::Stopped | Trigger::Sent("DISCARD") => "switch: stop, discard",
            Trigger::Sent("LISTEN") | Trigger::Sent("RUN") => "switch: listen, run",
            Trigger::Postcopy { .. } => "postcopy",
            _ => "final exchange",
        }
    }
}

/// The rank an event moves the run to, if it is a phase event.
fn rank_of(event: Event) -> Option<u32> {
    Some(match event {
        Event::Round(round) => Trigger::Round { round, frames: 0 }.rank(),
        Event::Stopped => Trigger::Stopped.rank(),
        Event::Sent(m) => Trigger::Sent(m).rank(),
        Event::Postcopy => Trigger::Postcopy { frames: 0 }.rank(),
        Event::Digests => Trigger::Digests.rank(),
        Event::PageFrame(_) | Event::Resumed => return None,
    })
}

/// One planned fault.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub trigger: Trigger,
    pub mode: CutMode,
    pub target: Target,
}

pub fn mode_name(m: CutMode) -> &'static str {
    match m {
        CutMode::Reset => "reset",
        CutMode::Freeze => "freeze",
        CutMode::HalfOpen(_) => "half-open",
        CutMode::Delay(_) => "delay",
        CutMode::Drip { .. } => "drip",
    }
}

/// Fires planned faults, in order, at the source's events.
pub struct Injector {
    proxy: Arc<Proxy>,
    faults: Vec<Fault>,
    next: usize,
    /// Arm a fault only once the source (and the destination, if watched) resumed from
    /// every cut the proxy made so far (by this injector or by a byte plan), and hold the
    /// source at the event that made it due until both ends noticed it: one breaking fault
    /// per pair, each resumed from on its own, whatever the timing. For breaking faults
    /// only (a delay resumes nothing).
    one_per_pair: bool,
    resumed: u64,
    /// The destination, when the plan needs it greeted too before a fault lands
    /// ([`Injector::wait_for_destination`]).
    destination: Option<Arc<DestControl>>,
    /// The highest phase rank seen, and page frames since it was entered (or since the
    /// last resume).
    rank: u32,
    frames: u32,
    /// The phases and modes of the faults that landed.
    pub landed: Vec<(&'static str, &'static str)>,
    /// The phase rank the run was in as each landed (a fault due lands at the first
    /// event that finds it due: at its own, or later).
    pub landed_at: Vec<u32>,
    /// Faults that landed but that the ends had not noticed within [`NOTICED_WITHIN`]:
    /// the source went on past their event anyway.
    pub unnoticed: usize,
}

/// How long the source is held at a fault's event for both ends to notice it: far past
/// any silence deadline a test sets (a frozen connection is noticed at it).
const NOTICED_WITHIN: Duration = Duration::from_secs(60);

impl Injector {
    /// Plans `faults` (in trigger order) against `proxy`, and hears `control`'s events.
    pub fn start(
        proxy: Arc<Proxy>,
        faults: Vec<Fault>,
        one_per_pair: bool,
        control: &SourceControl,
    ) -> Arc<Mutex<Injector>> {
        let injector = Arc::new(Mutex::new(Injector {
            proxy,
            faults,
            next: 0,
            one_per_pair,
            resumed: 0,
            destination: None,
            rank: 0,
            frames: 0,
            landed: Vec::new(),
            landed_at: Vec::new(),
            unnoticed: 0,
        }));
        let inj = injector.clone();
        control.observe(Arc::new(move |e| {
            let cutoff = inj.lock().unwrap_or_else(|p| p.into_inner()).on(e);
            // Held outside the lock: the source's other threads report events meanwhile.
            if let Some(cutoff) = cutoff {
                if !noticed(&cutoff) {
                    inj.lock().unwrap_or_else(|p| p.into_inner()).unnoticed += 1;
                }
            }
        }));
        injector
    }

    /// Resumes the source made so far.
    pub fn resumed(&self) -> u64 {
        self.resumed
    }

    /// Arms a fault only once `destination` too resumed from every cut made so far: it
    /// counts a resume once its half of the greeting is done (RECV_BITMAP, the ACK, the
    /// requests still outstanding asked again on `urgent`), and a cut that lands before that
    /// breaks the greeting, so that the destination resumes once from two cuts. The
    /// source's resume, which alone armed the next fault, comes when the ACK arrives: before
    /// the destination has asked again, often by microseconds, not always.
    pub fn wait_for_destination(&mut self, destination: Arc<DestControl>) {
        self.destination = Some(destination);
    }

    /// Resumes the destination made so far, if the injector watches it.
    pub fn destination_resumed(&self) -> Option<u64> {
        self.destination.as_ref().map(|d| d.link.reconnects())
    }

    /// Whether both ends (the destination if watched) resumed from every cut so far.
    pub fn caught_up(&self) -> bool {
        let cuts = self.proxy.cuts();
        self.resumed >= cuts && self.destination_resumed().is_none_or(|d| d >= cuts)
    }

    /// Planned faults that have not landed.
    pub fn pending(&self) -> usize {
        self.faults.len() - self.next
    }

    /// Takes `event`; returns the cut it made, if the source must be held until both
    /// ends noticed it.
    fn on(&mut self, event: Event) -> Option<Cutoff> {
        match (rank_of(event), event) {
            (Some(r), _) if r > self.rank => (self.rank, self.frames) = (r, 0),
            (None, Event::PageFrame(_)) => self.frames += 1,
            (None, Event::Resumed) => (self.resumed, self.frames) = (self.resumed + 1, 0),
            _ => {}
        }
        if self.one_per_pair && !self.caught_up() {
            return None;
        }
        // An answer's frame is reported on the reader of `urgent`, which must stay free
        // to hear a cut: it counts, but the fault fires at the next event of the phase
        // logic or the stream (the digests at the latest).
        if self.one_per_pair && event == Event::PageFrame(Channel::Urgent) {
            return None;
        }
        let f = self.faults.get(self.next).copied()?;
        let t = f.trigger;
        let due = self.rank > t.rank() || (self.rank == t.rank() && self.frames >= t.frames());
        if !due {
            return None;
        }
        // A fault that hits nothing live (an earlier one still holds every connection)
        // stays due: it lands on the next pair.
        let cutoff = self.proxy.cut_watched(f.mode, f.target);
        if cutoff.hit == 0 {
            return None;
        }
        self.landed.push((t.phase(), mode_name(f.mode)));
        self.landed_at.push(self.rank);
        self.next += 1;
        (self.one_per_pair && f.mode.breaks()).then_some(cutoff)
    }
}

/// Waits (bounded by [`NOTICED_WITHIN`]) until both ends noticed `cutoff`; false if
/// they had not by then. On the source's phase or stream thread, neither of which hears
/// of a break (the pair's readers and heartbeat do, and the destination's).
fn noticed(cutoff: &Cutoff) -> bool {
    let at = Instant::now();
    while !cutoff.noticed() {
        if at.elapsed() >= NOTICED_WITHIN {
            eprintln!("injector: the cut was not noticed within {NOTICED_WITHIN:?}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!(
        "injector: both ends noticed the cut after {:.1?}",
        at.elapsed()
    );
    true
}
