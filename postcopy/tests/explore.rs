//! The fault-schedule explorer: seeded schedules of network faults against real
//! migrations and real page-server restores, each checked byte for byte.
//!
//! A seed draws a whole run: page size (4 KiB, or 2 MiB where huge pages can be had),
//! memory size (8–32 MiB), security (a pre-shared key, or TLS 1.3 with certificates),
//! the source's workload (random writes, a hot set rewritten all the time, a sequential
//! sweep), precopy rounds (0–3), whether the destination's workload touches every page,
//! the size of the device state RUN carries (none, small, or megabytes, so that a fault at
//! RUN can catch it in flight), whether the destination moves whole blocks in as huge
//! pages (`DestOptions::huge_pages`), and one to four faults — resets, silent freezes, half-open links (one direction
//! frozen), delay spikes and slow drips, on main, urgent or both — each triggered by a
//! protocol event the source reports (precopy round *r* after *k* page frames, the
//! DISCARD before the stop, the stop, DISCARD, LISTEN, RUN, postcopy after *k* frames, the digests, SHUT) or by a
//! byte offset of the stream, so that every planned fault lands. Then it runs the real
//! source and destination (or a page server and its restore client) through testkit's
//! proxy and checks that the run ended verified, every page equal to the source's final
//! content, the device state handed to the destination exactly once and byte for byte,
//! within its bound.
//!
//! ```text
//! cargo test -p postcopy --release --test explore                     # the CI set: 100 seeds
//! cargo test -p postcopy --release --test explore -- --seeds 2000     # a soak
//! cargo test -p postcopy --release --test explore -- --seed 0x2a      # one seed, logged
//! ```
//!
//! A failing seed prints the one line that runs it again. `--first N` starts elsewhere,
//! `--jobs N` runs N seeds at once (default 4).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::inject::{mode_name, Fault, Injector, Trigger};
use common::{hot_pick, random_pick, source_memory, tls_ends, Writer};
use pager::DeliveryMode;
use postcopy::client::RemoteSource;
use postcopy::migrate::{DestOptions, Destination, Migration, SourceOptions, Timing};
use postcopy::server::PageServer;
use postcopy::Security;
use testkit::proxy::{Cut, CutMode, Direction, Target};
use transport::Addr;
use uffd_core::{Mapping, HUGE_PAGE_SIZE};

/// What the harness answers to `--list` and matches filters against.
const NAME: &str = "explore_fault_schedules";
/// A run still going after this is reported as hung.
const HANG: Duration = Duration::from_secs(150);

/// splitmix64: a seed's whole schedule comes from it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, in_n: u64) -> bool {
        self.below(in_n) == 0
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Random,
    Hot,
    Sequential,
}

/// A page server's client restoring through the proxy, or a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Migration,
    PageServer,
}

/// Everything a seed decides.
#[derive(Debug, Clone)]
struct Schedule {
    seed: u64,
    kind: Kind,
    page_size: usize,
    bytes: usize,
    tls: bool,
    workload: Workload,
    rounds: u32,
    dest_touches: bool,
    /// Event-triggered faults, in rank order.
    faults: Vec<Fault>,
    /// Byte-triggered cuts: counted bytes of pages on main, from the start.
    byte_cuts: Vec<Cut>,
    /// Bytes of device state the source gives at the stop.
    device_state: usize,
    /// The destination moves whole blocks in as huge pages (`DestOptions::huge_pages`).
    huge_pages: bool,
}

const MAIN: Target = Target::Tag("main");
const URGENT: Target = Target::Tag("urgent");

fn draw_mode(rng: &mut Rng) -> CutMode {
    match rng.below(10) {
        0..=2 => CutMode::Reset,
        3..=5 => CutMode::Freeze,
        6 => CutMode::HalfOpen(Direction::ToListener),
        7 => CutMode::HalfOpen(Direction::ToOpener),
        8 => CutMode::Delay(Duration::from_millis(rng.pick(&[50, 300, 900, 1600]))),
        _ => CutMode::Drip {
            bytes_per_sec: rng.pick(&[2 << 10, 16 << 10, 256 << 10]),
            lasting: Duration::from_millis(rng.pick(&[200, 700, 1500])),
        },
    }
}

impl Schedule {
    fn draw(seed: u64, huge: bool) -> Schedule {
        let mut rng = Rng(seed);
        let kind = if rng.chance(6) {
            Kind::PageServer
        } else {
            Kind::Migration
        };
        let page_size = if kind == Kind::Migration && huge && rng.chance(6) {
            HUGE_PAGE_SIZE
        } else {
            4096
        };
        let bytes = rng.pick(&[8usize, 16, 32]) << 20;
        let tls = rng.chance(4);
        let workload = rng.pick(&[Workload::Random, Workload::Hot, Workload::Sequential]);
        let rounds = rng.below(4) as u32;
        let dest_touches = !rng.chance(3);
        let frames_per_round = (bytes / (2 << 20)) as u64; // PAGES frames carry 2 MiB
        let mut faults = Vec::new();
        let mut byte_cuts = Vec::new();
        match kind {
            Kind::Migration => {
                let mut triggers = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    let t = match rng.below(9) {
                        0..=2 if rounds > 0 => Trigger::Round {
                            round: 1 + rng.below(u64::from(rounds)) as u32,
                            frames: rng.below(frames_per_round) as u32,
                        },
                        3 => Trigger::Stopped,
                        4 => {
                            Trigger::Sent(rng.pick(&["EARLY DISCARD", "DISCARD", "LISTEN", "RUN"]))
                        }
                        5 | 6 => Trigger::Postcopy {
                            frames: rng.below(4) as u32,
                        },
                        7 => Trigger::Digests,
                        8 => Trigger::Sent("SHUT"),
                        _ => Trigger::Postcopy { frames: 0 },
                    };
                    triggers.push(t);
                }
                triggers.sort_by_key(|t| (t.rank(), t.frames()));
                for trigger in triggers {
                    let mode = draw_mode(&mut rng);
                    let target = rng.pick(&[MAIN, URGENT, Target::All]);
                    faults.push(Fault {
                        trigger,
                        mode,
                        target,
                    });
                }
                // A cut anywhere in the middle of a frame, within round 1 (which sends
                // every page, four in five of them as data).
                if rounds > 0 && rng.chance(3) {
                    byte_cuts.push(Cut {
                        mode: rng.pick(&[CutMode::Reset, CutMode::Freeze]),
                        target: rng.pick(&[MAIN, Target::All]),
                        after: 1 + rng.below(bytes as u64 / 2),
                    });
                }
            }
            Kind::PageServer => {
                // The stream carries every page not asked for: cuts within its first third.
                let n = 1 + rng.below(3);
                let mut at: Vec<u64> = (0..n).map(|_| 1 + rng.below(bytes as u64 / 3)).collect();
                at.sort_unstable();
                let mut prev = 0;
                for a in at {
                    let mode = draw_mode(&mut rng);
                    let mode = if mode.breaks() { mode } else { CutMode::Freeze };
                    byte_cuts.push(Cut {
                        mode,
                        target: rng.pick(&[MAIN, URGENT, Target::All]),
                        after: (a - prev).max(1),
                    });
                    prev = a;
                }
            }
        }
        // Drawn last: the draws above are what they were before RUN carried a state.
        let device_state = rng.pick(&[0, 300, 70_000, 3 << 20]);
        let huge_pages = rng.chance(2);
        Schedule {
            seed,
            kind,
            device_state,
            page_size,
            bytes,
            tls,
            workload,
            rounds,
            dest_touches,
            faults,
            byte_cuts,
            huge_pages,
        }
    }

    fn security(&self) -> (Security, Security) {
        if self.tls {
            tls_ends()
        } else {
            common::psk_ends()
        }
    }
}

/// Short deadlines, so that a freeze costs about a second; a loaded machine may break
/// links on its own too, which a correct protocol survives as well.
fn timing() -> Timing {
    Timing {
        heartbeat: Duration::from_millis(100),
        silence: Duration::from_millis(1000),
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        give_up_after: Duration::from_secs(30),
    }
}

/// What one run did.
#[derive(Debug, Default)]
struct Outcome {
    /// Phases in which a fault landed.
    landed: Vec<&'static str>,
    /// Faults by mode.
    modes: Vec<&'static str>,
    /// Planned faults that never landed (the run ended before their event).
    missed: usize,
    reconnects: u64,
    took: Duration,
    /// Pages the destination moved in as whole blocks (`huge_pages` seeds).
    moved: u64,
}

fn pick_of(w: Workload) -> fn(u64, usize) -> usize {
    match w {
        Workload::Random => random_pick,
        Workload::Hot => hot_pick,
        Workload::Sequential => |i, pages| (i / 64) as usize % pages,
    }
}

/// Pages of `a` and `b` that differ, and the first of them.
fn differing(a: &Mapping, b: &Mapping) -> (usize, Option<usize>) {
    let (mut n, mut first) = (0, None);
    for p in 0..a.len() / 4096 {
        // SAFETY: both mappings are alive and nothing writes them any more.
        let (x, y) = unsafe {
            (
                std::slice::from_raw_parts((a.addr() + p * 4096) as *const u8, 4096),
                std::slice::from_raw_parts((b.addr() + p * 4096) as *const u8, 4096),
            )
        };
        if x != y {
            n += 1;
            first.get_or_insert(p);
        }
    }
    (n, first)
}

/// The device state of a seed's source: `len` bytes of its own.
fn device_state(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng(seed ^ 0xde71_ce00);
    (0..len).map(|_| rng.next() as u8).collect()
}

fn run_migration(s: &Schedule) -> Result<Outcome, String> {
    let t0 = Instant::now();
    let (listener, opener) = s.security();
    let opts = DestOptions {
        mode: DeliveryMode::Thread,
        timing: timing(),
        huge_pages: s.huge_pages,
        ..DestOptions::default()
    };
    let dest = Destination::bind(&"127.0.0.1:0".parse().unwrap(), listener, opts)
        .map_err(|e| format!("bind: {e}"))?;
    let proxy = common::proxy_to(&dest.local_addr().unwrap(), Direction::ToListener);
    if !s.byte_cuts.is_empty() {
        proxy.plan(s.byte_cuts.clone());
    }
    let touches = s.dest_touches;
    let workload: Arc<Mutex<Option<std::thread::JoinHandle<Vec<Duration>>>>> = Arc::default();
    let w = workload.clone();
    let (state_tx, state_rx) = mpsc::channel();
    let dest_t = std::thread::spawn(move || {
        dest.run_with_state(move |mem, state| {
            state_tx
                .send(state)
                .expect("the harness waits for the state");
            let t = if touches {
                common::toucher(mem)
            } else {
                common::idle(mem)
            };
            *w.lock().unwrap() = Some(t);
            Ok::<(), std::convert::Infallible>(())
        })
    });
    let memory = source_memory(s.bytes);
    let writer = Arc::new(Mutex::new(Some(Writer::start(
        memory.addr(),
        memory.len(),
        pick_of(s.workload),
    ))));
    let sopts = SourceOptions {
        page_size: s.page_size,
        max_rounds: s.rounds,
        switch_below_bytes: 0,
        converge_ratio: 10.0,
        timing: timing(),
        ..SourceOptions::default()
    };
    // SAFETY: our mapping, mapped until this function returns; only `writer` writes it,
    // and the callback stops it.
    let migration = unsafe {
        Migration::new(
            Addr::Tcp(proxy.addr()),
            opener,
            memory.addr(),
            memory.len(),
            sopts,
        )
    }
    .map_err(|e| format!("new: {e}"))?;
    let injector = Injector::start(proxy.clone(), s.faults.clone(), false, &migration.control());
    let stopper = writer.clone();
    let state = device_state(s.seed, s.device_state);
    let given = state.clone();
    let src = migration.run_with_state(move || {
        stopper.lock().unwrap().take().map(Writer::stop);
        Ok::<_, std::convert::Infallible>(given)
    });
    writer.lock().unwrap().take().map(Writer::stop);
    let dst = dest_t.join().map_err(|_| "the destination panicked")?;
    if let Some(t) = workload.lock().unwrap().take() {
        t.join()
            .map_err(|_| "the destination's workload panicked")?;
    }
    let (src, dst) = match (src, dst) {
        (Ok(s), Ok(d)) => (s, d),
        (s, d) => {
            return Err(format!(
                "did not end verified: source {:?}, destination {:?}",
                s.err().map(|e| e.to_string()),
                d.err().map(|e| e.to_string())
            ))
        }
    };
    let (n, first) = differing(&memory, &dst.memory);
    if n > 0 {
        return Err(format!(
            "{n} pages differ from the source's final content (first: page {})",
            first.unwrap_or(0)
        ));
    }
    if src.verified != src.pages {
        return Err(format!("{} of {} pages verified", src.verified, src.pages));
    }
    let handed: Vec<Vec<u8>> = state_rx.try_iter().collect();
    if handed.len() != 1 || handed[0] != state {
        return Err(format!(
            "the device state ({} bytes) was handed over {} times, {:?} bytes",
            state.len(),
            handed.len(),
            handed
                .iter()
                .map(|h| (h.len(), *h == state))
                .collect::<Vec<_>>()
        ));
    }
    let inj = injector.lock().unwrap();
    let (mut landed, mut modes): (Vec<_>, Vec<_>) = inj.landed.iter().copied().unzip();
    let byte_landed = s.byte_cuts.len() - proxy.pending();
    for c in &s.byte_cuts[..byte_landed] {
        landed.push("at a byte offset of main");
        modes.push(mode_name(c.mode));
    }
    Ok(Outcome {
        landed,
        modes,
        missed: inj.pending() + proxy.pending(),
        reconnects: src.reconnects,
        took: t0.elapsed(),
        moved: dst.pager.placed_moved,
    })
}

fn run_page_server(s: &Schedule) -> Result<Outcome, String> {
    let t0 = Instant::now();
    let (listener, opener) = s.security();
    let pages = s.bytes / common::PS;
    let image = Arc::new(common::image(pages));
    let source = Arc::new(pager::MemorySource::new(image.to_vec()));
    let srv = PageServer::bind(&"127.0.0.1:0".parse().unwrap(), source, listener, timing())
        .map_err(|e| format!("bind: {e}"))?;
    let proxy = common::proxy_to(&srv.local_addr().unwrap(), Direction::ToOpener);
    proxy.plan(s.byte_cuts.clone());
    let client = RemoteSource::connect_with(&Addr::Tcp(proxy.addr()), opener, timing())
        .map_err(|e| format!("connect: {e}"))?;
    let client = Arc::new(client);
    let touch_every = if s.dest_touches { 61 } else { pages };
    common::restore_from(client.clone(), &image, touch_every);
    let landed = s.byte_cuts.len() - proxy.pending();
    Ok(Outcome {
        landed: vec!["page-server stream"; landed],
        modes: s.byte_cuts[..landed]
            .iter()
            .map(|c| mode_name(c.mode))
            .collect(),
        missed: proxy.pending(),
        reconnects: client.reconnects(),
        took: t0.elapsed(),
        moved: 0,
    })
}

fn run(s: &Schedule) -> Result<Outcome, String> {
    match s.kind {
        Kind::Migration => run_migration(s),
        Kind::PageServer => run_page_server(s),
    }
}

/// Runs one seed on its own thread; a panic is a failure, and so is a run that is still
/// going after [`HANG`].
fn run_bounded(s: Schedule) -> Result<Outcome, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&s)));
        let _ = tx.send(r.unwrap_or_else(|p| {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panicked: {what}"))
        }));
    });
    rx.recv_timeout(HANG)
        .unwrap_or_else(|_| Err(format!("still running after {HANG:?}: hung")))
}

struct Args {
    seeds: Vec<u64>,
    jobs: usize,
    one: bool,
}

/// Parses our flags; libtest's own (`--nocapture`, `--test-threads`, filters) are
/// tolerated so that `cargo test` can run this binary with the others. `None`: nothing
/// to run (listed, or filtered out).
fn args() -> Option<Args> {
    let mut a = std::env::args().skip(1);
    let (mut first, mut count, mut jobs, mut one) = (1u64, 100u64, 4usize, None);
    let number = |v: Option<String>| -> u64 {
        let v = v.expect("a number after the flag");
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).expect("a hex number"),
            None => v.parse().expect("a number"),
        }
    };
    if let Ok(n) = std::env::var("EXPLORE_SEEDS") {
        count = number(Some(n));
    }
    while let Some(arg) = a.next() {
        match arg.as_str() {
            "--seeds" => count = number(a.next()),
            "--first" => first = number(a.next()),
            "--seed" => one = Some(number(a.next())),
            "--jobs" => jobs = number(a.next()) as usize,
            "--list" => {
                println!("{NAME}: test");
                return None;
            }
            "--ignored" => return None,
            "--test-threads" | "--format" | "--color" | "-Z" | "--skip" => {
                a.next();
            }
            flag if flag.starts_with('-') => {}
            filter if !NAME.contains(filter) => return None,
            _ => {}
        }
    }
    Some(match one {
        Some(seed) => Args {
            seeds: vec![seed],
            jobs: 1,
            one: true,
        },
        None => Args {
            seeds: (first..first + count).collect(),
            jobs: jobs.max(1),
            one: false,
        },
    })
}

fn main() {
    let Some(args) = args() else {
        println!("0 passed, 0 failed");
        return;
    };
    if args.one && std::env::var_os("UFFDKIT_TEST_LOG").is_none() {
        std::env::set_var("UFFDKIT_TEST_LOG", "info");
    }
    common::log_to_stderr();
    // 2 MiB seeds need 16 free huge pages per run at most (32 MiB), `jobs` at once.
    let huge = testkit::hugepages::available(NAME, 16 * args.jobs);
    let started = Instant::now();
    let queue = Arc::new(Mutex::new(args.seeds.clone().into_iter()));
    let results = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..args.jobs)
        .map(|_| {
            let (queue, results, stop) = (queue.clone(), results.clone(), stop.clone());
            std::thread::spawn(move || loop {
                let Some(seed) = queue.lock().unwrap().next() else {
                    return;
                };
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let s = Schedule::draw(seed, huge);
                let r = run_bounded(s.clone());
                match &r {
                    Ok(o) => println!(
                        "seed {seed:#x}: ok in {:.1}s — {:?} {} MiB pages {} rounds {} tls {} \
                         faults {:?} in {:?}, {} missed, {} reconnects",
                        o.took.as_secs_f64(),
                        s.kind,
                        s.bytes >> 20,
                        s.page_size,
                        s.rounds,
                        s.tls,
                        o.modes,
                        o.landed,
                        o.missed,
                        o.reconnects
                    ),
                    Err(e) => {
                        println!("seed {seed:#x}: FAILED: {e}\n  schedule: {s:?}");
                        println!(
                            "  reproduce: cargo test -p postcopy --release --test explore -- \
                             --seed {seed:#x}"
                        );
                        // A hung run keeps its threads: stop taking more seeds.
                        if e.contains("hung") {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
                results.lock().unwrap().push((s, r));
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    summarize(&results.lock().unwrap(), started.elapsed());
}

fn summarize(results: &[(Schedule, Result<Outcome, String>)], wall: Duration) {
    let (mut phases, mut modes) = (BTreeMap::new(), BTreeMap::new());
    let (mut passed, mut failed, mut missed, mut faults) = (0, Vec::new(), 0, 0);
    let (mut moved, mut moving_seeds) = (0, 0);
    for (s, r) in results {
        match r {
            Ok(o) => {
                passed += 1;
                missed += o.missed;
                faults += o.landed.len();
                moved += o.moved;
                moving_seeds += usize::from(o.moved > 0);
                for p in &o.landed {
                    *phases.entry(*p).or_insert(0) += 1;
                }
                for m in &o.modes {
                    *modes.entry(*m).or_insert(0) += 1;
                }
            }
            Err(_) => failed.push(s.seed),
        }
    }
    println!(
        "\nexplored {} seeds in {:.1}s: {faults} faults injected, {missed} planned faults \
         never reached (the run ended first)",
        results.len(),
        wall.as_secs_f64()
    );
    println!("faults by phase: {phases:?}");
    println!("faults by kind: {modes:?}");
    println!("pages moved in as whole 2 MiB blocks: {moved}, in {moving_seeds} seeds");
    if !failed.is_empty() {
        let list: Vec<String> = failed.iter().map(|s| format!("{s:#x}")).collect();
        println!("FAILED seeds: {}", list.join(" "));
    }
    println!("{passed} passed, {} failed", failed.len());
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
