//! The pager as an unprivileged VMM runs it (Firecracker's jailer drops root): a process
//! that dropped to `nobody` before opening its userfaultfd (user-mode-only, through the
//! syscall) and starting the pager.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::{DeliveryMode, Features, Fetched, Mapping, MemoryKind, MemorySource, Pager, Prefetch};
use pager::{Source, SourceError, Uffd};

const PS: usize = 4096;
const NOBODY: u32 = 65534;

/// Drops this (isolated) test process to `nobody`, keeping it dumpable so that its own
/// `/proc/self/task` stays readable.
fn drop_to_nobody() {
    nix::unistd::setgroups(&[]).expect("setgroups");
    nix::unistd::setgid(nix::unistd::Gid::from_raw(NOBODY)).expect("setgid");
    nix::unistd::setuid(nix::unistd::Uid::from_raw(NOBODY)).expect("setuid");
    nix::sys::prctl::set_dumpable(true).expect("dumpable");
    assert!(!nix::unistd::geteuid().is_root());
}

/// The scheduling policy of each of this process's threads, by name.
fn policies() -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
    {
        let Ok(tid) = task.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        // SAFETY: sched_getscheduler(2) on a thread of ours; reads nothing of our memory.
        let policy = unsafe { libc::sched_getscheduler(tid) };
        if policy >= 0 {
            out.push((name.trim().to_string(), policy));
        }
    }
    out
}

/// A memory source that takes a little time per fetch, so the prefetch lasts long enough
/// to be watched.
struct Slow(MemorySource);

impl Source for Slow {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        std::thread::sleep(Duration::from_micros(300));
        self.0.fetch(offset, scratch)
    }
}

/// Without CAP_SYS_NICE a thread that went to SCHED_IDLE can never come back, so a
/// prefetcher that placed pages at idle priority would hold the placement gate at idle
/// priority: every handler waits behind it while a busy workload starves it. The thread
/// that places never runs at SCHED_IDLE; only its pacer does, and the prefetch completes.
#[test]
fn an_unprivileged_prefetcher_never_places_at_idle_priority_and_completes() {
    const NAME: &str = "an_unprivileged_prefetcher_never_places_at_idle_priority_and_completes";
    if !testkit::isolated(NAME, Duration::from_secs(120)) {
        return;
    }
    drop_to_nobody();
    let uffd = match Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_REMOVE)
        .open()
    {
        Ok(uffd) => uffd,
        Err(e) => return common::skip(NAME, &format!("no userfaultfd as nobody: {e}")),
    };
    assert!(
        uffd.user_mode_only(),
        "an unprivileged uffd is user-mode-only"
    );
    let pages = 4096;
    let image = common::image(pages, PS, 0);
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
    let pager = Pager::builder(uffd, Arc::new(Slow(MemorySource::new(image.clone()))))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .prefetch(Prefetch::Sequential)
        .start()
        .expect("start");
    const IDLE: i32 = libc::SCHED_IDLE;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut samples = 0;
    let mut pacer_idle = false;
    while !pager.is_complete() {
        assert!(Instant::now() < deadline, "the prefetch did not complete");
        for (name, policy) in policies() {
            if name == "uffd-prefetch" {
                assert_ne!(policy, IDLE, "the placing thread runs at SCHED_IDLE");
                samples += 1;
            }
            pacer_idle |= name == "uffd-pacer" && policy == IDLE;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(samples > 0, "the prefetcher was watched while it ran");
    assert!(pacer_idle, "the pacer runs at SCHED_IDLE");
    // SAFETY: served region, complete.
    let got = unsafe { common::bytes(memory.addr(), memory.len()) };
    assert_eq!(got, image.as_slice());
    let stats = pager.stop().expect("stop");
    assert!(stats.placed_prefetch > 0, "{stats:?}");
}
