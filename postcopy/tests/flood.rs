//! A real client a WAN away (the proxy's latency: its PSK handshake takes round trips of
//! tens of milliseconds) against a page server flooded by strangers that connect
//! directly, each send the first byte of a HELLO and then stay silent, faster than
//! `max_handshakes` per handshake time: the client is admitted within a bound while the
//! flood goes on, never evicted when the flood comes from another address. (A flood from
//! the client's own address meets the gate's random draw, which lets a client in only
//! by chance on each attempt: that is shown by `transport`'s unit tests of the draw, not
//! here, where a bound on retries would pass or fail by luck.)

use crate::common;

use std::collections::VecDeque;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{image, psk_ends, test_timing};
use pager::MemorySource;
use postcopy::client::RemoteSource;
use postcopy::server::{PageServer, ServerOptions, ServerStats};
use postcopy::wire::{Channel, Role, PROTOCOL};
use postcopy::{Admission, Security, SecurityKind, Timing};
use testkit::proxy::Direction;
use transport::handshake::Hello;
use transport::Addr;

/// The proxy's one-way delay between the client and the server.
const ONE_WAY: Duration = Duration::from_millis(50);
/// A connection of the client stays at the gate about this long: its HELLO comes with
/// it, the CHALLENGE takes one way, the AUTH the other.
const AT_GATE: Duration = Duration::from_millis(100);

/// Strangers connecting to `to` at `per_sec` until dropped, each sending one byte of
/// a HELLO and nothing more; the last `kept` stay open on their side.
struct Flood {
    on: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Flood {
    fn start(to: SocketAddr, per_sec: u32, kept: usize) -> Flood {
        let mut hello = Vec::new();
        Hello {
            role: Role::Destination,
            channel: Channel::Main,
            session: 7,
            generation: 1,
        }
        .message(&PROTOCOL, SecurityKind::PreSharedKey)
        .encode(&mut hello);
        let (on, opened) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
        let (o, n) = (on.clone(), opened.clone());
        let every = Duration::from_secs(1) / per_sec;
        let thread = std::thread::spawn(move || {
            let mut held = VecDeque::with_capacity(kept);
            let start = Instant::now();
            let mut i = 0u32;
            while o.load(Ordering::Relaxed) {
                // On schedule (catching up after a stall): the rate, not a pace per connect.
                let at = start + every * i;
                if let Some(wait) = at.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                i += 1;
                let Ok(mut s) = TcpStream::connect(to) else {
                    continue;
                };
                if s.write_all(&hello[..1]).is_ok() {
                    n.fetch_add(1, Ordering::Relaxed);
                }
                if held.len() == kept {
                    held.pop_front();
                }
                held.push_back(s);
            }
        });
        Flood {
            on,
            opened,
            thread: Some(thread),
        }
    }

    fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.on.store(false, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the flood");
        }
    }
}

fn server(listener: Security, max_handshakes: usize) -> PageServer {
    let opts = ServerOptions {
        timing: test_timing(),
        admission: Admission {
            handshake_deadline: Duration::from_secs(5),
            max_handshakes,
            max_sessions: 4,
        },
        ..ServerOptions::default()
    };
    let source = Arc::new(MemorySource::new(image(16)));
    // Both stacks: strangers come from ::1, clients from 127.0.0.1 (or both from there).
    let addr = "[::]:0".parse().expect("addr");
    PageServer::bind_with(&addr, source, listener, opts).expect("bind")
}

/// What a client got among a flood.
struct Among {
    got: Result<RemoteSource, postcopy::Error>,
    /// Its connections (an attempt opens main, then urgent once main is in).
    connections: u64,
    took: Duration,
    /// Connections the gate closed to make room while the client dialled.
    evicted: u64,
    stats: ServerStats,
}

/// A PSK page server with `max_handshakes` of `k`, flooded at its address `strangers_at`
/// by `per_handshake × k` strangers per `AT_GATE`; once the gate is full and evicting, a
/// client dials it from 127.0.0.1 through a proxy `ONE_WAY` long, retrying quickly (20–50
/// ms) for up to `bound`.
fn dial_among_flood(k: usize, strangers_at: &str, per_handshake: f64, bound: Duration) -> Among {
    common::log_to_stderr();
    let (listener, opener) = psk_ends();
    let srv = server(listener, k);
    let per_sec = (per_handshake * k as f64 / AT_GATE.as_secs_f64()) as u32;
    let flood = Flood::start(at(&srv, strangers_at), per_sec, 64 * k);
    let before = common::counted(&srv, "the gate full and evicting", |s| {
        s.evicted >= 4 * k as u64
    });
    let proxy = common::proxy_to(&Addr::Tcp(at(&srv, "127.0.0.1")), Direction::ToOpener);
    proxy.latency(ONE_WAY);
    let timing = Timing {
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(50),
        give_up_after: bound,
        ..test_timing()
    };
    let t = Instant::now();
    let got = RemoteSource::connect_with(&Addr::Tcp(proxy.addr()), opener, timing);
    let took = t.elapsed();
    let stats = srv.stats();
    eprintln!(
        "{} strangers; the client after {took:?}, {} connections: {stats:?}",
        flood.opened(),
        proxy.connections()
    );
    Among {
        got,
        connections: proxy.connections(),
        took,
        evicted: stats.evicted - before.evicted,
        stats,
    }
}

impl Among {
    /// The client, admitted; and the flood outran the gate meanwhile: more than `k`
    /// connections closed per `AT_GATE`, the time one of the client's stays there.
    fn admitted(self, k: usize) -> (RemoteSource, u64) {
        let Among {
            got,
            connections,
            took,
            evicted,
            stats,
        } = self;
        let client = got.unwrap_or_else(|e| {
            panic!("not admitted in {took:?} ({connections} connections): {e:?}; {stats:?}")
        });
        let outrun = k as f64 * took.as_secs_f64() / AT_GATE.as_secs_f64();
        assert!(
            evicted as f64 > outrun,
            "{evicted} evicted in {took:?}: the flood did not outrun the gate; {stats:?}"
        );
        (client, connections)
    }
}

/// The server's port on loopback `ip`.
fn at(srv: &PageServer, ip: &str) -> SocketAddr {
    match srv.local_addr().expect("addr") {
        Addr::Tcp(a) => SocketAddr::new(ip.parse().expect("an address"), a.port()),
        Addr::Unix(_) => unreachable!("a TCP server"),
    }
}

/// Strangers from another address: whatever they send, while they hold more of the
/// gate than the client's address, a newcomer makes room among theirs. Before, the gate
/// closed the oldest of those that had sent a byte — the client, every time: 8 handshakes
/// and 24 strangers during each of its connections' 100 ms.
#[test]
fn a_client_a_wan_away_gets_in_at_once_among_strangers_from_another_address_each_sending_a_byte() {
    let among = dial_among_flood(8, "::1", 3.0, Duration::from_secs(10));
    let stats = among.stats;
    let (_client, connections) = among.admitted(8);
    assert_eq!(connections, 2, "the client was evicted; {stats:?}");
}
