//! Wire-format costs per 1 MiB of page data, each beside its baseline in the same run: a
//! plain 1 MiB memcpy (what any transport must at least do once) and a bare CRC-32 pass.
//! Decoding a PAGES frame borrows the data (`decode_frame`): its cost should be the CRC.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use postcopy::wire::{decode, decode_frame, encode, Advise, Features, Limits, Message, WireRegion};

const BYTES: usize = 1 << 20;

fn limits() -> Limits {
    Limits::default().advised(&Advise {
        page_size: 4096,
        page_count: 1 << 20,
        features: Features::ZERO_RUNS,
        regions: vec![WireRegion {
            first_page: 0,
            pages: 1 << 20,
        }],
        image: 0,
    })
}

fn frames(c: &mut Criterion) {
    let data: Vec<u8> = (0..BYTES).map(|i| (i * 31 % 251) as u8).collect();
    let msg = Message::Pages {
        first: 4096,
        data: data.clone(),
    };
    let mut frame = Vec::new();
    encode(&msg, &mut frame);
    let limits = limits();

    let mut g = c.benchmark_group("wire_1mib");
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("baseline_memcpy", |b| {
        let mut dst = vec![0u8; BYTES];
        b.iter(|| {
            dst.copy_from_slice(black_box(&data));
            black_box(&dst);
        })
    });
    g.bench_function("baseline_crc32", |b| {
        b.iter(|| black_box(crc32fast::hash(black_box(&data))))
    });
    g.bench_function("encode_pages", |b| {
        let mut out = Vec::with_capacity(BYTES + 64);
        b.iter(|| {
            out.clear();
            encode(black_box(&msg), &mut out);
            black_box(&out);
        })
    });
    g.bench_function("decode_frame_borrowed", |b| {
        b.iter(|| black_box(decode_frame(black_box(&frame), &limits).expect("valid")))
    });
    g.bench_function("decode_owned", |b| {
        b.iter(|| black_box(decode(black_box(&frame), &limits).expect("valid")))
    });
    g.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
