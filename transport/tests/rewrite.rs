//! A man in the middle of a pre-shared-key link: a real TCP proxy between a real
//! [`Dialer`] and a real [`Acceptor`] that rewrites one field of each HELLO (and its
//! checksum, which proves nothing) and passes every other byte as it came. The proofs
//! cover everything both ends said, so the listener refuses a HELLO the opener did not send.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use transport::link::{Acceptor, Admission, Admit, Channel, Dialer, Role, Timing};
use transport::wire::{frame_len, Control, Protocol, DEFAULT_MAX_BODY, HEADER_LEN};
use transport::{Addr, Error, Key, Listener, Refusal, Security};

const PROTOCOL: Protocol = Protocol {
    magic: *b"TESTPROT",
    version: 3,
    features: 0b101,
};

fn key() -> Security {
    Key::new(*b"a key of twenty-four b..").unwrap().into()
}

/// Reads the opener's first frame (its HELLO) whole, nothing past it.
fn first_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = vec![0u8; HEADER_LEN];
    s.read_exact(&mut buf).expect("a HELLO header");
    let len = frame_len(&buf, DEFAULT_MAX_BODY)
        .expect("a frame")
        .expect("a whole header");
    buf.resize(len, 0);
    s.read_exact(&mut buf[HEADER_LEN..]).expect("a HELLO");
    buf
}

/// Copies `from` into `to` until `from` ends, then ends `to`'s sending side.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// A proxy to `upstream` that re-encodes each connection's HELLO through `rewrite` and
/// passes everything else unchanged. Its address.
fn rewriting_proxy(upstream: Addr, rewrite: fn(&mut Control)) -> Addr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Addr::Tcp(to) = &upstream else {
                unreachable!("a TCP listener")
            };
            let mut server = TcpStream::connect(to).expect("connect upstream");
            let (mut hello, _) = Control::decode_frame(&first_frame(&mut client), DEFAULT_MAX_BODY)
                .expect("a valid HELLO")
                .expect("whole");
            rewrite(&mut hello);
            let mut frame = Vec::new();
            hello.encode(&mut frame);
            server.write_all(&frame).expect("forward the HELLO");
            let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            thread::spawn(move || pipe(c, s));
            thread::spawn(move || pipe(server, client));
        }
    });
    addr.to_string().parse().expect("an address")
}

/// The connection pair a dialer opens through a proxy applying `rewrite`: the dialer's
/// result, and how many connections the listener admitted.
fn dial_through(rewrite: fn(&mut Control)) -> (Result<(), Error>, u64) {
    let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap()).expect("bind");
    let acceptor = Acceptor::start(
        listener,
        (PROTOCOL, key()),
        (Timing::default(), Admission::default()),
        (Role::Source, Admit::AnySession),
        None,
    )
    .expect("an acceptor");
    let proxy = rewriting_proxy(acceptor.local_addr().unwrap(), rewrite);
    let mut dialer =
        Dialer::new(proxy, (PROTOCOL, key()), Role::Source, Timing::default()).expect("dialer");
    let opened = dialer.attempt().map(drop);
    if opened.is_ok() {
        // Both connections are counted once filed (after their AUTH_OK was sent).
        let until = Instant::now() + Duration::from_secs(10);
        assert!(acceptor.take(Some(dialer.session), until).is_some());
    }
    // A refused first connection ends the attempt: nothing was or will be admitted.
    let admitted = acceptor.stats().admitted.load(Ordering::Relaxed);
    (opened, admitted)
}

fn hello_field(msg: &mut Control, edit: impl FnOnce(&mut Channel, &mut u32, &mut u64)) {
    let Control::Hello {
        channel,
        generation,
        features,
        ..
    } = msg
    else {
        panic!("not a HELLO: {msg:?}")
    };
    edit(channel, generation, features);
}

#[test]
fn an_unchanged_hello_through_the_proxy_is_admitted() {
    let (opened, admitted) = dial_through(|_| {});
    opened.expect("admitted");
    assert_eq!(admitted, 2, "both connections admitted");
}

#[test]
fn a_hello_whose_channel_was_swapped_on_the_way_is_refused() {
    let (opened, admitted) = dial_through(|m| {
        hello_field(m, |channel, _, _| {
            *channel = match channel {
                Channel::Main => Channel::Urgent,
                Channel::Urgent => Channel::Main,
            }
        })
    });
    assert_refused(opened, admitted);
}

#[test]
fn a_hello_whose_generation_was_raised_on_the_way_is_refused() {
    let (opened, admitted) = dial_through(|m| hello_field(m, |_, g, _| *g += 1000));
    assert_refused(opened, admitted);
}

#[test]
fn a_hello_whose_features_were_changed_on_the_way_is_refused() {
    let (opened, admitted) = dial_through(|m| hello_field(m, |_, _, f| *f ^= 0b1));
    assert_refused(opened, admitted);
}

fn assert_refused(opened: Result<(), Error>, admitted: u64) {
    match opened {
        Err(Error::Refused {
            reason: Refusal::WrongKey,
        }) => {}
        Ok(()) => panic!("admitted with its HELLO rewritten ({admitted} connections)"),
        Err(e) => panic!("refused for another reason: {e}"),
    }
    assert_eq!(admitted, 0, "the listener admitted a rewritten HELLO");
}
