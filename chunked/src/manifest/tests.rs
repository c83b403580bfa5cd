//! The manifest's unit tests: encoding round trips, and every malformed input the decoder
//! must refuse with its typed error.

use super::codec::TAG_ZERO;
use super::*;

/// Found by the fuzzer: a 45-byte manifest whose header claims a length of ~2^41 bytes
/// in 4 KiB chunks and whose one zero run then made the decoder allocate ~29 GB.
#[test]
fn a_huge_declared_length_is_refused_before_allocating() {
    let input = b"UFFDIMG\0\x01\0\x01\0\0\0\x01\0\0\0\x02\0#\xd7\xff\xd7\xd7\xd7\x01\0\0\
        \xec\xeb\xeb\0\0\0\0\0\0\0\0\0\0\0\x01$";
    assert_eq!(input.len(), 45);
    assert!(
        matches!(
            Manifest::decode(input),
            Err(ManifestError::TooManyChunks(_))
        ),
        "{:?}",
        Manifest::decode(input).map(|m| m.geometry)
    );
    let g = Geometry {
        page_size: 4096,
        chunk_size: 4096,
        len: (MAX_CHUNKS + 1) * 4096,
    };
    assert_eq!(
        g.validate(),
        Err(ManifestError::TooManyChunks(MAX_CHUNKS + 1))
    );
}

/// A manifest of one zero run: the header and one entry, whatever the length.
fn zero_run(g: Geometry) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&[HashAlgorithm::Blake3.id(), 0]);
    b.extend_from_slice(&g.page_size.to_le_bytes());
    b.extend_from_slice(&g.chunk_size.to_le_bytes());
    b.extend_from_slice(&g.len.to_le_bytes());
    b.extend_from_slice(&g.chunk_count().to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.push(TAG_ZERO);
    b.extend_from_slice(&(g.chunk_count() as u32).to_le_bytes());
    let trailer = Digest::of(&b);
    b.extend_from_slice(&trailer.0);
    b
}

/// Issue 27: a 77-byte manifest declaring 1 PiB in 2^24 chunks cost its readers
/// 1.6–2.4 GB. Beyond a reader's bound it is refused from its header alone.
#[test]
fn a_manifest_beyond_the_readers_bound_is_refused_from_its_header() {
    let huge = zero_run(Geometry {
        page_size: 4096,
        chunk_size: MAX_CHUNK_SIZE,
        len: MAX_IMAGE_LEN,
    });
    assert_eq!(huge.len(), 77);
    assert!(matches!(
        Manifest::decode_limited(&huge, DEFAULT_MAX_IMAGE),
        Err(ManifestError::BeyondBound {
            len: MAX_IMAGE_LEN,
            ..
        })
    ));
    // Many small chunks within the length bound are refused too.
    let small_chunks = zero_run(Geometry {
        page_size: 4096,
        chunk_size: 4096,
        len: 1 << 30,
    });
    assert!(matches!(
        Manifest::decode_limited(&small_chunks, 16 << 30),
        Err(ManifestError::BeyondBound {
            chunks: 262_144,
            max_chunks: 65_536,
            ..
        })
    ));
    let m = Manifest::decode_limited(&small_chunks, 64 << 30).unwrap();
    assert_eq!(m.chunks().len(), 262_144);
}

fn geometry() -> Geometry {
    Geometry {
        page_size: 4096,
        chunk_size: 64 << 10,
        len: (10 << 16) - 4096,
    }
}

fn sample(parent: bool) -> Manifest {
    let mut chunks = vec![Chunk::Zero; 10];
    chunks[1] = Chunk::Data {
        digest: Digest::of(b"a"),
        pack: 0,
        offset: 0,
    };
    chunks[2] = chunks[1];
    chunks[5] = Chunk::Data {
        digest: Digest::of(b"b"),
        pack: 1,
        offset: 65536,
    };
    if parent {
        chunks[7] = Chunk::Inherited;
        chunks[8] = Chunk::Inherited;
    }
    let parent = parent.then(|| Parent {
        name: "base".into(),
        digest: Digest::of(b"base"),
    });
    Manifest::new(
        geometry(),
        parent,
        vec![Digest::of(b"p0"), Digest::of(b"p1")],
        chunks,
    )
    .unwrap()
}

#[test]
fn encode_decode_round_trips_with_and_without_parent() {
    for parent in [false, true] {
        let m = sample(parent);
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }
}

#[test]
fn every_truncation_is_refused() {
    let bytes = sample(true).encode();
    for n in 0..bytes.len() {
        assert!(
            Manifest::decode(&bytes[..n]).is_err(),
            "prefix of {n} bytes"
        );
    }
}

#[test]
fn a_flipped_bit_is_refused() {
    let bytes = sample(false).encode();
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x10;
        assert!(Manifest::decode(&b).is_err(), "bit flip at byte {i}");
    }
}

#[test]
fn malformed_headers_get_typed_errors() {
    let good = sample(false).encode();
    let mut b = good.clone();
    b[0] = b'X';
    assert_eq!(Manifest::decode(&b), Err(ManifestError::BadMagic));
    let mut b = good.clone();
    b[8] = 9;
    assert_eq!(
        Manifest::decode(&b),
        Err(ManifestError::UnsupportedVersion(9))
    );
    let mut b = good.clone();
    b[10] = 7;
    assert_eq!(Manifest::decode(&b), Err(ManifestError::UnknownHash(7)));
    let mut b = good.clone();
    b[12..16].copy_from_slice(&3000u32.to_le_bytes());
    assert_eq!(Manifest::decode(&b), Err(ManifestError::BadPageSize(3000)));
    let mut b = good;
    b.push(0);
    assert_eq!(Manifest::decode(&b), Err(ManifestError::TrailingBytes(1)));
}

#[test]
fn new_refuses_what_decode_would() {
    let g = geometry();
    assert!(matches!(
        Manifest::new(g, None, vec![], vec![Chunk::Zero; 3]),
        Err(ManifestError::ChunkCount { .. })
    ));
    assert_eq!(
        Manifest::new(g, None, vec![], vec![Chunk::Inherited; 10]),
        Err(ManifestError::InheritedWithoutParent(0))
    );
    let data = Chunk::Data {
        digest: Digest::of(b""),
        pack: 0,
        offset: u64::MAX,
    };
    assert_eq!(
        Manifest::new(g, None, vec![Digest::of(b"")], vec![data; 10]),
        Err(ManifestError::OffsetOverflow(0))
    );
    let bad = Geometry {
        chunk_size: 6000,
        ..g
    };
    assert!(matches!(
        Manifest::new(bad, None, vec![], vec![]),
        Err(ManifestError::BadChunkSize { .. })
    ));
}

#[test]
fn a_run_split_in_two_is_refused() {
    let g = Geometry {
        page_size: 4096,
        chunk_size: 4096,
        len: 2 * 4096,
    };
    let m = Manifest::new(g, None, vec![], vec![Chunk::Zero; 2]).unwrap();
    let mut b = m.encode();
    b.truncate(b.len() - 32);
    let n = b.len();
    // One run of two zero chunks becomes two runs of one.
    b[n - 4..].copy_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&[0, 1, 0, 0, 0]);
    let d = Digest::of(&b);
    b.extend_from_slice(&d.0);
    assert_eq!(Manifest::decode(&b), Err(ManifestError::SplitRun(1)));
}

#[test]
fn geometry_maps_offsets_to_chunks() {
    let g = geometry();
    assert_eq!(g.chunk_count(), 10);
    assert_eq!(g.chunk_of(65536 * 3 + 5), 3);
    assert_eq!(g.chunk_range(9), 9 * 65536..10 * 65536 - 4096);
}
