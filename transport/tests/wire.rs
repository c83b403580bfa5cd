//! The link's messages round-trip, and malformed frames get a typed error.

use proptest::prelude::*;
use transport::link::{Channel, Role, ShutReason};
use transport::wire::{
    envelope, kind, open_frame, open_frame_with, peek_channel, put_frame, Control, WireError,
    DEFAULT_MAX_BODY, MAX_DETAIL,
};

fn control() -> impl Strategy<Value = Control> {
    let nonce = proptest::array::uniform32(any::<u8>());
    prop_oneof![
        (
            proptest::array::uniform8(any::<u8>()),
            any::<u16>(),
            any::<u64>(),
            any::<(bool, bool, u64, u32)>()
        )
            .prop_map(|(magic, version, features, (r, c, session, generation))| {
                Control::Hello {
                    magic,
                    version,
                    features,
                    role: if r { Role::Source } else { Role::Destination },
                    channel: if c { Channel::Urgent } else { Channel::Main },
                    session,
                    generation,
                }
            }),
        nonce.prop_map(|nonce| Control::Challenge { nonce }),
        (nonce, nonce).prop_map(|(proof, nonce)| Control::Auth { proof, nonce }),
        nonce.prop_map(|proof| Control::AuthOk { proof }),
        Just(Control::StartTls),
        Just(Control::Admitted),
        any::<u64>().prop_map(|seq| Control::Ping { seq }),
        any::<u64>().prop_map(|seq| Control::Pong { seq }),
        ("[a-zA-Z0-9 é]{0,100}", 0..ShutReason::ALL.len()).prop_map(|(detail, r)| {
            Control::Shut {
                reason: ShutReason::ALL[r],
                detail,
            }
        }),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips_and_every_cut_short_of_it_is_incomplete(msg in control()) {
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        prop_assert!(kind::is_link(frame[4]));
        let (back, used) = Control::decode_frame(&frame, DEFAULT_MAX_BODY).unwrap().unwrap();
        prop_assert_eq!(back, msg);
        prop_assert_eq!(used, frame.len());
        for cut in 0..frame.len() {
            prop_assert_eq!(Control::decode_frame(&frame[..cut], DEFAULT_MAX_BODY), Ok(None));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Control::decode_frame(&bytes, 1024);
        let _ = peek_channel(&bytes);
    }
}

fn raw(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    put_frame(&mut f, kind, |w| w.bytes(body));
    f
}

/// A frame sent straight from the caller's memory: header, parts, trailer.
fn enveloped(kind: u8, parts: &[&[u8]], sealed: bool) -> Vec<u8> {
    let (head, trailer) = envelope(kind, parts, sealed);
    [&head[..], &parts.concat(), &trailer[..]].concat()
}

#[test]
fn only_a_sealed_connection_takes_a_frame_without_its_checksum() {
    let parts: [&[u8]; 2] = [b"first", &[0xa5; 100]];
    // Unsealed, the envelope's frame is the one `put_frame` writes.
    let body = parts.concat();
    assert_eq!(enveloped(42, &parts, false), raw(42, &body));
    let sealed = enveloped(42, &parts, true);
    assert_eq!(sealed[sealed.len() - 4..], [0; 4], "no checksum computed");
    assert_eq!(
        open_frame(&sealed, 1024).map(|o| o.map(|f| f.kind)),
        Err(WireError::BadChecksum { kind: 42 })
    );
    let opened = open_frame_with(&sealed, 1024, true).unwrap().unwrap();
    assert_eq!(
        (opened.kind, opened.body, opened.len),
        (42, &body[..], sealed.len())
    );
    // Sealed, everything but the checksum is still checked.
    let mut reserved = sealed.clone();
    reserved[6] = 1;
    assert_eq!(
        open_frame_with(&reserved, 1024, true).map(|o| o.map(|f| f.kind)),
        Err(WireError::Reserved { kind: 42 })
    );
    assert_eq!(
        open_frame_with(&sealed, 64, true).map(|o| o.map(|f| f.kind)),
        Err(WireError::Oversize {
            len: body.len(),
            max: 64
        })
    );
}

#[test]
fn a_frame_with_a_bad_checksum_reserved_bits_or_extra_bytes_is_refused() {
    let mut f = raw(kind::PING, &7u64.to_le_bytes());
    let last = f.len() - 1;
    f[last] ^= 1;
    assert_eq!(
        open_frame(&f, 64).map(|o| o.map(|f| f.kind)),
        Err(WireError::BadChecksum { kind: kind::PING })
    );
    let mut g = raw(kind::PING, &7u64.to_le_bytes());
    g[6] = 1;
    assert!(matches!(
        Control::decode_frame(&g, 64),
        Err(WireError::BadChecksum { .. } | WireError::Reserved { .. })
    ));
    let long = raw(kind::PING, &[0; 9]);
    assert_eq!(
        Control::decode_frame(&long, 64),
        Err(WireError::Trailing {
            kind: kind::PING,
            extra: 1
        })
    );
    let short = raw(kind::PING, &[0; 7]);
    assert_eq!(
        Control::decode_frame(&short, 64),
        Err(WireError::Truncated { kind: kind::PING })
    );
    assert_eq!(
        Control::decode_frame(&raw(99, &[]), 64),
        Err(WireError::UnknownKind(99))
    );
    let mut big = raw(kind::PING, &[]);
    big[..4].copy_from_slice(&65u32.to_le_bytes());
    assert_eq!(
        Control::decode_frame(&big, 64),
        Err(WireError::Oversize { len: 65, max: 64 })
    );
}

#[test]
fn a_shut_detail_longer_than_allowed_or_not_utf8_is_refused() {
    let mut body = vec![ShutReason::Error as u8];
    body.extend_from_slice(&(MAX_DETAIL as u16 + 1).to_le_bytes());
    body.extend_from_slice(&vec![b'x'; MAX_DETAIL + 1]);
    assert!(matches!(
        Control::decode_frame(&raw(kind::SHUT, &body), DEFAULT_MAX_BODY),
        Err(WireError::OutOfRange { .. })
    ));
    let bad = [&[ShutReason::Error as u8, 2, 0][..], &[0xff, 0xfe]].concat();
    assert_eq!(
        Control::decode_frame(&raw(kind::SHUT, &bad), DEFAULT_MAX_BODY),
        Err(WireError::Invalid("shut detail is not UTF-8"))
    );
}

#[test]
fn a_proxy_tells_the_channel_from_the_first_bytes_once_the_hello_is_whole() {
    let mut frame = Vec::new();
    Control::Hello {
        magic: *b"ANYPROTO",
        version: 1,
        features: 0,
        role: Role::Source,
        channel: Channel::Urgent,
        session: 3,
        generation: 1,
    }
    .encode(&mut frame);
    assert_eq!(peek_channel(&frame[..frame.len() - 1]), None);
    assert_eq!(peek_channel(&frame), Some(Ok(Channel::Urgent)));
    let ping = raw(kind::PING, &1u64.to_le_bytes());
    assert_eq!(
        peek_channel(&ping),
        Some(Err(WireError::UnknownKind(kind::PING)))
    );
}
