//! The migration source's give-up bound runs from its last progress, not from its last
//! break: a path to the destination that accepts every new pair and lets its greeting
//! through (ADVISE, RECV_BITMAP, the ACK of the step) but nothing after it — frozen or
//! reset right there, in precopy, at the switch or in postcopy — moves no page and
//! acknowledges no step, however many pairs it accepts, and the source must end in
//! `GaveUp` within its bound instead of retrying forever.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{key, proxy_to, source_memory};
use pager::DeliveryMode;
use postcopy::fault::Event;
use postcopy::migrate::{DestOptions, Destination, Migration, SourceOptions, Timing};
use postcopy::Error;
use testkit::proxy::{CutMode, Direction, Proxy, Target};

/// The source's liveness: a freeze is noticed within about a second, and it gives up
/// after three without progress.
fn timing() -> Timing {
    Timing {
        heartbeat: Duration::from_millis(150),
        silence: Duration::from_secs(1),
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(300),
        give_up_after: Duration::from_secs(3),
    }
}

/// What the stalling path did.
#[derive(Default)]
struct Stalled {
    /// When it first cut (the phase's event), if it did.
    first: Option<Instant>,
    /// Pairs it cut.
    pairs: u64,
}

/// From the first event that `phase` picks on, cuts every pair with `mode` as soon as it
/// is up: at that event (the first pair), then at every resume (right after the
/// greeting). The cut is made on the source's own thread, before it sends anything more.
fn stall_from(
    proxy: Arc<Proxy>,
    mode: CutMode,
    phase: fn(Event) -> bool,
    m: &Migration,
) -> Arc<Mutex<Stalled>> {
    let stalled = Arc::new(Mutex::new(Stalled::default()));
    let s = stalled.clone();
    m.control().observe(Arc::new(move |e| {
        let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
        let now = match s.first {
            None => phase(e),
            Some(_) => e == Event::Resumed,
        };
        if now && proxy.cut_now(mode, Target::All) > 0 {
            s.first.get_or_insert_with(Instant::now);
            s.pairs += 1;
        }
    }));
    stalled
}

/// Migrates 8 MiB (`rounds` of precopy) through a path that stalls every pair from the
/// first event `phase` picks on; the source must give up once `give_up_after` passed
/// without progress — not before the bound after its start, and within a few silence
/// deadlines of it after the stall began — and the destination, left alone, too.
fn gives_up_without_progress(rounds: u32, mode: CutMode, phase: fn(Event) -> bool) {
    let t = timing();
    // The destination waits longer than the source: were the source to retry forever,
    // its pairs would keep the destination waiting too (it gives up from its last break).
    let dest_timing = Timing {
        give_up_after: Duration::from_secs(6),
        ..t
    };
    let opts = DestOptions {
        mode: DeliveryMode::Thread,
        timing: dest_timing,
        ..DestOptions::default()
    };
    let dest = Destination::bind(&"127.0.0.1:0".parse().unwrap(), key(), opts).unwrap();
    let proxy = proxy_to(&dest.local_addr().unwrap(), Direction::ToListener);
    let dest_t = std::thread::spawn(move || dest.run(|_| {}));
    let memory = source_memory(8 << 20);
    let opts = SourceOptions {
        max_rounds: rounds,
        switch_below_bytes: 0,
        timing: t,
        ..SourceOptions::default()
    };
    let m = common::migration_through(&proxy, &memory, opts);
    let control = m.control();
    let stalled = stall_from(proxy.clone(), mode, phase, &m);
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = m.run(|| {});
        let _ = tx.send((r, Instant::now()));
    });
    // The stall's last pair may have begun just before the bound: it is noticed broken
    // within a silence deadline (and a heartbeat), and one more pair may be greeted to
    // learn whether what the last one sent landed. Generous past that for a loaded machine.
    let bound = t.give_up_after + t.silence * 4 + t.max_backoff + Duration::from_secs(5);
    let Ok((src, ended)) = rx.recv_timeout(bound + Duration::from_secs(20)) else {
        // The source still reads it.
        std::mem::forget(memory);
        let s = stalled.lock().unwrap();
        panic!(
            "the source still retries {:?} after it began ({} stalled pairs, {} reconnects)",
            started.elapsed(),
            s.pairs,
            control.progress.link.reconnects()
        );
    };
    let s = stalled.lock().unwrap();
    let first = s.first.expect("the path stalled a pair");
    assert!(
        matches!(src, Err(Error::Transport(transport::Error::GaveUp { .. }))),
        "the source gave up: {src:?}"
    );
    assert!(s.pairs >= 2, "the path accepted new pairs: {}", s.pairs);
    let since_start = ended - started;
    assert!(
        since_start >= t.give_up_after,
        "the source gave up only after give_up_after without progress: {since_start:?}"
    );
    let since_stall = ended - first;
    assert!(
        since_stall < bound,
        "the source gave up within {bound:?} of the stall: {since_stall:?} ({} pairs)",
        s.pairs
    );
    eprintln!(
        "gave up {since_stall:.1?} after the stall began, {since_start:.1?} after the start, \
         {} pairs stalled",
        s.pairs
    );
    // The destination's own bound, from its last break.
    let dst = dest_t.join().expect("destination thread");
    assert!(dst.is_err(), "the destination did not complete: {dst:?}");
}

#[test]
fn a_source_whose_pairs_all_freeze_after_the_greeting_in_precopy_gives_up() {
    gives_up_without_progress(50, CutMode::Freeze, |e| matches!(e, Event::Round(1)));
}

#[test]
fn a_source_whose_pairs_all_reset_after_the_greeting_at_the_switch_gives_up() {
    gives_up_without_progress(1, CutMode::Reset, |e| e == Event::Stopped);
}

#[test]
fn a_source_whose_pairs_all_freeze_after_the_greeting_in_postcopy_gives_up() {
    gives_up_without_progress(0, CutMode::Freeze, |e| e == Event::Postcopy);
}

#[test]
fn a_source_whose_pairs_all_reset_after_the_greeting_in_postcopy_gives_up() {
    gives_up_without_progress(0, CutMode::Reset, |e| e == Event::Postcopy);
}

/// Pairs that each outlive `give_up_after` and then break still count as progress when
/// the pages they streamed landed: postcopy has no acknowledgement of its own, so the
/// source learns it only from the next pair's greeting (the destination holds more), and
/// must not give up before it asked. Each of three pairs streams until a frame of it was
/// placed at the destination, is held past the bound, and is reset; the migration then
/// completes, byte for byte, long past the bound.
#[test]
fn postcopy_pairs_that_outlive_the_bound_and_land_pages_keep_the_migration_going() {
    let give_up_after = Duration::from_secs(2);
    let cuts = 3;
    let mut case = common::Case::new("127.0.0.1:0", 32 << 20);
    case.opts.max_rounds = 0;
    case.opts.timing = Timing {
        give_up_after,
        ..common::test_timing()
    };
    // No faults at the destination: only the stream moves pages.
    case.workload = |_| std::thread::spawn(Vec::new);
    case.reconnects = Some(cuts);
    let proxy: Arc<Mutex<Option<Arc<Proxy>>>> = Arc::default();
    let px = proxy.clone();
    case.proxy = Some(Box::new(move |p: &Arc<Proxy>| {
        *px.lock().unwrap() = Some(p.clone());
    }));
    let dest = Arc::new(Mutex::new(None));
    let d = dest.clone();
    case.dst = Box::new(move |control| *d.lock().unwrap() = Some(control.clone()));
    case.src = Box::new(move |control| {
        let proxy = proxy.lock().unwrap().clone().expect("the proxy");
        let dest = dest.lock().unwrap().clone().expect("the destination");
        let placed = move || {
            dest.received
                .placed
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        // This pair's postcopy: when it began and the pages placed then; cuts made.
        let pair = Mutex::new((None, 0u64));
        control.observe(Arc::new(move |e| {
            let mut p = pair.lock().unwrap_or_else(|p| p.into_inner());
            match e {
                Event::Postcopy if p.1 < cuts => p.0 = Some((Instant::now(), placed())),
                // On the stream's thread: it sends nothing more until this returns.
                Event::PageFrame(postcopy::wire::Channel::Main) => {
                    let Some((began, before)) = p.0.take() else {
                        return;
                    };
                    let until = Instant::now() + Duration::from_secs(30);
                    while placed() <= before {
                        assert!(Instant::now() < until, "a frame of the pair was placed");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let held = began + give_up_after + Duration::from_millis(500);
                    std::thread::sleep(held.saturating_duration_since(Instant::now()));
                    assert!(proxy.cut_now(CutMode::Reset, Target::All) > 0, "cut");
                    p.1 += 1;
                }
                _ => {}
            }
        }));
    });
    let started = Instant::now();
    let (src, _) = case.run();
    assert_eq!(src.reconnects, cuts);
    assert!(
        started.elapsed() > give_up_after * cuts as u32,
        "the migration outlived its bound, with progress: {:?}",
        started.elapsed()
    );
}

/// When the source's pairs were cut and when it was greeted next.
#[derive(Default)]
struct Gaps {
    /// Cut at the stop, on a pair that progressed (its precopy confirmed, the workload
    /// stopped): (the cut, the next greeting).
    progressed: Option<(Instant, Option<Instant>)>,
    /// Cut right after that next greeting, so that pair brought nothing.
    nothing: Option<(Instant, Option<Instant>)>,
}

/// The backoff between pairs is for pairs that bring nothing: after one that progressed
/// the next is dialed at once, even though every connection before it succeeded (the
/// dialer keeps its backoff across connections unless told of progress). With a backoff
/// of 8 s, a pair that progressed and is reset is followed by the next one well within
/// it; the pair after it, reset right after its greeting, is followed only after it.
#[test]
fn a_pair_that_progressed_is_followed_at_once_and_one_that_brought_nothing_after_the_backoff() {
    let backoff = Duration::from_secs(8);
    let mut case = common::Case::new("127.0.0.1:0", 8 << 20);
    case.opts.max_rounds = 1;
    case.opts.timing = Timing {
        first_backoff: backoff,
        max_backoff: backoff,
        give_up_after: Duration::from_secs(120),
        ..common::test_timing()
    };
    case.reconnects = Some(2);
    let proxy: Arc<Mutex<Option<Arc<Proxy>>>> = Arc::default();
    let px = proxy.clone();
    case.proxy = Some(Box::new(move |p: &Arc<Proxy>| {
        *px.lock().unwrap() = Some(p.clone());
    }));
    let gaps = Arc::new(Mutex::new(Gaps::default()));
    let g = gaps.clone();
    case.src = Box::new(move |control| {
        let proxy = proxy.lock().unwrap().clone().expect("the proxy");
        control.observe(Arc::new(move |e| {
            let mut guard = g.lock().unwrap_or_else(|p| p.into_inner());
            let g = &mut *guard;
            let cut = |proxy: &Proxy| {
                let hit = proxy.cut_now(CutMode::Reset, Target::All);
                assert!(hit > 0, "the cut hit the pair");
                Some((Instant::now(), None))
            };
            match (e, &mut g.progressed, &mut g.nothing) {
                (Event::Stopped, progressed @ None, _) => *progressed = cut(&proxy),
                (Event::Resumed, Some((_, next @ None)), nothing) => {
                    *next = Some(Instant::now());
                    *nothing = cut(&proxy);
                }
                (Event::Resumed, _, Some((_, next @ None))) => *next = Some(Instant::now()),
                _ => {}
            }
        }));
    });
    case.run();
    let g = gaps.lock().unwrap();
    let gap = |w: Option<(Instant, Option<Instant>)>| {
        let (cut, next) = w.expect("the cut was made");
        next.expect("a next pair was greeted") - cut
    };
    let (after_progress, after_nothing) = (gap(g.progressed), gap(g.nothing));
    eprintln!("next pair greeted {after_progress:.1?} after a pair that progressed, {after_nothing:.1?} after one that brought nothing");
    assert!(
        after_progress < backoff,
        "a pair that progressed is followed at once, not after the backoff: {after_progress:?}"
    );
    assert!(
        after_nothing >= backoff,
        "a pair that brought nothing is followed after the backoff: {after_nothing:?}"
    );
}

/// A healthy postcopy pair may stay up idle for longer than the bound (demand-only, the
/// destination's workload touching nothing for a while): it broke without any failure of
/// progress on the source's side, and the source must reconnect, not give up at the break.
/// Nor may the destination, whose bound is as short. (It lives 3 s, past two silence
/// deadlines: a pair frozen after its greeting breaks one deadline after it.)
#[test]
fn an_idle_postcopy_pair_that_outlived_the_bound_and_broke_is_resumed() {
    let reconnects = idle_postcopy(1, |n, proxy| {
        if n == 1 {
            std::thread::spawn(move || {
                std::thread::sleep(IDLE_BOUND + Duration::from_secs(1));
                assert!(proxy.cut_now(CutMode::Reset, Target::All) > 0, "cut");
            });
        }
    });
    assert_eq!(reconnects, 1);
}

/// Both ends' give-up bound in the idle-pair tests (silence 1 s).
const IDLE_BOUND: Duration = Duration::from_secs(2);

/// Runs a demand-only postcopy of 1 MiB whose workload idles 6 s and then touches every
/// page, both ends' bound [`IDLE_BOUND`], through a proxy; `on_postcopy(n, proxy)` runs
/// at the source's `n`-th postcopy (from 1). Returns the source's reconnects, of which
/// `reconnects` are expected.
fn idle_postcopy(reconnects: u64, on_postcopy: fn(u32, Arc<Proxy>)) -> u64 {
    let mut case = common::Case::new("127.0.0.1:0", 1 << 20);
    case.opts.max_rounds = 0;
    case.opts.background = false;
    case.opts.timing = Timing {
        give_up_after: IDLE_BOUND,
        silence: Duration::from_secs(1),
        ..common::test_timing()
    };
    // The destination's bound as short: its pair was idle too, not stalled.
    case.dest_timing = case.opts.timing;
    // Idle past the cuts, then touches every page (demand-only: that ends postcopy).
    case.workload = |mem| {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(6));
            common::toucher(mem).join().unwrap()
        })
    };
    case.reconnects = Some(reconnects);
    let proxy: Arc<Mutex<Option<Arc<Proxy>>>> = Arc::default();
    let px = proxy.clone();
    case.proxy = Some(Box::new(move |p: &Arc<Proxy>| {
        *px.lock().unwrap() = Some(p.clone());
    }));
    case.src = Box::new(move |control| {
        let proxy = proxy.lock().unwrap().clone().expect("the proxy");
        let pairs = Mutex::new(0);
        control.observe(Arc::new(move |e| {
            if matches!(e, Event::Postcopy) {
                let mut n = pairs.lock().unwrap_or_else(|p| p.into_inner());
                *n += 1;
                on_postcopy(*n, proxy.clone());
            }
        }));
    });
    case.run().0.reconnects
}

/// A slow but live link: every connection carries at most `RATE` bytes a second each way,
/// less than the 4 MiB (SYNC_EVERY, once the SYNCs' only spacing) in `give_up_after`, and
/// less than what the kernel's buffers take at once ahead of a SYNC (here all of
/// precopy). Pages land all along, so the migration is making progress, and it must
/// complete, byte for byte, through a reset more than `give_up_after` into precopy's
/// pages (the source waiting for them to land before its stop) and another after some
/// of the rest landed in postcopy, never giving up.
const RATE: u64 = 256 << 10;

#[test]
fn a_precopy_over_a_slow_link_that_breaks_twice_completes() {
    let timing = Timing {
        heartbeat: Duration::from_millis(250),
        silence: Duration::from_secs(2),
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(300),
        give_up_after: Duration::from_secs(3),
    };
    let mut case = common::Case::new("127.0.0.1:0", 3 << 20);
    case.opts.max_rounds = 3;
    case.opts.timing = timing;
    case.dest_timing = timing;
    // A workload that keeps eight pages dirty: the later rounds and postcopy are short.
    case.pick = |i, _| (i % 8) as usize;
    case.workload = common::idle;
    case.reconnects = Some(2);
    case.proxy = Some(Box::new(|p: &Arc<Proxy>| {
        p.rate(RATE);
        // Counted bytes of main, source → destination, past each pair's greeting.
        let reset = |after| testkit::proxy::Cut {
            mode: CutMode::Reset,
            target: Target::All,
            after,
        };
        p.plan(vec![reset(1 << 20), reset(1536 << 10)]);
    }));
    let started = Instant::now();
    let o = case.run_all();
    assert_eq!(o.cuts, 2, "both cuts were made");
    eprintln!(
        "completed in {:.1?} at {RATE} B/s, {} reconnects",
        started.elapsed(),
        o.src.reconnects
    );
}

/// Postcopy over a slow link: the stream's pages are acknowledged by nothing but the next
/// pair's greeting (the destination holds more), and a frame lands whole or not at all,
/// behind whatever the kernel's buffers took at once. Each pair here breaks later than
/// `give_up_after` after the last progress, when what landed of its stream is all the
/// progress there is; it must be some, and the migration complete, byte for byte.
#[test]
fn a_postcopy_over_a_slow_link_that_breaks_twice_completes() {
    let timing = Timing {
        heartbeat: Duration::from_millis(250),
        silence: Duration::from_secs(2),
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(300),
        give_up_after: Duration::from_secs(3),
    };
    let mut case = common::Case::new("127.0.0.1:0", 1 << 20);
    case.opts.max_rounds = 0;
    case.opts.timing = timing;
    case.dest_timing = timing;
    // No faults at the destination: only the stream moves pages.
    case.workload = common::idle;
    case.reconnects = Some(2);
    case.proxy = Some(Box::new(|p: &Arc<Proxy>| {
        p.rate(RATE / 2);
        let reset = |after| testkit::proxy::Cut {
            mode: CutMode::Reset,
            target: Target::All,
            after,
        };
        p.plan(vec![reset(512 << 10), reset(384 << 10)]);
    }));
    let started = Instant::now();
    let o = case.run_all();
    assert_eq!(o.cuts, 2, "both cuts were made");
    eprintln!(
        "completed in {:.1?} at {} B/s, {} reconnects",
        started.elapsed(),
        RATE / 2,
        o.src.reconnects
    );
}

/// The destination's give-up bound runs from its last progress too, not from its last
/// break: a source that keeps reconnecting through a path that carries nothing after
/// the greeting (each pair frozen there) must not keep it waiting for as long as the
/// source keeps trying. The source's bound is far longer than the destination's; the
/// destination must give up within its own bound (and a few silence deadlines) of the
/// stall, while the source still reconnects.
#[test]
fn a_destination_whose_source_reconnects_but_carries_nothing_gives_up() {
    let t = timing();
    let dest_timing = t; // 3 s
    let src_timing = Timing {
        give_up_after: Duration::from_secs(20),
        ..t
    };
    let opts = DestOptions {
        mode: DeliveryMode::Thread,
        timing: dest_timing,
        ..DestOptions::default()
    };
    let dest = Destination::bind(&"127.0.0.1:0".parse().unwrap(), key(), opts).unwrap();
    let dest_control = dest.control();
    let proxy = proxy_to(&dest.local_addr().unwrap(), Direction::ToListener);
    let dest_t = std::thread::spawn(move || {
        let r = dest.run(|_| {});
        (r, Instant::now())
    });
    let memory = source_memory(8 << 20);
    let opts = SourceOptions {
        max_rounds: 50,
        switch_below_bytes: 0,
        timing: src_timing,
        ..SourceOptions::default()
    };
    let m = common::migration_through(&proxy, &memory, opts);
    let stalled = stall_from(
        proxy.clone(),
        CutMode::Freeze,
        |e| matches!(e, Event::Round(1)),
        &m,
    );
    let src_t = std::thread::spawn(move || m.run(|| {}));
    let (dst, ended) = dest_t.join().expect("destination thread");
    let first = stalled
        .lock()
        .unwrap()
        .first
        .expect("the path stalled a pair");
    let bound = dest_timing.give_up_after + t.silence * 4 + Duration::from_secs(2);
    assert!(
        matches!(dst, Err(Error::Transport(transport::Error::GaveUp { .. }))),
        "the destination gave up: {dst:?}"
    );
    let reconnects = dest_control.link.reconnects();
    assert!(reconnects >= 2, "it took new pairs meanwhile: {reconnects}");
    assert!(
        ended - first < bound,
        "the destination gave up within {bound:?} of the stall: {:?} ({reconnects} pairs taken)",
        ended - first
    );
    assert!(
        ended - first < src_timing.give_up_after,
        "before the source stopped trying"
    );
    let src = src_t.join().expect("source thread");
    assert!(src.is_err(), "the source did not complete: {src:?}");
}

/// The destination's side of an idle pair: greeted after RUN (the first pair is cut as
/// postcopy begins), its second pair is up and idle past both ends' bound — nothing
/// lands and no step is taken on it — and then breaks. It lived two silence deadlines, so
/// it was idle, not stalled: the destination must take the next pair, not give up.
#[test]
fn a_destination_resumes_after_an_idle_pair_that_outlived_its_bound() {
    let reconnects = idle_postcopy(2, |n, proxy| match n {
        1 => assert!(proxy.cut_now(CutMode::Reset, Target::All) > 0, "cut"),
        2 => {
            std::thread::spawn(move || {
                std::thread::sleep(IDLE_BOUND + Duration::from_secs(1));
                assert!(proxy.cut_now(CutMode::Reset, Target::All) > 0, "cut");
            });
        }
        _ => {}
    });
    assert_eq!(reconnects, 2);
}
