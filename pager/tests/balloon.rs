//! The balloon stress (see `common/balloon.rs`) in the handler-thread delivery modes, on
//! 4 KiB anonymous and 2 MiB private hugetlb memory. The SIGBUS mode runs it in
//! `tests/sigbus.rs`, under an allocator that aborts if the signal path allocates.
//!
//! Each case runs in a process of its own with a watchdog, so a hung thread fails the
//! case instead of stalling the suite.

use crate::common;

use std::time::Duration;

use pager::{DeliveryMode, Features, MemoryKind};

const EACH: Duration = Duration::from_millis(2500);
const WATCHDOG: Duration = Duration::from_secs(120);

fn stress(test: &str, mode: DeliveryMode, kind: MemoryKind) {
    if !testkit::isolated(test, WATCHDOG) {
        return;
    }
    if kind.is_hugetlb() && !common::hugetlb_available(test) {
        return;
    }
    let outcome = common::balloon::run(mode, kind, Features::empty(), EACH);
    eprintln!("{test}: {outcome:?}");
    assert!(outcome.removes > 0 && outcome.reads > 0, "{outcome:?}");
    assert!(
        outcome.again + outcome.removed_in_flight > 0,
        "drops raced placements at least once: {outcome:?}"
    );
}

#[test]
fn balloon_thread_mode_anon_reads_no_wrong_page() {
    stress(
        "balloon_thread_mode_anon_reads_no_wrong_page",
        DeliveryMode::Thread,
        MemoryKind::Anon,
    );
}

#[test]
fn balloon_percpu_mode_anon_reads_no_wrong_page() {
    stress(
        "balloon_percpu_mode_anon_reads_no_wrong_page",
        DeliveryMode::PerCpu,
        MemoryKind::Anon,
    );
}

#[test]
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn balloon_thread_mode_hugetlb_reads_no_wrong_page() {
    stress(
        "balloon_thread_mode_hugetlb_reads_no_wrong_page",
        DeliveryMode::Thread,
        MemoryKind::HugetlbPrivate,
    );
}

#[test]
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn balloon_percpu_mode_hugetlb_reads_no_wrong_page() {
    stress(
        "balloon_percpu_mode_hugetlb_reads_no_wrong_page",
        DeliveryMode::PerCpu,
        MemoryKind::HugetlbPrivate,
    );
}
