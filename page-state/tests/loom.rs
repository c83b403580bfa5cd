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

#[test]
fn release_racing_a_request_and_an_arrival_never_passes_through_received() {
    loom::model(|| {
        let map = Arc::new(PageStateMap::new(32));
        assert_eq!(map.request(3), Ok(RequestOutcome::Requested));
        // The claimant gives the page back while a fault asks for it and it arrives.
        let releaser = {
            let map = map.clone();
            thread::spawn(move || map.release(3))
        };
        let requester = {
            let map = map.clone();
            thread::spawn(move || map.request(3).expect("in range"))
        };
        let arrived_over = map.mark_received(3).expect("legal from missing/requested");
        let released = releaser.join().expect("releaser");
        let asked = requester.join().expect("requester");
        match released {
            Ok(previous) => assert_eq!(previous, PageState::Requested),
            // Only an arrival can take the page out of Requested before the release.
            Err(Error::Illegal(e)) => assert_eq!(e.found, PageState::Received),
            Err(other) => panic!("{other:?}"),
        }
        match asked {
            // A new claim exists only after a successful release, and the arrival then
            // found it Requested again.
            RequestOutcome::Requested => {
                assert!(released.is_ok());
                assert_eq!(arrived_over, PageState::Requested);
            }
            RequestOutcome::AlreadyRequested | RequestOutcome::AlreadyReceived => {}
            RequestOutcome::IsZero => panic!("nobody marked it zero"),
        }
        if arrived_over == PageState::Missing {
            // The release came first and the request did not claim in between.
            assert!(released.is_ok());
            assert_ne!(asked, RequestOutcome::Requested);
        }
        assert_eq!(map.get(3), Ok(PageState::Received));
    });
}

#[test]
fn release_range_racing_requests_on_one_word_keeps_each_claim() {
    loom::model(|| {
        let map = Arc::new(PageStateMap::new(32));
        for page in 0..3 {
            assert_eq!(map.request(page), Ok(RequestOutcome::Requested));
        }
        // A prefetcher gives back its run 0..3 while faults ask for pages 1 and 4.
        let faulter = {
            let map = map.clone();
            thread::spawn(move || (map.request(1).expect("in range"), map.request(4)))
        };
        let released = map.release_range(0, 3).expect("all requested or missing");
        let (one, four) = faulter.join().expect("faulter");
        assert_eq!(
            four,
            Ok(RequestOutcome::Requested),
            "a neighbour is untouched"
        );
        assert_eq!(map.get(4), Ok(PageState::Requested));
        match one {
            // Asked after the release: a fresh claim that the release did not undo.
            RequestOutcome::Requested => assert_eq!(map.get(1), Ok(PageState::Requested)),
            // Asked before: it waits on the claim, which the release gave back.
            RequestOutcome::AlreadyRequested => assert_eq!(map.get(1), Ok(PageState::Missing)),
            other => panic!("{other:?}"),
        }
        assert_eq!(released, 3);
        assert_eq!(map.get(0), Ok(PageState::Missing));
        assert_eq!(map.get(2), Ok(PageState::Missing));
    });
}

#[test]
fn bitmap_claims_are_exclusive_and_lose_no_neighbour() {
    loom::model(|| {
        let bits = Arc::new(page_state::Bitmap::new(64));
        bits.set(5);
        let other = {
            let bits = bits.clone();
            thread::spawn(move || (bits.clear(5), bits.set(6)))
        };
        let mine = bits.clear(5);
        let (theirs, six_was_set) = other.join().expect("thread");
        assert!(mine ^ theirs, "exactly one clearer claims the bit");
        assert!(!six_was_set);
        assert!(!bits.test(5) && bits.test(6));
    });
}
