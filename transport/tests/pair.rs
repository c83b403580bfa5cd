//! Connection pairs over real sockets with a protocol of the test's own: its frames reach
//! the other side's phase logic, heartbeats keep an idle pair alive, and a peer that goes
//! silent — its sockets open, nothing flowing — breaks the pair within the deadline.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use transport::link::{Chan, Inbound, LinkError, Pair, ShutReason, Timing};
use transport::wire::{open_frame, put_frame, Control, DEFAULT_MAX_BODY, MAX_DETAIL};
use transport::{Conn, Error, Socket};

/// The test protocol's one message: kind 100 with a `u64` body.
const KIND: u8 = 100;

/// The test protocol: its one message, and a SHUT heard as its detail's length.
struct Numbers;

impl Inbound for Numbers {
    type Message = u64;
    type Error = Error;

    fn frame(&self, chan: &Chan, frame: &mut [u8]) -> Result<Option<u64>, Error> {
        let malformed = |e| Error::Link(LinkError::malformed(chan.channel, e));
        let f = open_frame(frame, DEFAULT_MAX_BODY)
            .map_err(malformed)?
            .expect("whole");
        if f.kind == KIND {
            return Ok(Some(u64::from_le_bytes(
                f.body.try_into().expect("8 bytes"),
            )));
        }
        match Control::decode(f.kind, f.body).map_err(malformed)? {
            Control::Shut { reason, detail } => {
                assert_eq!(reason, ShutReason::Error);
                Ok(Some(detail.len() as u64))
            }
            other => panic!("heartbeats never reach the protocol, got {other:?}"),
        }
    }
}

fn timing() -> Timing {
    Timing {
        heartbeat: Duration::from_millis(50),
        silence: Duration::from_millis(600),
        ..Timing::default()
    }
}

/// Two connected connections (main, urgent) at each end, with the silence deadline.
fn ends() -> ((Conn, Conn), (Conn, Conn)) {
    let conn = |s: UnixStream| {
        let mut c = Conn::plain(Socket::Unix(s)).unwrap();
        c.set_deadline(timing().silence).unwrap();
        c
    };
    let (a1, b1) = UnixStream::pair().unwrap();
    let (a2, b2) = UnixStream::pair().unwrap();
    ((conn(a1), conn(a2)), (conn(b1), conn(b2)))
}

fn pair(conns: (Conn, Conn)) -> Pair<u64, Error> {
    Pair::new(conns, Arc::new(Numbers), &timing()).unwrap()
}

#[test]
fn frames_reach_the_other_side_on_their_channel_and_an_idle_pair_stays_up() {
    let (a, b) = ends();
    let (a, b) = (pair(a), pair(b));
    for (chan, n) in [(&a.main, 7u64), (&a.urgent, 8)] {
        chan.send_with(|buf| put_frame(buf, KIND, |w| w.u64(n)))
            .unwrap();
    }
    let mut got = vec![b.next("a number", Duration::from_secs(5)).unwrap()];
    got.push(b.next("a number", Duration::from_secs(5)).unwrap());
    got.sort_by_key(|(_, n)| *n);
    let channels: Vec<_> = got.iter().map(|(c, n)| (c.name(), *n)).collect();
    assert_eq!(channels, [("main", 7), ("urgent", 8)]);
    // Three silence deadlines with nothing but heartbeats: still up, nothing queued.
    let idle = timing().silence * 3;
    assert!(matches!(b.next_within(idle), Ok(None)));
    assert!(matches!(a.next_within(Duration::ZERO), Ok(None)));
    assert!(!a.cutter.is_cut() && !b.cutter.is_cut());
}

#[test]
fn a_silent_peer_breaks_the_pair_within_the_deadline() {
    let (a, frozen) = ends();
    let a = pair(a);
    let t = Instant::now();
    let err = a.wait().expect_err("a silent peer");
    let took = t.elapsed();
    assert!(
        matches!(err, Error::Link(LinkError::Silent { .. })),
        "{err:?}"
    );
    let silence = timing().silence;
    assert!(
        took >= silence && took < silence * 4,
        "broken after {took:?} (deadline {silence:?})"
    );
    drop(frozen);
}

#[test]
fn a_peer_that_closes_breaks_the_pair_at_once_and_the_first_cause_is_kept() {
    let (a, b) = ends();
    let a = pair(a);
    drop(b);
    let t = Instant::now();
    let err = a.wait().expect_err("closed");
    assert!(
        // Its reader sees the end, or the heartbeat a broken pipe, whichever is first.
        matches!(
            err,
            Error::Link(LinkError::Closed { .. } | LinkError::Io { .. })
        ),
        "{err:?}"
    );
    assert!(t.elapsed() < timing().silence, "{:?}", t.elapsed());
}

#[test]
fn a_send_that_fails_after_a_cut_reports_the_cut_s_cause() {
    let (a, _b) = ends();
    let a = pair(a);
    let after = Duration::from_millis(1);
    a.cut(LinkError::NoAnswer {
        expected: "an answer",
        after,
    });
    // The cut shut the sockets down: a send now fails, and says nothing of why.
    let failed = a
        .main
        .send_with(|buf| put_frame(buf, KIND, |w| w.u64(1)))
        .expect_err("the connection was shut down");
    assert!(matches!(failed, LinkError::Io { .. }), "{failed:?}");
    let reported = a.cause(failed);
    assert!(
        matches!(
            reported,
            LinkError::NoAnswer {
                expected: "an answer",
                ..
            }
        ),
        "{reported:?}"
    );
    // Reported once: a later error is its own.
    let later = a.cause(LinkError::Cut);
    assert!(matches!(later, LinkError::Cut), "{later:?}");
}

#[test]
fn a_send_error_on_a_pair_nobody_cut_is_reported_as_it_is_and_cuts_the_pair() {
    let (a, _b) = ends();
    let a = pair(a);
    let e = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
    let reported = a.cause(LinkError::Io {
        channel: a.main.channel,
        source: e,
    });
    assert!(matches!(reported, LinkError::Io { .. }), "{reported:?}");
    assert!(a.cutter.is_cut());
}

#[test]
fn a_shut_reaches_the_peer_cut_on_a_character_boundary_and_the_shutting_side_waits_for_it_to_close()
{
    let (a, b) = ends();
    let a = pair(a);
    let b = pair(b);
    // Three-byte characters: MAX_DETAIL bytes would split one unless MAX_DETAIL % 3 == 0.
    let detail = "€".repeat(MAX_DETAIL);
    let within = Duration::from_secs(30);
    let shutting = std::thread::spawn(move || {
        let t = Instant::now();
        a.shut(&detail, within);
        t.elapsed()
    });
    let (_, len) = b.next("the SHUT", Duration::from_secs(10)).unwrap();
    assert_eq!(len as usize, MAX_DETAIL / 3 * 3);
    drop(b);
    // It returned when the peer closed, not at its bound.
    let took = shutting.join().unwrap();
    assert!(took < within / 2, "{took:?}");
}
