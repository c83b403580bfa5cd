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
    for limits in [Limits::default(), advised] {
        let mut at = 0;
        while let Ok(Some((msg, used))) = decode(&data[at..], &limits) {
            let mut again = Vec::new();
            encode(&msg, &mut again);
            assert_eq!(
                again.as_slice(),
                &data[at..at + used],
                "{msg:?} re-encodes differently"
            );
            at += used;
        }
    }
});
