//! 2 000 idle strangers' connections while a real client restores 64 MiB over TLS: the
//! client completes byte for byte, the process's thread count is what the same restore
//! costs without strangers (a stranger costs a socket, never a thread), and every idle
//! connection is closed by the server at the handshake deadline.
//!
//! The test runs in a process of its own (`testkit::isolated`), so that `/proc/self/task`
//! counts this test's threads only and its 4 000 sockets crowd no other test.

use crate::common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{image, restore_from, test_timing, tls_ends};
use pager::MemorySource;
use postcopy::client::RemoteSource;
use postcopy::server::{PageServer, ServerOptions};
use postcopy::Admission;
use transport::Addr;

const STRANGERS: usize = 2000;
/// 64 MiB of 4 KiB pages.
const PAGES: usize = 16384;

/// The threads of this process now.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

/// Samples the thread count every 5 ms until dropped; `peak` is the most seen.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start() -> Sampler {
        let (stop, peak) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(threads(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Sampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the peak thread count seen.
    fn peak(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("sampler");
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// Raises the soft limit on open files to the hard one; whether `need` fit under it.
fn open_files_for(need: u64) -> bool {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return false;
    };
    hard >= need && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok()
}

/// What [`restore_among`] leaves: the peak thread count during the restore, the server
/// (still serving), the strangers' sockets (open on our side) each with when it was
/// opened, and when the first was.
struct Among {
    peak_threads: usize,
    server: PageServer,
    strangers: Vec<(TcpStream, Instant)>,
    opened: Instant,
}

/// One restore of the whole image from a fresh TLS page server, with `strangers` idle
/// connections opened first.
fn restore_among(strangers: usize, admission: Admission) -> Among {
    let (listener, opener) = tls_ends();
    let opts = ServerOptions {
        timing: test_timing(),
        admission,
        ..ServerOptions::default()
    };
    let source = Arc::new(MemorySource::new(image(PAGES)));
    let srv = PageServer::bind_with(&"127.0.0.1:0".parse().unwrap(), source, listener, opts)
        .expect("bind");
    let Addr::Tcp(to): Addr = srv.local_addr().expect("addr") else {
        unreachable!("a TCP server")
    };
    let sampler = Sampler::start();
    let opened = Instant::now();
    let held = open_idle(to, strangers);
    // Every stranger is accepted before the client comes (on a loaded machine the first
    // may time out before the last is in).
    let at_gate = common::counted(&srv, "strangers accepted", |s| {
        (s.handshaking + s.timed_out) as usize >= strangers
    });
    // Not before the deadline: the first stranger is still open (when there is margin).
    if let Some((first, came)) = held.first() {
        if came.elapsed() + Duration::from_secs(1) < admission.handshake_deadline {
            first.set_nonblocking(true).expect("nonblocking");
            let peeked = first.peek(&mut [0u8; 1]);
            assert!(
                matches!(&peeked, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
                "the first stranger closed {:?} after it came: {peeked:?}",
                came.elapsed()
            );
            first.set_nonblocking(false).expect("blocking");
        }
    }
    if strangers > 0 {
        eprintln!(
            "{strangers} strangers opened in {:?}; {} at the gate as the client comes",
            opened.elapsed(),
            at_gate.handshaking
        );
    }
    let client = RemoteSource::connect_with(&srv.local_addr().unwrap(), opener, test_timing())
        .expect("the client gets in among the strangers");
    let stats = restore_from(Arc::new(client), &image(PAGES), 64);
    assert_eq!(
        stats.placed() as usize,
        PAGES,
        "the client restored everything"
    );
    let s = srv.stats();
    assert_eq!((s.pairs, s.refused, s.evicted), (1, 0, 0), "{s:?}");
    Among {
        peak_threads: sampler.peak(),
        server: srv,
        strangers: held,
        opened,
    }
}

fn open_idle(to: SocketAddr, n: usize) -> Vec<(TcpStream, Instant)> {
    (0..n)
        .map(|i| {
            let s = TcpStream::connect(to).unwrap_or_else(|e| panic!("stranger {i}: {e}"));
            (s, Instant::now())
        })
        .collect()
}

#[test]
fn two_thousand_idle_strangers_cost_no_threads_and_are_closed_at_the_deadline_while_a_client_restores_64_mib(
) {
    let test = "two_thousand_idle_strangers_cost_no_threads_and_are_closed_at_the_deadline_while_a_client_restores_64_mib";
    if !testkit::isolated(test, Duration::from_secs(180)) {
        return;
    }
    common::log_to_stderr();
    // Both ends of every stranger are in this process, and the client's and server's own.
    if !open_files_for(2 * STRANGERS as u64 + 512) {
        testkit::skip(
            "two_thousand_idle_strangers",
            "RLIMIT_NOFILE's hard limit is below 2 × 2000 + 512 and cannot be raised",
        );
        return;
    }
    // Room for every stranger in its handshake, so the deadline (not eviction) closes
    // them all: 2 000 handshakes in progress at once on one gate thread.
    let deadline = Duration::from_secs(10);
    let admission = Admission {
        handshake_deadline: deadline,
        max_handshakes: STRANGERS + 48,
        ..Admission::default()
    };
    let alone = restore_among(0, admission).peak_threads;
    let Among {
        peak_threads: among,
        server,
        mut strangers,
        opened,
    } = restore_among(STRANGERS, admission);
    eprintln!("peak threads: {alone} restoring alone, {among} among {STRANGERS} idle strangers");
    // A thread per stranger would be 2 000 more; a few may come and go with timing.
    assert!(
        among <= alone + 4,
        "threads: {among} among strangers vs {alone} alone"
    );
    // Each stranger is closed by the server within a few seconds of its deadline (the
    // gate's turn and a loaded machine's scheduling).
    let mut buf = [0u8; 64];
    for (i, (s, came)) in strangers.iter_mut().enumerate() {
        let left =
            (*came + deadline + Duration::from_secs(5)).saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .expect("timeout");
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        assert!(
            closed,
            "stranger {i} still open {:?} after it came",
            came.elapsed()
        );
        if i == 0 {
            let first = opened.elapsed();
            assert!(
                first >= deadline,
                "closed after {first:?}, before the {deadline:?} deadline"
            );
        }
    }
    // By the deadline, each of them: none evicted, none refused, none left in.
    let s = common::counted(&server, "every stranger timed out", |s| {
        s.timed_out as usize >= STRANGERS && s.handshaking == 0
    });
    assert_eq!(
        (s.timed_out as usize, s.evicted, s.refused, s.pairs),
        (STRANGERS, 0, 0, 1),
        "{s:?}"
    );
}
