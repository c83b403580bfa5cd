//! The wire format: every message round-trips; malformed input gets a typed error.

use postcopy::wire::*;
use proptest::prelude::*;

const PAGES: u64 = 1 << 20;

fn advised() -> Limits {
    Limits {
        page_size: Some(4096),
        page_count: Some(PAGES),
        ..Limits::default()
    }
}

fn range() -> impl Strategy<Value = PageRange> {
    (0..PAGES - 64, 1u64..64).prop_map(|(first, count)| PageRange { first, count })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            proptest::collection::vec((1u64..1000, 1u64..1000), 0..20),
            any::<u64>()
        )
            .prop_map(|(gaps, image)| {
                let mut first = 0;
                let regions = gaps
                    .into_iter()
                    .map(|(gap, pages)| {
                        let r = WireRegion {
                            first_page: first + gap,
                            pages,
                        };
                        first += gap + pages;
                        r
                    })
                    .collect();
                Message::Advise(Advise {
                    page_size: 4096,
                    page_count: PAGES,
                    features: Features::ZERO_RUNS,
                    regions,
                    image,
                })
            }),
        proptest::collection::vec(range(), 0..50).prop_map(|ranges| Message::Discard { ranges }),
        proptest::collection::vec(range(), 0..50).prop_map(|ranges| Message::ReqPages { ranges }),
        Just(Message::Listen),
        proptest::collection::vec(any::<u8>(), 0..600)
            .prop_map(|device_state| Message::Run { device_state }),
        Just(Message::End),
        (0..PAGES - 8, 1usize..8, any::<u8>()).prop_map(|(first, n, b)| Message::Pages {
            first,
            data: vec![b; n * 4096]
        }),
        range().prop_map(Message::ZeroRun),
        any::<u64>().prop_map(|seq| Message::Ack { seq }),
        any::<u64>().prop_map(|seq| Message::Sync { seq }),
        any::<u64>().prop_map(|seq| Message::Synced { seq }),
        proptest::collection::vec(any::<u64>(), (PAGES / 64) as usize)
            .prop_map(|words| Message::RecvBitmap { words }),
        (
            0..PAGES - 64,
            // At least one: an empty run is refused like an empty page range.
            proptest::collection::vec(any::<u64>(), 1..64)
        )
            .prop_map(|(first, digests)| Message::Digests { first, digests }),
        ("[a-zA-Z0-9 é]{0,100}", 0..ShutReason::ALL.len()).prop_map(|(detail, r)| {
            Message::Shut {
                reason: ShutReason::ALL[r],
                detail,
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(msg in message()) {
        let mut frame = Vec::new();
        encode(&msg, &mut frame);
        let decoded = decode(&frame, &advised());
        prop_assert_eq!(decoded, Ok(Some((msg, frame.len()))));
    }

    #[test]
    fn every_prefix_of_a_frame_asks_for_more(msg in message()) {
        let mut frame = Vec::new();
        encode(&msg, &mut frame);
        for cut in [0, 1, HEADER_LEN - 1, HEADER_LEN, frame.len() / 2, frame.len() - 1] {
            prop_assert_eq!(decode(&frame[..cut], &advised()), Ok(None), "cut at {}", cut);
        }
    }

    #[test]
    fn any_flipped_byte_is_an_error_never_a_panic_or_a_wrong_message(msg in message(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut frame = Vec::new();
        encode(&msg, &mut frame);
        let i = at.index(frame.len());
        frame[i] ^= 1 << bit;
        match decode(&frame, &advised()) {
            // A flipped length byte may make the frame look incomplete or oversized.
            Ok(None) | Err(_) => {}
            Ok(Some((other, _))) => prop_assert!(false, "corrupted frame decoded as {:?}", other),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes, &advised());
        let _ = decode(&bytes, &Limits::default());
    }
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut f = Vec::new();
    encode(msg, &mut f);
    f
}

/// Re-frames `body` under `kind` with a valid checksum.
fn raw(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&[kind, 0, 0, 0]);
    f.extend_from_slice(body);
    let crc = crc32fast_hash(&f[4..]);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

fn crc32fast_hash(bytes: &[u8]) -> u32 {
    // The same CRC-32 (IEEE) the format uses, bit by bit: an independent oracle.
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn the_checksum_is_crc32_ieee_over_kind_flags_reserved_and_body() {
    let f = frame(&Message::Ack { seq: 42 });
    assert_eq!(raw(31, &42u64.to_le_bytes()), f);
}

#[test]
fn oversize_frames_are_refused_before_reading_them() {
    let mut f = frame(&Message::Run {
        device_state: Vec::new(),
    });
    f[..4].copy_from_slice(&(DEFAULT_MAX_BODY as u32 + 1).to_le_bytes());
    assert!(matches!(
        decode(&f, &advised()),
        Err(WireError::Oversize { .. })
    ));
}

#[test]
fn unknown_kinds_and_the_links_handshake_kinds_are_refused() {
    assert_eq!(
        decode(&raw(99, &[]), &advised()),
        Err(WireError::UnknownKind(99))
    );
    // A HELLO (the transport's, kind 1) has no place inside a session.
    assert_eq!(
        decode(&raw(1, &[]), &advised()),
        Err(WireError::UnknownKind(1))
    );
}

#[test]
fn bad_checksum_and_reserved_bits_are_refused() {
    let mut f = frame(&Message::Sync { seq: 1 });
    let last = f.len() - 1;
    f[last] ^= 0xFF;
    assert_eq!(
        decode(&f, &advised()),
        Err(WireError::BadChecksum { kind: 15 })
    );
    let mut g = raw(15, &1u64.to_le_bytes());
    g[5] = 1;
    let crc = crc32fast_hash(&g[4..g.len() - 4]);
    let n = g.len();
    g[n - 4..].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(
        decode(&g, &advised()),
        Err(WireError::Reserved { kind: 15 })
    );
}

#[test]
fn truncated_and_trailing_bodies_are_refused() {
    assert_eq!(
        decode(&raw(31, &[1, 2, 3]), &advised()),
        Err(WireError::Truncated { kind: 31 })
    );
    assert_eq!(
        decode(&raw(31, &[0; 9]), &advised()),
        Err(WireError::Trailing { kind: 31, extra: 1 })
    );
}

#[test]
fn out_of_range_pages_are_refused_against_the_advised_geometry() {
    let beyond = Message::ZeroRun(PageRange {
        first: PAGES - 1,
        count: 2,
    });
    assert!(matches!(
        decode(&frame(&beyond), &advised()),
        Err(WireError::OutOfRange { .. })
    ));
    let req = Message::ReqPages {
        ranges: vec![PageRange {
            first: u64::MAX,
            count: 2,
        }],
    };
    assert!(matches!(
        decode(&frame(&req), &advised()),
        Err(WireError::OutOfRange { .. })
    ));
    let pages = Message::Pages {
        first: PAGES,
        data: vec![0; 4096],
    };
    assert!(matches!(
        decode(&frame(&pages), &advised()),
        Err(WireError::OutOfRange { .. })
    ));
    let before_advise = decode(
        &frame(&Message::Pages {
            first: 0,
            data: vec![0; 4096],
        }),
        &Limits::default(),
    );
    assert_eq!(
        before_advise,
        Err(WireError::Invalid("page data before ADVISE"))
    );
    let partial = Message::Pages {
        first: 0,
        data: vec![0; 100],
    };
    assert_eq!(
        decode(&frame(&partial), &advised()),
        Err(WireError::Invalid("page data is not whole pages"))
    );
}

#[test]
fn advise_geometry_is_checked() {
    let overlapping = Message::Advise(Advise {
        page_size: 4096,
        page_count: 100,
        features: Features::empty(),
        regions: vec![
            WireRegion {
                first_page: 0,
                pages: 10,
            },
            WireRegion {
                first_page: 5,
                pages: 10,
            },
        ],
        image: 0,
    });
    assert!(matches!(
        decode(&frame(&overlapping), &Limits::default()),
        Err(WireError::Invalid(_))
    ));
    let odd_page = Message::Advise(Advise {
        page_size: 8192,
        page_count: 100,
        features: Features::empty(),
        regions: vec![],
        image: 0,
    });
    assert!(matches!(
        decode(&frame(&odd_page), &Limits::default()),
        Err(WireError::OutOfRange { .. })
    ));
    let beyond = Message::Advise(Advise {
        page_size: 4096,
        page_count: 100,
        features: Features::empty(),
        regions: vec![WireRegion {
            first_page: 90,
            pages: 20,
        }],
        image: 0,
    });
    assert!(matches!(
        decode(&frame(&beyond), &Limits::default()),
        Err(WireError::OutOfRange { .. })
    ));
}

#[test]
fn a_lying_count_cannot_make_the_decoder_allocate() {
    let mut body = (u32::MAX).to_le_bytes().to_vec(); // "4 billion ranges"
    body.extend_from_slice(&[0; 16]);
    assert!(matches!(
        decode(&raw(30, &body), &advised()),
        Err(WireError::OutOfRange { .. })
    ));
    let mut body = 1000u32.to_le_bytes().to_vec(); // 1000 ranges, 1 present
    body.extend_from_slice(&[0; 16]);
    assert_eq!(
        decode(&raw(30, &body), &advised()),
        Err(WireError::Truncated { kind: 30 })
    );
}

#[test]
fn recv_bitmap_must_match_the_page_count() {
    let limits = Limits {
        page_count: Some(100),
        page_size: Some(4096),
        ..Limits::default()
    };
    let short = Message::RecvBitmap { words: vec![0] };
    assert!(matches!(
        decode(&frame(&short), &limits),
        Err(WireError::Invalid(_))
    ));
    let beyond = Message::RecvBitmap {
        words: vec![0, 1 << 40],
    };
    assert!(matches!(
        decode(&frame(&beyond), &limits),
        Err(WireError::Invalid(_))
    ));
    let ok = Message::RecvBitmap {
        words: vec![u64::MAX, (1 << 36) - 1],
    };
    assert!(matches!(decode(&frame(&ok), &limits), Ok(Some(_))));
}

#[test]
fn frames_decode_back_to_back_from_one_buffer() {
    let mut buf = Vec::new();
    for seq in 0..5 {
        encode(&Message::Sync { seq }, &mut buf);
    }
    let mut at = 0;
    for seq in 0..5 {
        let (msg, used) = decode(&buf[at..], &advised())
            .expect("valid")
            .expect("whole");
        assert_eq!(msg, Message::Sync { seq });
        at += used;
    }
    assert_eq!(at, buf.len());
}

#[test]
fn digests_beyond_the_page_count_are_refused() {
    let mut frame = Vec::new();
    encode(
        &Message::Digests {
            first: PAGES - 1,
            digests: vec![1, 2],
        },
        &mut frame,
    );
    assert!(matches!(
        decode(&frame, &advised()),
        Err(WireError::OutOfRange { .. })
    ));
}

proptest! {
    #[test]
    fn a_request_encoded_without_a_message_is_the_same_frame(
        ranges in proptest::collection::vec(range(), 0..50)
    ) {
        let (mut direct, mut via) = (Vec::new(), Vec::new());
        encode_request(&ranges, &mut direct);
        encode(&Message::ReqPages { ranges }, &mut via);
        prop_assert_eq!(direct, via);
    }
}

#[test]
fn run_carries_its_device_state_byte_for_byte() {
    let device_state: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let f = frame(&Message::Run {
        device_state: device_state.clone(),
    });
    let mut body = (device_state.len() as u32).to_le_bytes().to_vec();
    body.extend_from_slice(&device_state);
    assert_eq!(f, raw(13, &body), "RUN = length (u32) + the bytes");
    assert_eq!(
        decode(&f, &Limits::default()),
        Ok(Some((Message::Run { device_state }, f.len())))
    );
}

#[test]
fn run_with_a_device_state_too_long_or_cut_short_is_refused() {
    let too_long = (MAX_DEVICE_STATE as u32 + 1).to_le_bytes();
    assert!(matches!(
        decode(&raw(13, &too_long), &Limits::default()),
        Err(WireError::OutOfRange {
            what: "device state length",
            ..
        })
    ));
    let mut short = 10u32.to_le_bytes().to_vec();
    short.extend_from_slice(&[7; 9]);
    assert_eq!(
        decode(&raw(13, &short), &Limits::default()),
        Err(WireError::Truncated { kind: 13 })
    );
    let mut long = 2u32.to_le_bytes().to_vec();
    long.extend_from_slice(&[7; 3]);
    assert_eq!(
        decode(&raw(13, &long), &Limits::default()),
        Err(WireError::Trailing { kind: 13, extra: 1 })
    );
    // Version 4 sent RUN with an empty body: refused, never read as "no state".
    assert_eq!(
        decode(&raw(13, &[]), &Limits::default()),
        Err(WireError::Truncated { kind: 13 })
    );
}

/// What `send_page_data` wrote, decoded: (kind, first page, page count, data bytes).
fn page_frames(data: &[u8]) -> (Vec<(&'static str, u64, u64)>, u64) {
    use postcopy::net::SendMessage;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let out = Shared::default();
    let mut w = transport::conn::FrameWriter::new(Box::new(out.clone()));
    let sent = w.send_page_data(100, data, 4096).unwrap();
    let bytes = out.0.lock().unwrap().clone();
    let (mut frames, mut at) = (Vec::new(), 0);
    while at < bytes.len() {
        let (msg, used) = decode(&bytes[at..], &advised())
            .unwrap()
            .expect("whole frames");
        frames.push(match msg {
            Message::Pages { first, data } => ("PAGES", first, data.len() as u64 / 4096),
            Message::ZeroRun(r) => ("ZERO_RUN", r.first, r.count),
            other => panic!("unexpected {other:?}"),
        });
        at += used;
    }
    (frames, sent)
}

fn pages_with_zeros(n: usize, zero: impl Fn(usize) -> bool) -> Vec<u8> {
    let mut data = vec![0u8; n * 4096];
    for (i, page) in data.chunks_exact_mut(4096).enumerate() {
        if !zero(i) {
            page.fill(i as u8 | 1);
        }
    }
    data
}

#[test]
fn short_zero_runs_travel_inside_the_page_data_and_long_ones_as_zero_runs() {
    use postcopy::net::MIN_ZERO_RUN as MIN;
    // One page in seven zero (as `uffdkit migrate`'s image): one frame, every byte sent.
    let (frames, sent) = page_frames(&pages_with_zeros(64, |i| i % 7 == 6));
    assert_eq!(frames, [("PAGES", 100, 64)]);
    assert_eq!(sent, 64 * 4096);
    // A run of MIN zero pages in the middle is a ZERO_RUN between two PAGES.
    let (frames, sent) = page_frames(&pages_with_zeros(64, |i| (10..10 + MIN).contains(&i)));
    let rest = 64 - 10 - MIN as u64;
    assert_eq!(
        frames,
        [
            ("PAGES", 100, 10),
            ("ZERO_RUN", 110, MIN as u64),
            ("PAGES", 110 + MIN as u64, rest)
        ]
    );
    assert_eq!(sent, (64 - MIN as u64) * 4096);
    // One shorter stays inside; all zeros is one ZERO_RUN, whatever its length.
    let (frames, _) = page_frames(&pages_with_zeros(64, |i| (10..9 + MIN).contains(&i)));
    assert_eq!(frames, [("PAGES", 100, 64)]);
    let (frames, sent) = page_frames(&pages_with_zeros(3, |_| true));
    assert_eq!((frames, sent), (vec![("ZERO_RUN", 100, 3)], 0));
    // A long run at the end, and short zeros at the end of the data.
    let (frames, _) = page_frames(&pages_with_zeros(40, |i| i >= 20));
    assert_eq!(frames, [("PAGES", 100, 20), ("ZERO_RUN", 120, 20)]);
    let (frames, _) = page_frames(&pages_with_zeros(40, |i| i >= 30));
    assert_eq!(frames, [("PAGES", 100, 40)]);
}

/// A TLS connection is sealed (its AEAD authenticates every byte): the sender leaves the
/// checksum of page data out, and only a decoder told so takes the frame.
#[test]
fn page_data_without_its_checksum_decodes_only_on_a_sealed_connection() {
    let data = vec![7u8; 2 * 4096];
    let mut frame = Vec::new();
    encode(
        &Message::Pages {
            first: 5,
            data: data.clone(),
        },
        &mut frame,
    );
    let n = frame.len();
    frame[n - TRAILER_LEN..].fill(0); // as the sender writes it on a sealed connection
    assert!(matches!(
        decode_frame(&frame, &advised()),
        Err(WireError::BadChecksum { .. })
    ));
    let sealed = Limits {
        sealed: true,
        ..advised()
    };
    let (got, used) = decode_frame(&frame, &sealed).unwrap().unwrap();
    assert_eq!(
        (got, used),
        (
            Frame::Pages {
                first: 5,
                data: &data
            },
            n
        )
    );
    // Sealed, the geometry is still checked.
    let mut beyond = Vec::new();
    encode(
        &Message::Pages {
            first: PAGES - 1,
            data,
        },
        &mut beyond,
    );
    assert!(matches!(
        decode_frame(&beyond, &sealed),
        Err(WireError::OutOfRange { .. })
    ));
}

/// DIGESTS carry XXH3-64 of each page (wire version 6 on): both ends must compute exactly
/// that, whichever implementation and SIMD loop they run. The values are XXH3's seed-0
/// vectors as xxhash-rust 0.8.21 (another implementation) computes them.
#[test]
fn the_page_digest_is_xxh3_64() {
    use postcopy::migrate::digest;
    assert_eq!(digest(&[]), 0x2d06_8005_38d3_94c2);
    // 4 KiB takes XXH3's long-input loop (over 240 bytes), the one that has SIMD paths.
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(digest(&page), 0x5d90_27c8_4d5f_33f7);
}
