//! Fuzzes the chunked-image manifest decoder as a reader of untrusted manifests calls it,
//! with a bound (`Manifest::decode_limited`): any bytes must decode to a manifest or be
//! refused with an error — never a panic, never a chunk table beyond what the bound allows
//! (4 GiB here: at most 16 Ki entries, however short the input) — and whatever decodes must
//! encode back to the same bytes. (`Manifest::decode`, bounded by the format's limits
//! only, lets a 160-byte manifest of zero runs declare a table of millions of entries: the
//! fuzzer spent its time filling them.)
#![no_main]

use chunked::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode_limited(data, 4 << 30) {
        assert!(m.chunks().len() <= 16 << 10, "the bound holds");
        assert_eq!(m.encode(), data, "a decoded manifest re-encodes to its bytes");
    }
});
