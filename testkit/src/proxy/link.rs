//! The proxy's data path: each accepted connection is a [`Link`] (tagged by the
//! classifier, its cut flags beside it), dialled upstream and forwarded by two pumps, one
//! per direction, that count the bytes and honour freezes, resets, delays, drips and the
//! latency.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt::Linger};

use super::{CutMode, Direction, State, Target, TICK};

/// One proxied connection.
pub(super) struct Link {
    /// Its number, in accepting order.
    id: u64,
    /// Pumps still running (two, until a side closes).
    pumps: AtomicU64,
    tag: OnceLock<&'static str>,
    pub(super) sockets: [TcpStream; 2],
    frozen: AtomicBool,
    /// One direction frozen (indexed by `Direction as usize`).
    half: [AtomicBool; 2],
    pub(super) reset: AtomicBool,
    /// Nothing moves before this.
    held_until: Mutex<Option<Instant>>,
    /// Until when, and how many bytes a tick each way.
    drip: Mutex<Option<(Instant, usize)>>,
    /// How late every chunk arrives.
    latency: Duration,
    /// Bytes a tick each way for good ([`Proxy::rate`](super::Proxy::rate)), if limited.
    rate: Option<usize>,
}

impl Link {
    /// Whether a cut can still hit it: a half-open link can still freeze or reset whole.
    pub(super) fn live(&self) -> bool {
        self.pumps.load(Ordering::SeqCst) > 0
            && !self.frozen.load(Ordering::SeqCst)
            && !self.reset.load(Ordering::SeqCst)
    }

    /// Whether both of its pumps ended: each end closed its side (or the link broke).
    pub(super) fn ended(&self) -> bool {
        self.pumps.load(Ordering::SeqCst) == 0
    }

    /// Whether nothing flows in `dir` any more.
    pub(super) fn blocked(&self, dir: Direction) -> bool {
        self.frozen.load(Ordering::SeqCst) || self.half[dir as usize].load(Ordering::SeqCst)
    }

    /// How long nothing may move yet, if held.
    pub(super) fn held(&self) -> Option<Duration> {
        let until = (*self.held_until.lock().unwrap_or_else(|p| p.into_inner()))?;
        until.checked_duration_since(Instant::now())
    }

    /// Bytes one read may take now: a tick's worth while dripping or rate-limited.
    pub(super) fn allowance(&self, full: usize) -> (usize, bool) {
        let drip = match *self.drip.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((until, per_tick)) if Instant::now() < until => Some(per_tick),
            _ => None,
        };
        match (drip, self.rate) {
            (None, None) => (full, false),
            (a, b) => (a.into_iter().chain(b).fold(full, usize::min), true),
        }
    }

    pub(super) fn hit_by(&self, target: Target) -> bool {
        match target {
            Target::All => true,
            Target::Tag(t) => self.tag.get() == Some(&t),
        }
    }

    pub(super) fn apply(&self, mode: CutMode) {
        match mode {
            CutMode::Freeze => self.frozen.store(true, Ordering::SeqCst),
            CutMode::HalfOpen(dir) => self.half[dir as usize].store(true, Ordering::SeqCst),
            CutMode::Delay(d) => {
                *self.held_until.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now() + d)
            }
            CutMode::Drip {
                bytes_per_sec,
                lasting,
            } => {
                let per_tick = per_tick(bytes_per_sec);
                *self.drip.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now() + lasting, per_tick));
            }
            CutMode::Reset => {
                for s in &self.sockets {
                    // Linger 0: the last close sends RST instead of FIN.
                    let _ = setsockopt(
                        s,
                        Linger,
                        &nix::libc::linger {
                            l_onoff: 1,
                            l_linger: 0,
                        },
                    );
                }
                self.reset.store(true, Ordering::SeqCst);
                // Wakes the pumps from their reads: they let go of the sockets now, and
                // the last close sends the RST (a read shut down sends nothing).
                for s in &self.sockets {
                    let _ = s.shutdown(std::net::Shutdown::Read);
                }
            }
        }
    }
}

/// Bytes a tick at `bytes_per_sec` (at least one).
fn per_tick(bytes_per_sec: u64) -> usize {
    (bytes_per_sec as u128 * TICK.as_millis() / 1000).max(1) as usize
}

pub(super) fn accept(state: &Arc<State>, listener: &TcpListener) {
    while !state.stop.load(Ordering::SeqCst) {
        let opener = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => continue,
        };
        if state.blocked.load(Ordering::SeqCst) {
            continue; // closed at once: the opener sees its connection end
        }
        let latency = Duration::from_nanos(state.latency.load(Ordering::SeqCst));
        if latency.is_zero() {
            connect(state, opener, None, latency);
        } else {
            let s = state.clone();
            std::thread::spawn(move || connect_late(&s, opener, latency));
        }
    }
}

/// Connects to the listener `latency` after the opener came, with the opener's first
/// bytes if it sends them within that time (they arrive with the connection).
fn connect_late(state: &Arc<State>, opener: TcpStream, latency: Duration) {
    let came = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    let _ = opener.set_read_timeout(Some(latency));
    let first = match (&opener).read(&mut buf) {
        Ok(0) | Err(_) => None,
        Ok(n) => Some((buf[..n].to_vec(), Instant::now())),
    };
    sleep_until(came + latency);
    if !state.stop.load(Ordering::SeqCst) {
        connect(state, opener, first, latency);
    }
}

/// Dials the listener for `opener` and starts the pumps; `ahead` is what the opener sent
/// before (and when it came).
fn connect(
    state: &Arc<State>,
    opener: TcpStream,
    ahead: Option<(Vec<u8>, Instant)>,
    latency: Duration,
) {
    let Ok(listener_side) = TcpStream::connect(state.upstream) else {
        return; // the opener sees its connection closed, as if refused
    };
    let setup = || -> io::Result<Arc<Link>> {
        for s in [&opener, &listener_side] {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(TICK))?;
            s.set_write_timeout(Some(TICK))?;
        }
        Ok(Arc::new(Link {
            id: state.connections.load(Ordering::SeqCst),
            pumps: AtomicU64::new(2),
            tag: OnceLock::new(),
            sockets: [opener.try_clone()?, listener_side.try_clone()?],
            frozen: AtomicBool::new(false),
            half: [AtomicBool::new(false), AtomicBool::new(false)],
            reset: AtomicBool::new(false),
            held_until: Mutex::new(None),
            drip: Mutex::new(None),
            latency,
            rate: match state.rate.load(Ordering::SeqCst) {
                0 => None,
                r => Some(per_tick(r)),
            },
        }))
    };
    let Ok(link) = setup() else { return };
    state.connections.fetch_add(1, Ordering::SeqCst);
    state
        .links
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(link.clone());
    let mut ahead = Some(ahead);
    for (dir, from, to) in [
        (
            Direction::ToListener,
            opener.try_clone(),
            listener_side.try_clone(),
        ),
        (
            Direction::ToOpener,
            listener_side.try_clone(),
            opener.try_clone(),
        ),
    ] {
        let (Ok(from), Ok(to)) = (from, to) else {
            continue;
        };
        let (s, l) = (state.clone(), link.clone());
        let ahead = ahead.take().flatten();
        std::thread::spawn(move || {
            pump(&s, &l, dir, (from, ahead), to);
            l.pumps.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn sleep_until(t: Instant) {
    if let Some(wait) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
}

/// Forwards one direction of one connection until it closes, is reset, or the proxy
/// stops; frozen, it holds the sockets open and moves nothing. `ahead`: bytes read before
/// it started, and when they came.
fn pump(
    state: &State,
    link: &Link,
    dir: Direction,
    (mut from, mut ahead): (TcpStream, Option<(Vec<u8>, Instant)>),
    mut to: TcpStream,
) {
    let mut buf = vec![0u8; 64 << 10];
    let (mut first, mut carried) = (Vec::new(), 0u64);
    loop {
        if state.stop.load(Ordering::SeqCst) || link.reset.load(Ordering::SeqCst) {
            return;
        }
        if link.blocked(dir) {
            std::thread::sleep(TICK);
            continue;
        }
        if let Some(wait) = link.held() {
            std::thread::sleep(wait.min(TICK));
            continue;
        }
        let (allowed, dripping) = link.allowance(buf.len());
        if dripping {
            std::thread::sleep(TICK);
        }
        // What was read (or its end) reaches the other side `latency` after it came.
        let (read, came) = match ahead.take() {
            Some((bytes, came)) => {
                buf[..bytes.len()].copy_from_slice(&bytes);
                (Ok(bytes.len()), came)
            }
            None => (from.read(&mut buf[..allowed]), Instant::now()),
        };
        let n = match read {
            Ok(0) if link.reset.load(Ordering::SeqCst) => return, // no FIN before the RST
            Ok(0) => {
                sleep_until(came + link.latency);
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if transient(&e) => continue,
            Err(_) => return link.apply(CutMode::Reset),
        };
        sleep_until(came + link.latency);
        if dir == Direction::ToListener && link.tag.get().is_none() {
            first.extend_from_slice(&buf[..n]);
            if let Some(tag) = (state.opts.classify)(&first).or((first.len() > 4096).then_some(""))
            {
                let _ = link.tag.set(tag);
            }
        }
        let counted = dir == state.opts.direction
            && link.tag.get() == Some(&state.opts.counted)
            && link.id >= state.fresh_from.load(Ordering::SeqCst);
        let skip = if counted {
            state.opts.settle.saturating_sub(carried).min(n as u64)
        } else {
            n as u64
        };
        carried += n as u64;
        let (go, cut) = state.count(n as u64 - skip);
        let go = (skip + go) as usize;
        if !write_all(state, link, dir, &mut to, &buf[..go]) {
            return;
        }
        if let Some(cut) = cut {
            state.cut(cut.mode, cut.target);
            if link.blocked(dir) || link.reset.load(Ordering::SeqCst) {
                continue; // the rest of this read never arrives
            }
        }
        if !write_all(state, link, dir, &mut to, &buf[go..n]) {
            return;
        }
    }
}

/// A timed-out or interrupted read or write: try again.
fn transient(e: &io::Error) -> bool {
    use io::ErrorKind::{Interrupted, TimedOut, WouldBlock};
    matches!(e.kind(), WouldBlock | TimedOut | Interrupted)
}

/// Writes all of `bytes` unless the link is reset or frozen, or the proxy stops meanwhile.
fn write_all(
    state: &State,
    link: &Link,
    dir: Direction,
    to: &mut TcpStream,
    mut bytes: &[u8],
) -> bool {
    while !bytes.is_empty() {
        if state.stop.load(Ordering::SeqCst) || link.reset.load(Ordering::SeqCst) {
            return false;
        }
        if link.blocked(dir) {
            return true;
        }
        match to.write(bytes) {
            Ok(0) => return false,
            Ok(n) => bytes = &bytes[n..],
            Err(e) if transient(&e) => {}
            Err(_) => {
                link.apply(CutMode::Reset);
                return false;
            }
        }
    }
    true
}
