//! Criterion benchmarks for the uffdkit crates live in `benches/`.
