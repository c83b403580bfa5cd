//! Arbitrary bytes into the postcopy frame decoder, with and without an advised
//! geometry: it must never panic, and whatever it accepts must re-encode to the very
//! bytes it consumed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postcopy::wire::{decode, encode, Limits};

fuzz_target!(|data: &[u8]| {
    let advised = Limits {
        page_size: Some(4096),
        page_count: Some(1 << 16),
        ..Limits::default()
    };
    // Sealed (a TLS connection): the checksum is not checked, so every body decoder is
    // reached without the fuzzer having to find a CRC.
    let sealed = Limits {
        sealed: true,
        ..advised
    };
    for limits in [Limits::default(), advised, sealed] {
        let mut at = 0;
        while let Ok(Some((msg, used))) = decode(&data[at..], &limits) {
            let mut again = Vec::new();
            encode(&msg, &mut again);
            // Everything but the trailer, which a sealed decoder does not read.
            let checked = used - if limits.sealed { 4 } else { 0 };
            assert_eq!(
                &again[..checked],
                &data[at..at + checked],
                "{msg:?} re-encodes differently"
            );
            at += used;
        }
    }
});
