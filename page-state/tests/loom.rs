//! Loom model checks of racing transitions on pages that share one word. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p page-state --release --test loom`.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use page_state::{Error, PageState, PageStateMap, RequestOutcome};

#[test]
fn exactly_one_of_two_requesters_wins() {
    loom::model(|| {
        let map = Arc::new(PageStateMap::new(32));
        let other = {
            let map = map.clone();
            thread::spawn(move || map.request(5).expect("in range"))
        };
        let mine = map.request(5).expect("in range");
        let theirs = other.join().expect("thread");
        let wins = [mine, theirs]
            .iter()
            .filter(|&&o| o == RequestOutcome::Requested)
            .count();
        assert_eq!(wins, 1, "{mine:?} / {theirs:?}");
        assert_eq!(map.get(5), Ok(PageState::Requested));
    });
}

#[test]
fn three_threads_on_one_word_lose_no_update() {
    loom::model(|| {
        let map = Arc::new(PageStateMap::new(32));
        let a = {
            let map = map.clone();
            thread::spawn(move || map.request(0))
        };
        let b = {
            let map = map.clone();
            thread::spawn(move || map.mark_zero(1))
        };
        let c = map.mark_received(2);
        assert_eq!(a.join().expect("a"), Ok(RequestOutcome::Requested));
        assert_eq!(b.join().expect("b"), Ok(PageState::Missing));
        assert_eq!(c, Ok(PageState::Missing));
        assert_eq!(map.get(0), Ok(PageState::Requested));
        assert_eq!(map.get(1), Ok(PageState::Zero));
        assert_eq!(map.get(2), Ok(PageState::Received));
    });
}

#[test]
fn request_racing_arrival_ends_received_and_stays_consistent() {
    loom::model(|| {
        let map = Arc::new(PageStateMap::new(32));
        let requester = {
            let map = map.clone();
            thread::spawn(move || map.request(3).expect("in range"))
        };
        let receiver = {
            let map = map.clone();
            thread::spawn(move || map.mark_received(3).expect("legal from missing/requested"))
        };
        let asked = requester.join().expect("requester");
        let previous = receiver.join().expect("receiver");
        match asked {
            // The request came first: the arrival found it Requested.
            RequestOutcome::Requested => assert_eq!(previous, PageState::Requested),
            // The arrival came first: the request only needs a wake.
            RequestOutcome::AlreadyReceived => assert_eq!(previous, PageState::Missing),
            other => panic!("impossible outcome {other:?}"),
        }
        assert_eq!(map.get(3), Ok(PageState::Received));
    });
}

#[test]
fn range_discard_racing_single_ops_applies_only_legal_transitions() {
    loom::model(|| {
        let map = Arc::new(PageStateMap::new(32));
        map.mark_received_range(0, 4).expect("setup");
        let zeroer = {
            let map = map.clone();
            thread::spawn(move || map.mark_zero(1))
        };
        let requester = {
            let map = map.clone();
            thread::spawn(move || map.request(2).expect("in range"))
        };
        let discarded = map.discard_range(0, 4);
        let zeroed = zeroer.join().expect("zeroer");
        let asked = requester.join().expect("requester");
        // Page 1: zeroed either from Received (before the discard, which then refuses it)
        // or from Missing (after the discard).
        match (zeroed, discarded) {
            (
                Ok(PageState::Received),
                Err(Error::PartlyRefused {
                    first,
                    refused: 1,
                    changed: 3,
                }),
            ) => {
                assert_eq!((first.page, first.found), (1, PageState::Zero));
            }
            (Ok(PageState::Missing), Ok(4)) => {}
            other => panic!("inconsistent outcome {other:?}"),
        }
        assert_eq!(map.get(1), Ok(PageState::Zero));
        // Page 2: granted only if the discard made it Missing first; otherwise the
        // request saw it Received and the discard then made it Missing.
        match asked {
            RequestOutcome::Requested => assert_eq!(map.get(2), Ok(PageState::Requested)),
            RequestOutcome::AlreadyReceived => assert_eq!(map.get(2), Ok(PageState::Missing)),
            other => panic!("{other:?}"),
        }
    });
}
