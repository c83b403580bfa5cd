//! The destination's acknowledgements lost with a broken pair (dest → source blocked just
//! before the source sends the step, a half-open link the source notices by silence): the
//! source hears the step in the next pair's greeting, and its report still says what
//! happened — the downtime, what the verdict checked — not what it would have guessed.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{key, proxy_to, source_memory, test_timing};
use pager::DeliveryMode;
use postcopy::fault::Event;
use postcopy::migrate::{DestOptions, Destination, Migration, RunningMemory, SourceOptions};
use testkit::proxy::{CutMode, Direction, Proxy, Target};
use transport::Addr;

const PS: usize = 4096;

/// A destination behind a proxy; its run in a thread calling `on_run` at RUN.
fn destination_behind_proxy(
    on_run: impl FnOnce(RunningMemory) + Send + 'static,
) -> (
    Arc<Proxy>,
    std::thread::JoinHandle<Result<postcopy::migrate::DestReport, postcopy::Error>>,
) {
    let opts = DestOptions {
        mode: DeliveryMode::Thread,
        timing: test_timing(),
        ..DestOptions::default()
    };
    let dest = Destination::bind(&"127.0.0.1:0".parse().unwrap(), key(), opts).expect("bind");
    let proxy = proxy_to(&dest.local_addr().unwrap(), Direction::ToListener);
    (proxy, std::thread::spawn(move || dest.run(on_run)))
}

/// Blocks everything the destination sends from now on, on every connection there is:
/// the source notices by silence and reconnects (new connections flow).
fn lose_what_the_destination_says(proxy: &Proxy) {
    proxy.cut_now(CutMode::HalfOpen(Direction::ToOpener), Target::All);
}

/// The destination handled LISTEN and RUN, but their ACKs never reached the source: the source hears step 2 only in the next pair's greeting.
/// The downtime is still recorded (the reconnection in it), not left at zero.
#[test]
fn run_acknowledged_only_in_the_next_greeting_still_records_the_downtime() {
    let bytes = 4 << 20;
    let (proxy, receiving) = destination_behind_proxy(|_| {});
    let memory = source_memory(bytes);
    let opts = SourceOptions {
        max_rounds: 2,
        timing: test_timing(),
        ..SourceOptions::default()
    };
    // SAFETY: our mapping, alive until `run` returns; nothing writes it.
    let m = unsafe { Migration::new(Addr::Tcp(proxy.addr()), key(), memory.addr(), bytes, opts) }
        .unwrap();
    let (cut, p) = (Arc::new(AtomicBool::new(false)), proxy.clone());
    let c = cut.clone();
    m.control().observe(Arc::new(move |event| {
        // Before RUN goes (behind LISTEN): its ACK cannot slip through ahead of the cut.
        if event == Event::Sent("LISTEN") && !c.swap(true, Ordering::SeqCst) {
            lose_what_the_destination_says(&p);
        }
    }));
    let src = m.run(|| {}).expect("verified");
    let dst = receiving.join().unwrap().expect("verified");
    assert!(cut.load(Ordering::SeqCst), "RUN was sent");
    assert!(src.reconnects >= 1 && dst.reconnects >= 1, "{src:?}");
    // The ACK could come back only after the source noticed the silence and reconnected.
    let silence = test_timing().silence;
    assert!(src.downtime >= silence / 2, "{src:?}");
    assert_eq!(
        src.switch.run,
        Duration::ZERO,
        "acknowledged only in a greeting"
    );
    assert!(src.postcopy < src.total - src.downtime, "{src:?}");
    common::same_bytes(&memory, &dst.memory);
}

/// The destination's workload drops half its memory before those pages land, so the
/// verdict checks half and counts the rest dropped; then the destination's ACK of the
/// verdict is lost. The source hears step 3 in the next pair's greeting and reports what
/// its verdict checked — never every page as verified.
#[test]
fn a_verdict_acknowledged_only_in_the_next_greeting_reports_what_it_checked() {
    let bytes = 4 << 20;
    let pages = (bytes / PS) as u64;
    let (on_run, hold) = common::drop_second_half_at_run();
    let (proxy, receiving) = destination_behind_proxy(on_run);
    let memory = source_memory(bytes);
    let opts = SourceOptions {
        max_rounds: 0,
        timing: test_timing(),
        ..SourceOptions::default()
    };
    // SAFETY: our mapping, alive until `run` returns; nothing writes it.
    let m = unsafe { Migration::new(Addr::Tcp(proxy.addr()), key(), memory.addr(), bytes, opts) }
        .unwrap();
    let (cut, h, p) = (
        Arc::new(AtomicBool::new(false)),
        hold.clone(),
        proxy.clone(),
    );
    let c = cut.clone();
    m.control().observe(Arc::new(move |event| {
        h.hear(event);
        // Its only DIGESTS frame (1 024 pages: one frame holds 8 192) is in, SHUT not yet
        // sent: the ACK of the verdict cannot slip through ahead of the cut.
        if event == Event::Digests && !c.swap(true, Ordering::SeqCst) {
            lose_what_the_destination_says(&p);
        }
    }));
    let src = m.run(|| {}).expect("verified, the dropped pages left out");
    let dst = receiving
        .join()
        .unwrap()
        .expect("the destination heard the verdict");
    assert!(hold.held() && cut.load(Ordering::SeqCst));
    assert!(src.reconnects >= 1, "the ACK was lost: {src:?}");
    assert_eq!(
        (src.verified, src.dropped_at_destination),
        (pages / 2, pages / 2),
        "{src:?}"
    );
    assert_eq!(
        dst.verdict,
        format!(
            "verified {} pages; {} dropped by the destination's workload before they landed, \
             not checked",
            pages / 2,
            pages / 2
        )
    );
}
