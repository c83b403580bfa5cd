//! Random operation sequences on the map and on the reference model agree, result by
//! result and state by state.

use page_state::model::{check, Model, Op};
use page_state::{PageState, PageStateMap, Transition};
use proptest::prelude::*;

fn op(pages: usize) -> impl Strategy<Value = Op> {
    // Indices up to pages + 1 so out-of-range handling is compared too.
    let page = 0..=pages + 1;
    let transition = prop_oneof![
        Just(Transition::Receive),
        Just(Transition::MarkZero),
        Just(Transition::Discard),
        Just(Transition::Release),
    ];
    let state = prop_oneof![
        Just(PageState::Missing),
        Just(PageState::Requested),
        Just(PageState::Received),
        Just(PageState::Zero),
    ];
    prop_oneof![
        4 => page.clone().prop_map(Op::Request),
        3 => page.clone().prop_map(Op::Receive),
        2 => page.clone().prop_map(Op::MarkZero),
        2 => page.clone().prop_map(Op::Discard),
        2 => page.clone().prop_map(Op::Release),
        3 => (transition, page.clone(), page.clone()).prop_map(|(t, a, b)| Op::Range(t, a.min(b), a.max(b))),
        1 => (Just(Transition::Discard), page.clone(), page.clone()).prop_map(|(t, a, b)| Op::Range(t, a.max(b), a.min(b))),
        2 => (state, page.clone(), page.clone()).prop_map(|(s, a, b)| Op::Count(s, a.min(b), a.max(b))),
        2 => page.clone().prop_map(Op::NextMissing),
        1 => page.prop_map(Op::Runs),
        1 => Just(Op::ExportImport),
        1 => any::<u64>().prop_map(Op::Import),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Op>)> {
    (1usize..300).prop_flat_map(|pages| (Just(pages), proptest::collection::vec(op(pages), 1..200)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn map_and_model_agree_on_random_operation_sequences((pages, ops) in scenario()) {
        let map = PageStateMap::new(pages);
        let mut model = Model::new(pages);
        for op in ops {
            if let Err(diff) = check(&map, &mut model, op) {
                prop_assert!(false, "{}", diff);
            }
        }
    }

    #[test]
    fn filled_maps_start_in_the_given_state(pages in 0usize..200, s in 0usize..4) {
        let state = PageState::ALL[s];
        let map = PageStateMap::filled(pages, state);
        prop_assert_eq!(map.count(state), pages);
        prop_assert!(map.states().all(|x| x == state));
        prop_assert_eq!(map.next_missing(0).is_some(), state == PageState::Missing && pages > 0);
    }
}

#[test]
fn illegal_transitions_name_page_state_and_transition() {
    let map = PageStateMap::new(40);
    map.request(33).expect("request");
    let err = map.mark_zero(33).expect_err("requested → zero is illegal");
    assert_eq!(
        err.to_string(),
        "page 33: cannot mark zero a requested page"
    );
    assert_eq!(map.get(33), Ok(PageState::Requested), "never applied");
    let err = map
        .mark_zero_range(30, 36)
        .expect_err("range with a requested page");
    match err {
        page_state::Error::PartlyRefused {
            first,
            refused,
            changed,
        } => {
            assert_eq!(
                (first.page, first.found, refused, changed),
                (33, PageState::Requested, 1, 5)
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(map.get(40).is_err(), "out of range");
}

/// The last index there is: out of range like any other, never an overflow panic while
/// the error names the range (`i + 1` overflowed in debug builds).
#[test]
fn the_largest_index_is_out_of_range_not_an_overflow() {
    let bits = page_state::Bitmap::new(10);
    assert!(!bits.test(usize::MAX));
    assert!(bits.set(usize::MAX), "beyond the end reads as set");
    assert!(!bits.clear(usize::MAX));
    let map = page_state::PageStateMap::new(10);
    assert!(map.get(usize::MAX).is_err());
}
