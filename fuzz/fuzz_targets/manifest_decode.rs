//! Fuzzes the chunked-image manifest decoder: any bytes must decode to a manifest or be
//! refused with an error — never a panic, never an allocation the input does not justify —
//! and whatever decodes must encode back to the same bytes.
#![no_main]

use chunked::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.encode(), data, "a decoded manifest re-encodes to its bytes");
    }
});
