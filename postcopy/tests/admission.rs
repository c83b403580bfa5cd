//! A page server that strangers cannot exhaust, on real sockets: idle connections are
//! closed at the handshake deadline or evicted beyond the handshake cap while a real
//! client restores; a stranger trickling its HELLO a byte at a time is closed at the
//! deadline all the same; beyond the session cap a client is told it is busy, retries,
//! and gets in once a session ends.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{counted, image, restore_from, test_timing, tls_ends};
use pager::MemorySource;
use postcopy::client::RemoteSource;
use postcopy::server::{PageServer, ServerOptions};
use postcopy::wire::{Channel, Role, PROTOCOL};
use postcopy::{Admission, Timing};
use postcopy::{Error, LinkError, Security, SecurityKind};
use transport::handshake::Hello;
use transport::Addr;

fn server(listener: Security, pages: usize, admission: Admission) -> PageServer {
    let source = Arc::new(MemorySource::new(image(pages)));
    let opts = ServerOptions {
        timing: test_timing(),
        admission,
        ..ServerOptions::default()
    };
    let addr = "127.0.0.1:0".parse().expect("addr");
    PageServer::bind_with(&addr, source, listener, opts).expect("bind")
}

fn tcp_of(srv: &PageServer) -> SocketAddr {
    match srv.local_addr().expect("addr") {
        Addr::Tcp(a) => a,
        Addr::Unix(_) => unreachable!("a TCP server"),
    }
}

/// Whether the server closed `s` (end of file, or a reset), waiting up to `wait`.
fn closed_by_server(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {} // a refusal's words: read on to the end
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn idle_strangers_are_evicted_beyond_the_cap_and_closed_at_the_deadline_while_a_client_restores() {
    let admission = Admission {
        handshake_deadline: Duration::from_secs(2),
        max_handshakes: 16,
        max_sessions: 4,
    };
    let (listener, opener) = tls_ends();
    let srv = server(listener, 4096, admission);
    let to = tcp_of(&srv);
    // Strangers keep opening idle connections for as long as the restore takes.
    let flooding = Arc::new(AtomicBool::new(true));
    let f = flooding.clone();
    let flood = std::thread::spawn(move || {
        let mut strangers = Vec::new();
        while f.load(Ordering::Relaxed) || strangers.len() < 200 {
            strangers.push(TcpStream::connect(to).expect("a stranger connects"));
            if strangers.len() % 20 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        strangers
    });
    counted(&srv, "strangers evicted", |s| s.evicted >= 50);
    let source = Arc::new(
        RemoteSource::connect_with(&srv.local_addr().unwrap(), opener, test_timing())
            .expect("the client gets in"),
    );
    let stats = restore_from(source, &image(4096), 16);
    assert_eq!(stats.placed(), 4096);
    flooding.store(false, Ordering::Relaxed);
    let mut strangers = flood.join().expect("flood");
    let s = srv.stats();
    assert!(s.handshaking <= 16, "the handshake cap held: {s:?}");
    // Every stranger is closed by the deadline (the last ones) or was evicted before.
    let until = Instant::now() + admission.handshake_deadline + Duration::from_secs(3);
    for (i, st) in strangers.iter_mut().enumerate() {
        let left = until.saturating_duration_since(Instant::now());
        assert!(
            closed_by_server(st, left.max(Duration::from_millis(10))),
            "stranger {i} of {} still open after the deadline",
            strangers.len()
        );
    }
    let s = counted(&srv, "every stranger counted", |s| {
        s.evicted + s.timed_out >= strangers.len() as u64 && s.handshaking == 0
    });
    // Nobody was refused. The client may have needed more than one pair: the gate closes
    // the oldest handshake when a newer connection comes beyond the cap, and on a loaded
    // host the client's TLS handshake can be the oldest (by design: it then retries, as it
    // did beside two busy loops in 3 of 12 runs; its restore above completed either way).
    assert_eq!(s.refused, 0, "{s:?}");
    assert!(s.pairs >= 1, "{s:?}");
    eprintln!("{} strangers: {s:?}", strangers.len());
}

#[test]
fn a_stranger_trickling_its_hello_is_closed_at_the_deadline() {
    let deadline = Duration::from_secs(2);
    let admission = Admission {
        handshake_deadline: deadline,
        ..Admission::default()
    };
    let srv = server(common::key().into(), 16, admission);
    let hello = Hello {
        role: Role::Destination,
        channel: Channel::Main,
        session: 1,
        generation: 1,
    };
    let mut frame = Vec::new();
    hello
        .message(&PROTOCOL, SecurityKind::PreSharedKey)
        .encode(&mut frame);
    let mut s = TcpStream::connect(tcp_of(&srv)).expect("connect");
    let t = Instant::now();
    // One byte every 300 ms: each read brings something, the whole never arrives in time.
    for byte in &frame {
        if s.write_all(&[*byte]).is_err() || t.elapsed() > deadline * 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(closed_by_server(&mut s, Duration::from_secs(5)));
    let closed = t.elapsed();
    assert!(
        closed < deadline + Duration::from_secs(3),
        "closed after {closed:?}"
    );
    let s = counted(&srv, "timed out", |s| s.timed_out == 1);
    assert_eq!((s.refused, s.pairs), (0, 0), "{s:?}");
}

#[test]
fn beyond_the_session_cap_a_client_is_told_busy_and_gets_in_once_a_session_ends() {
    let admission = Admission {
        max_sessions: 1,
        ..Admission::default()
    };
    let (listener, opener) = tls_ends();
    let srv = server(listener, 64, admission);
    let addr = srv.local_addr().unwrap();
    let first = RemoteSource::connect_with(&addr, opener.clone(), test_timing()).expect("first");
    // A second client with a short bound gives up, told why.
    let short = Timing {
        give_up_after: Duration::from_millis(800),
        ..test_timing()
    };
    let err = RemoteSource::connect_with(&addr, opener.clone(), short).expect_err("busy");
    assert!(
        matches!(
            err,
            Error::Transport(transport::Error::GaveUp {
                last: LinkError::Busy { .. },
                ..
            })
        ),
        "{err:?}"
    );
    // A patient one gets in once the first session ends.
    let (a, o) = (addr.clone(), opener.clone());
    let second = std::thread::spawn(move || RemoteSource::connect_with(&a, o, test_timing()));
    counted(&srv, "busy told again", |s| s.busy >= 2);
    drop(first);
    let second = Arc::new(
        second
            .join()
            .expect("thread")
            .expect("in after the first left"),
    );
    assert_eq!(restore_from(second, &image(64), 1).placed(), 64);
    let s = srv.stats();
    assert!(s.busy >= 2 && s.refused == 0, "{s:?}");
}

/// One connection of `session` opened by hand and authenticated with the test key
/// (its ADVISE, if any, left unread).
fn authenticated(to: SocketAddr, session: u64, channel: Channel) -> TcpStream {
    use transport::wire::Control;
    let mut s = TcpStream::connect(to).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let hello = Hello {
        role: Role::Destination,
        channel,
        session,
        generation: 1,
    };
    let mut frame = Vec::new();
    hello
        .message(&PROTOCOL, SecurityKind::PreSharedKey)
        .encode(&mut frame);
    s.write_all(&frame).expect("hello");
    let mut buf = Vec::new();
    let mut read = |s: &mut TcpStream| loop {
        if let Some((m, used)) = Control::decode_frame(&buf, 4096).expect("a control frame") {
            buf.drain(..used);
            return m;
        }
        let mut b = [0u8; 256];
        let n = s.read(&mut b).expect("read");
        assert!(n > 0, "closed during the handshake");
        buf.extend_from_slice(&b[..n]);
    };
    let challenge = read(&mut s);
    assert!(
        matches!(challenge, Control::Challenge { .. }),
        "no challenge"
    );
    let mut said = transport::key::Transcript::new();
    said.said(&hello.message(&PROTOCOL, SecurityKind::PreSharedKey));
    said.said(&challenge);
    let proof = common::key().proof(b"open", &said);
    let mut frame = Vec::new();
    Control::Auth {
        proof,
        nonce: [9; 32],
    }
    .encode(&mut frame);
    s.write_all(&frame).expect("auth");
    assert!(
        matches!(read(&mut s), Control::AuthOk { .. }),
        "not admitted"
    );
    s
}

/// Closes `s` with a reset (SO_LINGER 0): a send on the server's end then fails.
fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd, and a `linger` of the size given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(s);
}

/// Found by review: serving failed on ADVISE, before its pair existed, and the slot's
/// cutter (duplicates of both sockets) was never cut: the session stayed held for good
/// and, at `max_sessions: 1`, every client after it was told Busy.
#[test]
fn a_session_whose_main_connection_resets_before_its_pair_starts_frees_its_slot() {
    let admission = Admission {
        max_sessions: 1,
        ..Admission::default()
    };
    let srv = server(common::key().into(), 64, admission);
    let to = tcp_of(&srv);
    let session = 0x5eed;
    // On loopback the reset reaches the server's socket before `close` returns, so
    // serving the pair (once urgent completes it) fails on its first send, the ADVISE.
    reset(authenticated(to, session, Channel::Main));
    let urgent = authenticated(to, session, Channel::Urgent);
    counted(&srv, "the pair served", |s| s.pairs == 1);
    counted(&srv, "the failed session forgotten", |s| s.sessions == 0);
    drop(urgent);
    let short = Timing {
        give_up_after: Duration::from_secs(5),
        ..test_timing()
    };
    let got = RemoteSource::connect_with(&srv.local_addr().expect("addr"), common::key(), short);
    assert!(got.is_ok(), "{:?}, {:?}", got.err(), srv.stats());
}
