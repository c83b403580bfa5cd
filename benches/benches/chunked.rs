//! Chunk verification cost per 512 KiB chunk (the default chunk size), beside its
//! baselines in the same run: a plain memcpy of the chunk, and SHA-256 (the hash the
//! workspace already had) — the numbers behind choosing BLAKE3 for chunk names. Also the
//! manifest decoder on a 512 MiB image's manifest (1024 chunks).

use std::hint::black_box;
use std::time::Duration;

use chunked::{Chunk, Digest, Geometry, Manifest};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sha2::Digest as _;

const CHUNK: usize = 512 << 10;

fn hashing(c: &mut Criterion) {
    let data: Vec<u8> = (0..CHUNK).map(|i| (i * 31 % 251) as u8).collect();
    let mut g = c.benchmark_group("chunk_512k");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("baseline_memcpy", |b| {
        let mut dst = vec![0u8; CHUNK];
        b.iter(|| dst.copy_from_slice(black_box(&data)));
    });
    g.bench_function("sha256", |b| {
        b.iter(|| sha2::Sha256::digest(black_box(&data)))
    });
    g.bench_function("blake3", |b| b.iter(|| Digest::of(black_box(&data))));
    g.finish();
}

fn manifest(c: &mut Criterion) {
    let geometry = Geometry {
        page_size: 4096,
        chunk_size: CHUNK as u32,
        len: 512 << 20,
    };
    let chunks: Vec<Chunk> = (0..1024u64)
        .map(|i| {
            if i % 16 == 15 {
                Chunk::Zero
            } else {
                Chunk::Data {
                    digest: Digest::of(&i.to_le_bytes()),
                    pack: 0,
                    offset: i * CHUNK as u64,
                }
            }
        })
        .collect();
    let m = Manifest::new(geometry, None, vec![Digest::of(b"pack")], chunks).expect("valid");
    let bytes = m.encode();
    let mut g = c.benchmark_group("manifest_512mib_image");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("decode", |b| b.iter(|| Manifest::decode(black_box(&bytes))));
    g.finish();
}

criterion_group!(benches, hashing, manifest);
criterion_main!(benches);
