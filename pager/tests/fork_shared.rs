//! A forked child's fault on shared memory (a MINOR region: one page cache for parent and
//! child) whose page the parent's engine has in flight — asked of a remote source, or
//! claimed by someone placing it. The child's engine waits for the parent's placement
//! without spinning, then maps the page; a child serving from its parent's source (which
//! must answer at once) is failed when that source turns out remote. Each test forks, so
//! each runs in a process of its own (`testkit::isolated`).

use crate::common;

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use page_state::PageState;
use pager::{
    ChildSource, DeliveryMode, Features, Fetched, Mapping, MemoryKind, Pager, Placer, Source,
    SourceError, StatsSnapshot, Uffd,
};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

const PS: usize = 4096;
const PAGES: usize = 8;
/// The page the child reads, which the parent never touches.
const PAGE: usize = 5;
const WATCHDOG: Duration = Duration::from_secs(120);
/// How long the page stays in flight while the child waits on it.
const HOLD: Duration = Duration::from_millis(600);

/// Exit codes of the forked child.
const CHILD_SERVED: i32 = 0;
const CHILD_WRONG: i32 = 1;
const CHILD_SIGBUS: i32 = 128 + libc::SIGBUS;

/// A remote source whose pages arrive only once the test lets them: `fetch` answers
/// `Pending`; a thread of its own places every Requested page when `go` is sent.
struct Held {
    image: Arc<Vec<u8>>,
    /// How a forked child is served: from this source (`Shared`, the trait's default —
    /// wrong for a remote source), or a source of its own that is never asked (a MINOR
    /// region's pages are the parent's engine's to place).
    own_child: bool,
    go: Mutex<Option<mpsc::Receiver<()>>>,
}

impl Source for Held {
    fn len(&self) -> u64 {
        self.image.len() as u64
    }
    fn fetch<'a>(&'a self, _: u64, _: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        Ok(Fetched::Pending)
    }
    fn attach(&self, placer: Placer) {
        let Some(go) = self.go.lock().expect("go").take() else {
            return; // a child's own source: never asked
        };
        let image = self.image.clone();
        std::thread::spawn(move || {
            // Blocks (no CPU) until the test lets the pages arrive.
            if go.recv().is_err() {
                return;
            }
            while placer.state(0).is_some() {
                for page in 0..PAGES {
                    if placer.state(page) == Some(PageState::Requested) {
                        let _ = placer.place((page * PS) as u64, Some(&image[page * PS..][..PS]));
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    }
    fn child(&self) -> ChildSource {
        match self.own_child {
            true => ChildSource::Own(Arc::new(Held {
                image: self.image.clone(),
                own_child: true,
                go: Mutex::new(None),
            })),
            false => ChildSource::Shared,
        }
    }
}

/// CPU time this process has used (every thread: the child's engine runs here).
fn cpu_time() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
    };
    t(usage.user_time()) + t(usage.system_time())
}

/// Waiting is no work: a spinning engine retried the child's fault tens of thousands of
/// times while the page was held (each a duplicate fault of the parent's engine, and a
/// `prioritize`), and burnt a CPU.
fn assert_waited_idle(duplicates: u64, cpu: Duration) {
    assert!(
        duplicates <= 2 && cpu < HOLD / 5,
        "while the page was in flight for {HOLD:?} the child's fault was retried {duplicates} \
         times, and the process burnt {cpu:?} of CPU"
    );
}

/// What [`child_waits_on_parents_page`] saw.
struct Seen {
    /// How the child ended (`CHILD_*`; -1: it hung).
    outcome: i32,
    /// The parent engine's duplicate faults (each a fault on a page already in flight)
    /// while the page was held.
    duplicates: u64,
    /// CPU time this process burnt while the page was held.
    cpu: Duration,
    stats: StatsSnapshot,
}

/// Serves a MINOR shared region from a [`Held`] source with fork events on, forks a child
/// that reads page [`PAGE`] (which only its fault brings in), holds that page in flight for
/// [`HOLD`] once the parent's engine asked for it, then lets it arrive.
fn child_waits_on_parents_page(own_child: bool) -> Seen {
    let image = Arc::new(common::image(PAGES, PS, 0));
    let memory = Arc::new(Mapping::new(MemoryKind::Shmem, PAGES * PS).expect("map"));
    let (go, go_rx) = mpsc::channel();
    let source = Arc::new(Held {
        image: image.clone(),
        own_child,
        go: Mutex::new(Some(go_rx)),
    });
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_FORK | Features::EVENT_REMOVE | Features::MINOR_SHMEM)
        .open()
        .expect("uffd");
    let pager = Pager::builder(uffd, source)
        .mapping_minor(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    let (addr, expect) = (memory.addr() + PAGE * PS, image[PAGE * PS..][..PS].to_vec());
    // SAFETY: the child only reads memory and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: the child's view of the shared region.
        let got = unsafe { common::bytes(addr, PS) };
        let code = if got == expect.as_slice() {
            CHILD_SERVED
        } else {
            CHILD_WRONG
        };
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    // The child's fault made the parent's engine ask for the page (or failed the child).
    let deadline = Instant::now() + Duration::from_secs(20);
    while pager.states().get(PAGE) != Some(PageState::Requested) {
        assert!(
            Instant::now() < deadline,
            "the child's fault asks for the page"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (dup0, cpu0) = (pager.stats().faults_duplicate, cpu_time());
    std::thread::sleep(HOLD);
    let (duplicates, cpu) = (
        pager.stats().faults_duplicate - dup0,
        cpu_time().saturating_sub(cpu0),
    );
    go.send(()).expect("the source's thread waits");
    let outcome = common::wait_bounded(pid);
    let stats = pager.stop().expect("the parent's pager is fine");
    Seen {
        outcome,
        duplicates,
        cpu,
        stats,
    }
}

#[test]
fn a_child_faulting_on_a_shared_page_in_flight_waits_for_it_without_spinning() {
    let name =
        "fork_shared::a_child_faulting_on_a_shared_page_in_flight_waits_for_it_without_spinning";
    if !testkit::isolated(name, WATCHDOG) {
        return;
    }
    let seen = child_waits_on_parents_page(true);
    assert_eq!(
        seen.outcome, CHILD_SERVED,
        "the child reads the page once it lands (1: other bytes, 135: SIGBUS, -1: hung)"
    );
    assert_waited_idle(seen.duplicates, seen.cpu);
    assert_eq!(seen.stats.forks_served, 1);
    assert_eq!(seen.stats.forks_failed, 0, "{:?}", seen.stats);
}

#[test]
fn a_child_sharing_a_source_that_turns_out_remote_is_failed_not_left_waiting() {
    let name =
        "fork_shared::a_child_sharing_a_source_that_turns_out_remote_is_failed_not_left_waiting";
    if !testkit::isolated(name, WATCHDOG) {
        return;
    }
    let seen = child_waits_on_parents_page(false);
    // Serving from its parent's source, the child's engine is promised answers at once
    // (`Source::child`): a page that source left pending fails it, as on private memory.
    assert_eq!(
        seen.outcome, CHILD_SIGBUS,
        "the child dies of SIGBUS (0: it waited on the remote source, -1: hung)"
    );
    assert_eq!(
        (seen.stats.forks_served, seen.stats.forks_failed),
        (1, 1),
        "{:?}",
        seen.stats
    );
}

/// Set when [`Slow`] may answer.
static GO: AtomicBool = AtomicBool::new(false);

/// A local source whose page [`PAGE`] answers only once [`GO`] is set (sleeping until
/// then: no allocation, no lock, as a source used with fork events must be).
struct Slow(Vec<u8>);

impl Source for Slow {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn fetch<'a>(&'a self, offset: u64, _: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        while offset == (PAGE * PS) as u64 && !GO.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let at = offset as usize;
        Ok(Fetched::Data(&self.0[at..at + PS]))
    }
}

/// A child serving from its parent's local source (`ChildSource::Shared`) whose page a
/// parent's handler is slowly fetching waits for it — without spinning — and is served:
/// only a remote source's `Pending` fails such a child.
#[test]
fn a_child_faulting_on_a_shared_page_a_parents_handler_fetches_waits_and_is_served() {
    let name = "fork_shared::a_child_faulting_on_a_shared_page_a_parents_handler_fetches_waits_and_is_served";
    if !testkit::isolated(name, WATCHDOG) {
        return;
    }
    let image = common::image(PAGES, PS, 0);
    let memory = Arc::new(Mapping::new(MemoryKind::Shmem, PAGES * PS).expect("map"));
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_FORK | Features::EVENT_REMOVE | Features::MINOR_SHMEM)
        .open()
        .expect("uffd");
    let pager = Pager::builder(uffd, Arc::new(Slow(image.clone())))
        .mapping_minor(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    let (addr, expect) = (memory.addr() + PAGE * PS, image[PAGE * PS..][..PS].to_vec());
    let (word_in, word_out) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the child only reads a pipe and memory, and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut word = [0u8; 1];
        let code = match nix::unistd::read(&word_in, &mut word) {
            // SAFETY: the child's view of the shared region.
            Ok(1) if unsafe { common::bytes(addr, PS) } == expect.as_slice() => CHILD_SERVED,
            _ => CHILD_WRONG,
        };
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    until("the child is served", &|| pager.stats().forks_served == 1);
    // The parent touches the page: its only handler claims it and waits in the fetch.
    let toucher = std::thread::spawn(move || {
        // SAFETY: the served region.
        unsafe { common::bytes(addr, PS) == expect.as_slice() }
    });
    until("the parent's fault claims the page", &|| {
        pager.states().get(PAGE) == Some(PageState::Requested)
    });
    nix::unistd::write(&word_out, b"x").expect("the word");
    // The child's fault reaches the parent's engine: a duplicate of the claimed page.
    until("the child's fault reaches the parent's engine", &|| {
        pager.stats().faults_duplicate >= 1
    });
    let (dup0, cpu0) = (pager.stats().faults_duplicate, cpu_time());
    std::thread::sleep(HOLD);
    let (duplicates, cpu) = (
        pager.stats().faults_duplicate - dup0,
        cpu_time().saturating_sub(cpu0),
    );
    GO.store(true, SeqCst);
    assert!(
        toucher.join().expect("toucher"),
        "the parent reads the image"
    );
    assert_eq!(
        common::wait_bounded(pid),
        CHILD_SERVED,
        "the child reads the page once it lands (1: other bytes, 135: SIGBUS, -1: hung)"
    );
    assert_waited_idle(duplicates, cpu);
    let stats = pager.stop().expect("the parent's pager is fine");
    assert_eq!(
        (stats.forks_served, stats.forks_failed),
        (1, 0),
        "{stats:?}"
    );
}
