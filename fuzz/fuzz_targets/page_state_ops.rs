//! Bytes → a page count and an operation sequence, applied to the page state map and to
//! the reference model (the same checker the proptest suite uses); any disagreement or
//! panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use page_state::model::{check, Model, Op};
use page_state::PageStateMap;

fuzz_target!(|data: &[u8]| {
    let Some((&size, mut rest)) = data.split_first() else {
        return;
    };
    // 1..=320 pages: up to ten words, with partial last words.
    let pages = usize::from(size) % 320 + 1;
    let map = PageStateMap::new(pages);
    let mut model = Model::new(pages);
    while let Some((op, tail)) = Op::decode(rest, pages) {
        if let Err(diff) = check(&map, &mut model, op) {
            panic!("{diff}");
        }
        rest = tail;
    }
});
