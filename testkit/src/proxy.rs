//! A fault-injecting TCP proxy: put it between two real endpoints and break their
//! connections the way networks do — a **reset** (both ends get RST), a **silent
//! freeze** (both ends stay established and nothing flows: a partition), a **half-open**
//! link (one direction frozen, the other flowing) — or degrade them: a **delay spike**
//! (nothing moves for a while, then everything does, nothing lost) or a **slow drip**
//! (bandwidth throttled to a trickle for a while) — at planned byte offsets, or now
//! (a test that hears the endpoints' protocol events cuts at those). A **latency**
//! ([`Proxy::latency`]) puts a distance between them: every connection and every chunk
//! arrives that long after it was sent, as across a WAN; a **rate** ([`Proxy::rate`]) makes
//! every connection a slow link, for good.
//!
//! Each connection is tagged by a classifier that reads the opener's first bytes (a
//! postcopy test tags `main` and `urgent` from the HELLO), so a cut can hit one channel
//! alone or every connection. Offsets count the bytes one tagged connection carries in
//! one direction (e.g. source → destination on `main`), past its first `settle` bytes
//! (the handshake), summed over reconnections, from when the cuts were planned: a byte
//! counted is payload sent after the endpoints greeted, so each cut lands in a session,
//! never inside a reconnection's handshake. The byte at which a cut falls is random
//! ([`Proxy::plan_random`], seeded), so frames are cut anywhere in the middle.
//!
//! ```no_run
//! use testkit::proxy::{Cut, CutMode, Direction, Proxy, ProxyOptions, Target};
//! let proxy = Proxy::start("127.0.0.1:7701".parse().unwrap(), ProxyOptions {
//!     classify: |first| (first.len() >= 4).then_some("any"),
//!     counted: "any",
//!     direction: Direction::ToListener,
//!     settle: 1024,
//! })?;
//! proxy.plan(vec![Cut { mode: CutMode::Freeze, target: Target::All, after: 1 << 20 }]);
//! // connect the opener to proxy.addr() ...
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use link::{accept, Link};

mod link;

/// How a cut breaks (or degrades) connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// Both ends get a reset (RST), at once.
    Reset,
    /// Nothing flows any more, both ways, and nothing is closed: both ends see silence.
    Freeze,
    /// Nothing flows any more in this direction; the other still flows; nothing is closed.
    HalfOpen(Direction),
    /// Nothing moves for this long, then everything held moves on (nothing lost).
    Delay(Duration),
    /// At most `bytes_per_sec` each way for `lasting`, then full speed again.
    Drip {
        /// The trickle's rate.
        bytes_per_sec: u64,
        /// How long it lasts.
        lasting: Duration,
    },
}

impl CutMode {
    /// Whether it breaks connections for good (the rest degrade them for a while).
    pub fn breaks(self) -> bool {
        matches!(
            self,
            CutMode::Reset | CutMode::Freeze | CutMode::HalfOpen(_)
        )
    }
}

/// Which connections a cut breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every live connection.
    All,
    /// Live connections with this tag only.
    Tag(&'static str),
}

/// One planned cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Reset or freeze.
    pub mode: CutMode,
    /// Which connections.
    pub target: Target,
    /// Counted bytes from the plan (or the previous cut) to this cut.
    pub after: u64,
}

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Opener → listener.
    ToListener = 0,
    /// Listener → opener.
    ToOpener = 1,
}

/// How the proxy tags and counts.
#[derive(Debug, Clone, Copy)]
pub struct ProxyOptions {
    /// Tags a connection from the opener's first bytes (`None`: read more; untagged after
    /// 4 KiB).
    pub classify: fn(&[u8]) -> Option<&'static str>,
    /// Connections with this tag carry the counted bytes.
    pub counted: &'static str,
    /// In this direction.
    pub direction: Direction,
    /// Each connection's first bytes (in that direction) are not counted.
    pub settle: u64,
}

#[derive(Default)]
struct Plan {
    counted: u64,
    cuts: std::collections::VecDeque<Cut>,
    next_at: u64,
}

struct State {
    opts: ProxyOptions,
    upstream: SocketAddr,
    stop: AtomicBool,
    blocked: AtomicBool,
    links: Mutex<Vec<Arc<Link>>>,
    plan: Mutex<Plan>,
    /// One-way delay of connections accepted from now on (nanoseconds).
    latency: AtomicU64,
    /// Bytes a second each way of connections accepted from now on (0: unlimited).
    rate: AtomicU64,
    /// Only connections accepted after the last cut count bytes: a cut never lands on
    /// what is left of a pair an earlier cut already broke.
    fresh_from: AtomicU64,
    cuts: AtomicU64,
    connections: AtomicU64,
    /// When the last cut was made, and when counted bytes flowed again after it.
    cut_and_flow: Mutex<(Option<Instant>, Option<Instant>)>,
}

/// A running proxy; stops (closing every connection) on drop.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

/// Pumps poll their flags this often.
const TICK: Duration = Duration::from_millis(20);

impl Proxy {
    /// Listens on loopback and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr, opts: ProxyOptions) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            opts,
            upstream,
            stop: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            latency: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            links: Mutex::default(),
            plan: Mutex::default(),
            fresh_from: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            cut_and_flow: Mutex::default(),
        });
        let s = state.clone();
        let thread = std::thread::spawn(move || accept(&s, &listener));
        Ok(Proxy {
            addr,
            state,
            thread: Some(thread),
        })
    }

    /// Where openers connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Plans `cuts`, each `after` counted bytes past the one before (the first past now).
    pub fn plan(&self, cuts: Vec<Cut>) {
        let mut plan = self.state.plan.lock().unwrap_or_else(|p| p.into_inner());
        plan.cuts = cuts.into();
        plan.next_at = plan.counted + plan.cuts.front().map_or(0, |c| c.after);
    }

    /// Plans `n` cuts of `mode` on `target` at random offsets spread over `within` counted
    /// bytes from now (seeded: the same seed cuts at the same bytes). Returns the plan.
    pub fn plan_random(
        &self,
        seed: u64,
        n: usize,
        within: u64,
        mode: CutMode,
        target: Target,
    ) -> Vec<Cut> {
        let mut x = seed | 1;
        let mut at: Vec<u64> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                1 + x % within.max(1)
            })
            .collect();
        at.sort_unstable();
        let mut prev = 0;
        let cuts: Vec<Cut> = at
            .into_iter()
            .map(|a| {
                let after = (a - prev).max(1);
                prev = a;
                Cut {
                    mode,
                    target,
                    after,
                }
            })
            .collect();
        self.plan(cuts.clone());
        cuts
    }

    /// Cuts `target` now; returns how many connections it hit.
    pub fn cut_now(&self, mode: CutMode, target: Target) -> usize {
        self.state.cut(mode, target).hit
    }

    /// Cuts `target` now; the [`Cutoff`] says how many connections it hit and, later,
    /// whether both ends closed the live connections it spared.
    pub fn cut_watched(&self, mode: CutMode, target: Target) -> Cutoff {
        self.state.cut(mode, target)
    }

    /// A partition that does not heal: freezes every connection and closes every new one
    /// at once (`false` lets new connections through again).
    pub fn partition(&self, on: bool) {
        self.state.blocked.store(on, Ordering::SeqCst);
        if on {
            self.state.cut(CutMode::Freeze, Target::All);
        }
    }

    /// Carries every connection accepted from now on `one_way` late, each way: the
    /// connection to the listener is made that long after the opener's came (with the
    /// opener's first bytes, if it spoke first: they travel together, as a TCP handshake's
    /// last packet and the first data do), and each chunk is forwarded that long after it
    /// was read. The next chunk is read once this one is forwarded, so a stream moves at
    /// most a read (64 KiB) per delay: a distance for handshakes, not a long fat pipe.
    pub fn latency(&self, one_way: Duration) {
        let nanos = u64::try_from(one_way.as_nanos()).unwrap_or(u64::MAX);
        self.state.latency.store(nanos, Ordering::SeqCst);
    }

    /// Carries every connection accepted from now on at most `bytes_per_sec` each way, for
    /// as long as it lives: a slow link (a drip that never ends). The pumps move a tick's
    /// worth (20 ms) at a time.
    pub fn rate(&self, bytes_per_sec: u64) {
        self.state.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Cuts made so far (each hit at least one connection).
    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }

    /// Planned cuts not made yet.
    pub fn pending(&self) -> usize {
        self.state
            .plan
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cuts
            .len()
    }

    /// How long after the last cut counted bytes flowed again (a resumed stream), if
    /// they did.
    pub fn resumed_after(&self) -> Option<Duration> {
        let (cut, flow) = *self
            .state
            .cut_and_flow
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Some(flow?.saturating_duration_since(cut?))
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }
}

/// A cut made by [`Proxy::cut_watched`], and the connections it left live.
pub struct Cutoff {
    /// Connections it hit.
    pub hit: usize,
    spared: Vec<Arc<Link>>,
}

impl Cutoff {
    /// Whether both ends have closed every connection that was live at the cut and that
    /// the cut spared. An endpoint that finds one connection of a pair broken closes the
    /// pair's others, so when the cut hit one connection of the only pair live, this says
    /// that both ends noticed the break — which a reset (carried late, or read late) or a
    /// freeze (noticed at a silence deadline) does not say by itself.
    pub fn noticed(&self) -> bool {
        self.spared.iter().all(|l| l.ended())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for link in self
            .state
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            for s in &link.sockets {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl State {
    fn cut(&self, mode: CutMode, target: Target) -> Cutoff {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let (mut hit, mut spared) = (0, Vec::new());
        for link in links.iter().filter(|l| l.live()) {
            if !link.hit_by(target) {
                spared.push(link.clone());
                continue;
            }
            link.apply(mode);
            hit += 1;
        }
        if mode.breaks() {
            let accepted = self.connections.load(Ordering::SeqCst);
            self.fresh_from.store(accepted, Ordering::SeqCst);
        }
        // A reset link's sockets close when its pumps let go too: the last close sends RST.
        links.retain(|l| !l.reset.load(Ordering::SeqCst));
        if hit > 0 {
            *self.cut_and_flow.lock().unwrap_or_else(|p| p.into_inner()) =
                (Some(Instant::now()), None);
            let n = self.cuts.fetch_add(1, Ordering::SeqCst) + 1;
            eprintln!("proxy: cut {n}: {mode:?} of {target:?} ({hit} connections)");
        }
        Cutoff { hit, spared }
    }

    /// Counts `n` bytes; returns how many may go before a cut that is due, and the cut.
    fn count(&self, n: u64) -> (u64, Option<Cut>) {
        if n > 0 {
            let mut cf = self.cut_and_flow.lock().unwrap_or_else(|p| p.into_inner());
            if cf.0.is_some() && cf.1.is_none() {
                cf.1 = Some(Instant::now());
            }
        }
        let mut plan = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        let Some(&cut) = plan.cuts.front() else {
            plan.counted += n;
            return (n, None);
        };
        if plan.counted + n < plan.next_at {
            plan.counted += n;
            return (n, None);
        }
        let before = plan.next_at - plan.counted;
        plan.counted = plan.next_at;
        plan.cuts.pop_front();
        plan.next_at = plan.counted + plan.cuts.front().map_or(0, |c| c.after);
        (before, Some(cut))
    }
}
