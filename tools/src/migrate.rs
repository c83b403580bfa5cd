//! `uffdkit migrate`: live migration of a memory region with a running, writing workload.
//!
//! `source` owns the region and a writer workload, `dest` receives it and runs a workload
//! from RUN on, `local` runs both as two processes over loopback and prints the figures.
//! Both ends survive broken and silent connections (they pause and resume); each gives
//! up after `--give-up` seconds without a working connection, exiting 1.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use postcopy::migrate::{
    DestOptions, Destination, LinkStatus, Migration, SourceControl, SourceOptions, Timing,
};
use postcopy::net::Addr;
use serde_json::json;
use uffd_core::{Mapping, MemoryKind, HUGE_PAGE_SIZE};

use crate::cli_args::Mode;
use crate::link_args::{raise_open_files, AutoTls, SecurityArgs, SECURITY_HELP};
use crate::progress::{self, Status};
use crate::workload::fill_page;

/// `uffdkit migrate` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Args {
    /// Migrate a region with a writing workload to a destination.
    Source(SourceArgs),
    /// Receive a migration and run the workload from RUN on.
    Dest(DestArgs),
    /// Both, as two processes over loopback, with a report.
    Local(LocalArgs),
    /// Same-run figures over TCP loopback: round trip, raw throughput, the postcopy
    /// stream's throughput, requested-page latency with and without the stream running.
    Netbench(crate::netbench::NetArgs),
}

/// Workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Writes scattered over the whole region.
    Random,
    /// Sequential sweeps.
    Seq,
    /// 90 % of writes to a hot 5 % of the pages.
    Hot,
}

/// Liveness options both ends take.
#[derive(clap::Args, Debug, Clone)]
pub struct Liveness {
    /// Give up after this many seconds without a working connection (paused, or not
    /// connected yet), exiting 1.
    #[arg(long, default_value_t = 60.0)]
    give_up: f64,
    /// A connection that brings nothing for this many seconds (heartbeats are sent
    /// every sixth of it) is broken: the migration pauses and reconnects.
    #[arg(long, default_value_t = 3.0)]
    silence: f64,
}

impl Liveness {
    fn timing(&self) -> Result<Timing> {
        let secs = |what: &str, v: f64| {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| format!("--{what} must be a positive number of seconds"))
        };
        let silence = secs("silence", self.silence)?;
        Ok(Timing {
            silence,
            heartbeat: silence / 6,
            give_up_after: secs("give-up", self.give_up)?,
            ..Timing::default()
        })
    }

    fn args(&self) -> [String; 4] {
        [
            "--give-up".into(),
            self.give_up.to_string(),
            "--silence".into(),
            self.silence.to_string(),
        ]
    }
}

/// What source and local share.
#[derive(clap::Args, Debug, Clone)]
pub struct Shape {
    /// Region size (K, M, G suffixes).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    size: usize,
    /// Workload (writes on the source; content-preserving write accesses on the destination).
    #[arg(long, value_enum, default_value = "random")]
    workload: Workload,
    /// Precopy rounds before the switch (0: pure postcopy).
    #[arg(long, default_value_t = 3)]
    precopy_rounds: u32,
    /// Page size on the wire and at the destination: 4k or 2m (2 MiB hugetlb there).
    #[arg(long, default_value = "4k", value_parser = ["4k", "2m"])]
    page_size: String,
    /// Source workload write rate, MiB/s of 4 KiB pages dirtied (0: unthrottled).
    #[arg(long, default_value_t = 64)]
    dirty_rate: u64,
    #[command(flatten)]
    liveness: Liveness,
}

/// Options of `uffdkit migrate source`.
#[derive(clap::Args, Debug)]
#[command(after_help = SECURITY_HELP)]
pub struct SourceArgs {
    /// The destination: host:port or unix:/path.
    #[arg(long)]
    connect: String,
    /// TLS certificates, or a pre-shared key (trusted links only).
    #[command(flatten)]
    security: SecurityArgs,
    #[command(flatten)]
    shape: Shape,
    /// Do not reconnect by itself: wait for SIGUSR1 (the operator's resume command).
    #[arg(long)]
    no_auto_resume: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Options of `uffdkit migrate dest`.
#[derive(clap::Args, Debug)]
#[command(after_help = SECURITY_HELP)]
pub struct DestArgs {
    /// Where to listen: host:port (loopback unless told otherwise) or unix:/path. The
    /// bound address is printed on stdout as `LISTEN <addr>`.
    #[arg(long, default_value = "127.0.0.1:7701")]
    listen: String,
    /// TLS certificates, or a pre-shared key (trusted links only).
    #[command(flatten)]
    security: SecurityArgs,
    /// Destination workload order.
    #[arg(long, value_enum, default_value = "random")]
    workload: Workload,
    /// Fault delivery mode of the destination's pager.
    #[arg(long, value_enum, default_value = "percpu")]
    mode: Mode,
    #[command(flatten)]
    liveness: Liveness,
    /// Grow the 2 MiB hugetlb pool (as root) to this many free pages before listening,
    /// for a source migrating 2 MiB pages.
    #[arg(long, value_name = "PAGES")]
    reserve_hugepages: Option<usize>,
    /// Fault injection: SIGKILL this process once this many postcopy pages arrived.
    #[arg(long, hide = true)]
    die_after_pages: Option<u64>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Options of `uffdkit migrate local`.
#[derive(clap::Args, Debug)]
pub struct LocalArgs {
    #[command(flatten)]
    shape: Shape,
    /// Transport between the two processes.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "unix"])]
    via: String,
    /// Destination fault delivery mode.
    #[arg(long, value_enum, default_value = "percpu")]
    mode: Mode,
    /// TLS between the two processes, with certificates made for this run by a
    /// throwaway CA (without it: plaintext with a pre-shared key).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "auto")]
    tls: Option<AutoTls>,
    /// Print both reports as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1usize << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("not a size: {s} (e.g. 512M)"))
}

impl Shape {
    fn page_size(&self) -> usize {
        if self.page_size == "2m" {
            HUGE_PAGE_SIZE
        } else {
            4096
        }
    }
}

/// Runs `uffdkit migrate ...`.
pub fn run(args: &Args) -> Result<()> {
    match args {
        Args::Source(a) => source(a),
        Args::Dest(a) => dest(a),
        Args::Local(a) => local(a),
        Args::Netbench(a) => crate::netbench::run(a),
    }
}

/// The source's writer: dirties pages until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl Writer {
    fn start(base: usize, len: usize, workload: Workload, rate_mib: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let pages = (len / 4096) as u64;
            let hot = (pages / 20).max(1);
            let per_ms = rate_mib * 256 / 1000; // 4 KiB pages per millisecond
            let started = Instant::now();
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = match workload {
                    Workload::Random => x % pages,
                    Workload::Seq => i % pages,
                    Workload::Hot if x % 10 != 0 => (x >> 8) % hot,
                    Workload::Hot => x % pages,
                };
                // SAFETY: inside the region, which outlives this thread (joined at the
                // switch, before the region can go).
                unsafe {
                    let w = ((base + p as usize * 4096) as *mut u64).add((i % 512) as usize);
                    w.write_volatile(w.read_volatile().wrapping_add(x | 1));
                }
                i += 1;
                if per_ms > 0 && i % per_ms.max(1) == 0 {
                    // Throttle: i writes should take i / per_ms milliseconds.
                    let due = Duration::from_millis(i / per_ms);
                    if let Some(ahead) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(ahead);
                    }
                }
            }
            i
        });
        Writer { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// Takes SIGUSR1 (resume) and SIGUSR2 (switch to postcopy) for a migration, on a thread
/// of its own with `sigwait(2)`. Call before starting any other thread.
fn operator_signals(control: Arc<SourceControl>) -> Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    set.add(Signal::SIGUSR2);
    set.thread_block().context("block SIGUSR1 and SIGUSR2")?;
    std::thread::Builder::new()
        .name("operator".into())
        .spawn(move || {
            while let Ok(signal) = set.wait() {
                if signal == Signal::SIGUSR1 {
                    log::info!("SIGUSR1: resume");
                    control.resume();
                } else {
                    log::info!("SIGUSR2: switch to postcopy after this round");
                    control.switch_to_postcopy();
                }
            }
        })
        .context("start the operator thread")?;
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// The phase for progress: `Paused (Phase)` while paused, so a plain line marks the
/// pause and the resume; the text says why and for how long.
fn link_status(phase: String, link: &LinkStatus, counters: String) -> Status {
    let reconnects = link.reconnects();
    match link.paused() {
        Some((paused, why)) => Status {
            phase: format!("Paused ({phase})"),
            fraction: None,
            text: format!(
                "for {:.1} s: {why}; {reconnects} reconnects so far",
                paused.as_secs_f64()
            ),
        },
        None => Status {
            phase,
            fraction: None,
            text: format!("{counters}, {reconnects} reconnects"),
        },
    }
}

fn source(a: &SourceArgs) -> Result<()> {
    let security = a.security.security()?;
    let addr: Addr = a.connect.parse()?;
    let ps = a.shape.page_size();
    let size = a.shape.size.div_ceil(ps) * ps;
    let opts = SourceOptions {
        page_size: ps,
        max_rounds: a.shape.precopy_rounds,
        auto_resume: !a.no_auto_resume,
        timing: a.shape.liveness.timing()?,
        ..SourceOptions::default()
    };
    let memory = Mapping::new(MemoryKind::Anon, size).context("map the region")?;
    for p in 0..size / 4096 {
        // SAFETY: our fresh mapping; no other thread yet.
        let page =
            unsafe { std::slice::from_raw_parts_mut((memory.addr() + p * 4096) as *mut u8, 4096) };
        fill_page(page, p, 7);
    }
    // SAFETY: `memory` is ours and outlives `run`; only the writer writes it, and the
    // callback stops it.
    let migration = unsafe { Migration::new(addr, security, memory.addr(), size, opts)? };
    let control = migration.control();
    operator_signals(control.clone())?;
    let writer = Arc::new(Mutex::new(Some(Writer::start(
        memory.addr(),
        size,
        a.shape.workload,
        a.shape.dirty_rate,
    ))));
    let status = || {
        let p = &control.progress;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let phase = p.phase();
        let post = &p.postcopy;
        let counters = match phase {
            postcopy::migrate::Phase::Precopy => format!(
                "round {}, precopy {:.0} MiB",
                get(&p.round),
                mib(get(&p.precopy_bytes))
            ),
            _ => format!(
                "precopy {:.0} MiB, postcopy {:.0} MiB: stream {} urgent {} pages, {} requests",
                mib(get(&p.precopy_bytes)),
                mib(get(&post.bytes)),
                get(&post.stream_pages),
                get(&post.urgent_pages),
                get(&post.requests)
            ),
        };
        link_status(format!("{phase:?}"), &p.link, counters)
    };
    let stopper = writer.clone();
    let result = progress::track(module_path!(), "source", status, || {
        migration.run(move || {
            if let Some(w) = stopper.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let writes = w.stop();
                log::info!("source: workload stopped after {writes} writes");
            }
        })
    });
    if let Some(w) = writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
        w.stop();
    }
    let r = result.context("migration failed")?;
    let report = json!({
        "pages": r.pages,
        "page_size": r.page_size,
        "rounds": r.rounds.iter().map(|x| json!({
            "pages": x.pages, "bytes": x.bytes, "dirty_after": x.dirty_after,
            "ms": x.took.as_secs_f64() * 1e3,
        })).collect::<Vec<_>>(),
        "switch_reason": format!("{:?}", r.switch_reason),
        "precopy_bytes": r.precopy_bytes,
        "postcopy_bytes": r.postcopy_bytes,
        "discarded": r.discarded,
        "needed_at_switch": r.needed_at_switch,
        "stream_pages": r.stream_pages,
        "urgent_pages": r.urgent_pages,
        "requests": r.requests,
        "downtime_ms": r.downtime.as_secs_f64() * 1e3,
        "postcopy_ms": r.postcopy.as_secs_f64() * 1e3,
        "total_ms": r.total.as_secs_f64() * 1e3,
        "reconnects": r.reconnects,
        "verified": r.verified,
    });
    print_report(&report, a.json)
}

fn print_report(report: &serde_json::Value, json: bool) -> Result<()> {
    if json {
        println!("{report}");
    } else {
        eprintln!("{}", serde_json::to_string_pretty(report)?);
    }
    Ok(())
}

/// The destination's workload: one content-preserving write per 4 KiB page, in
/// the workload's order; returns how long it took to touch every page.
fn touch_all(base: usize, len: usize, workload: Workload) -> Duration {
    let t = Instant::now();
    let pages = len / 4096;
    let order: Vec<usize> = match workload {
        Workload::Seq => (0..pages).collect(),
        Workload::Random => crate::workload::order(crate::workload::Pattern::Random, pages, 7),
        Workload::Hot => {
            let hot = (pages / 20).max(1);
            (0..hot).chain(hot..pages).collect()
        }
    };
    for p in order {
        // A volatile read then a volatile write of the same value: a write fault on a
        // missing page that changes nothing (this thread is the only writer).
        // SAFETY: the migrated region, mapped until the process exits (the report owns it).
        unsafe {
            let w = (base + p * 4096) as *mut u64;
            w.write_volatile(w.read_volatile());
        }
    }
    t.elapsed()
}

/// `--die-after-pages`: SIGKILLs this process once that many pages were placed.
fn die_after(control: Arc<postcopy::migrate::DestControl>, pages: u64) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(1));
        let arrived = control.received.placed.load(Ordering::Relaxed);
        if arrived >= pages {
            log::warn!("dest: fault injection: dying after {arrived} postcopy pages");
            let _ = nix::sys::signal::raise(Signal::SIGKILL);
        }
    });
}

fn dest(a: &DestArgs) -> Result<()> {
    let security = a.security.security()?;
    let addr: Addr = a.listen.parse()?;
    if let Some(pages) = a.reserve_hugepages {
        let free = crate::hugepages::reserve(pages);
        if free < pages {
            bail!("{pages} free 2 MiB huge pages are needed, {free} could be had");
        }
    }
    let opts = DestOptions {
        mode: a.mode.into(),
        timing: a.liveness.timing()?,
        ..DestOptions::default()
    };
    raise_open_files();
    let d = Destination::bind(&addr, security, opts).context("bind")?;
    println!("LISTEN {}", d.local_addr()?);
    std::io::stdout().flush()?;
    let control = d.control();
    if let Some(pages) = a.die_after_pages {
        die_after(control.clone(), pages);
    }
    let status = || {
        let r = &control.received;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let counters = format!(
            "precopy {} pages, postcopy {} pages, {} requested",
            get(&r.copied),
            get(&r.placed),
            get(&r.requested)
        );
        link_status(format!("{:?}", control.phase()), &control.link, counters)
    };
    let workload = a.workload;
    let touched: Arc<Mutex<Option<JoinHandle<Duration>>>> = Arc::default();
    let t = touched.clone();
    let result = progress::track(module_path!(), "dest", status, || {
        d.run(move |mem| {
            *t.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::thread::spawn(move || {
                touch_all(mem.base, mem.len, workload)
            }));
        })
    });
    let r = result.context("migration failed")?;
    let workload_ms = touched
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .and_then(|h| h.join().ok())
        .map(|d| d.as_secs_f64() * 1e3);
    let report = json!({
        "pages": r.pages,
        "page_size": r.page_size,
        "precopy_pages": r.precopy_pages,
        "discarded": r.discarded,
        "postcopy_pages": r.postcopy_pages,
        "requested": r.requested,
        "latency_buckets_log2_us": r.latency.counts().to_vec(),
        "requested_p50_us": requested_quantile_us(&r.latency, 0.5),
        "requested_p99_us": requested_quantile_us(&r.latency, 0.99),
        "blocktime_ms": r.blocktime.as_secs_f64() * 1e3,
        "postcopy_ms": r.postcopy.as_secs_f64() * 1e3,
        "workload_ms": workload_ms,
        "reconnects": r.reconnects,
        "faults": r.pager.faults(),
        "verdict": r.verdict,
    });
    print_report(&report, a.json)?;
    if !a.json {
        for line in r.latency.lines() {
            eprintln!("  {line}");
        }
    }
    // The workload may still hold the memory; exit without unmapping.
    std::mem::forget(r.memory);
    Ok(())
}

/// `≤ N µs` for a latency bound, `n/a` when nothing was requested.
fn us_or_none(v: &serde_json::Value) -> String {
    v.as_u64()
        .map_or_else(|| "n/a (no requests)".into(), |us| format!("≤ {us} µs"))
}

/// A quantile bound of requested-page latencies in µs (`None`: nothing requested).
fn requested_quantile_us(latency: &pager::LatencyHistogram, q: f64) -> Option<u64> {
    latency.quantile(q).map(|d| d.as_micros() as u64)
}

/// Starts `uffdkit migrate dest` for `local`; returns it and its listening address.
fn start_dest(
    a: &LocalArgs,
    security: &SecurityArgs,
    listen: &str,
) -> Result<(
    std::process::Child,
    BufReader<std::process::ChildStdout>,
    String,
)> {
    let s = &a.shape;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["migrate", "dest", "--json", "--listen", listen])
        .args(["--mode", &format!("{:?}", a.mode).to_lowercase()])
        // Two live bars on one terminal would tear each other: the children print lines.
        .args(["--progress", "lines"])
        .args(["--workload", &format!("{:?}", s.workload).to_lowercase()])
        .args(s.liveness.args())
        .args(security.to_args())
        .stdout(Stdio::piped());
    if s.page_size() == HUGE_PAGE_SIZE {
        cmd.args([
            "--reserve-hugepages",
            &s.size.div_ceil(HUGE_PAGE_SIZE).to_string(),
        ]);
    }
    let mut dest = cmd.spawn().context("start the destination")?;
    let mut out = BufReader::new(dest.stdout.take().context("dest stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    match line.trim().strip_prefix("LISTEN ") {
        Some(addr) => Ok((dest, out, addr.to_string())),
        None => {
            let _ = dest.kill();
            let _ = dest.wait();
            bail!("the destination did not start: {line:?}")
        }
    }
}

fn local(a: &LocalArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("uffdkit-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (listener, opener) = match a.tls {
        Some(AutoTls::Auto) => crate::link_args::throwaway(&dir)?,
        None => {
            let key_file = dir.join("key");
            std::fs::write(&key_file, postcopy::auth::nonce()?)?;
            let psk = SecurityArgs {
                key_file: Some(key_file),
                ..SecurityArgs::default()
            };
            (psk.clone(), psk)
        }
    };
    let listen = match a.via.as_str() {
        "unix" => format!("unix:{}", dir.join("sock").display()),
        _ => "127.0.0.1:0".to_string(),
    };
    let started = Instant::now();
    let (mut dest, mut dest_out, addr) = start_dest(a, &listener, &listen)?;
    let s = &a.shape;
    let source = Command::new(std::env::current_exe()?)
        .args(["migrate", "source", "--json", "--connect", &addr])
        .args(["--progress", "lines"])
        .args(["--size", &s.size.to_string()])
        .args(["--workload", &format!("{:?}", s.workload).to_lowercase()])
        .args(["--precopy-rounds", &s.precopy_rounds.to_string()])
        .args(["--page-size", &s.page_size])
        .args(["--dirty-rate", &s.dirty_rate.to_string()])
        .args(s.liveness.args())
        .args(opener.to_args())
        .stdout(Stdio::piped())
        .output()
        .context("run the source")?;
    let mut dest_json = String::new();
    std::io::Read::read_to_string(&mut dest_out, &mut dest_json)?;
    let dest_status = dest.wait()?;
    let wall = started.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    if !source.status.success() || !dest_status.success() {
        bail!(
            "migration failed (source {}, destination {dest_status}); see the messages above",
            source.status
        );
    }
    let src: serde_json::Value = serde_json::from_slice(&source.stdout).context("source report")?;
    let dst: serde_json::Value = serde_json::from_str(dest_json.trim()).context("dest report")?;
    if a.json {
        let all = json!({ "wall_ms": wall.as_secs_f64() * 1e3, "source": src, "dest": dst });
        println!("{all}");
        return Ok(());
    }
    print_local(a, &src, &dst, wall);
    Ok(())
}

fn print_local(a: &LocalArgs, src: &serde_json::Value, dst: &serde_json::Value, wall: Duration) {
    let s = &a.shape;
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let mib_of = |v: &serde_json::Value, k: &str| f(v, k) / f64::from(1u32 << 20);
    let link = match a.tls {
        Some(AutoTls::Auto) => "TLS 1.3 (throwaway CA)",
        None => "plaintext with a pre-shared key",
    };
    println!(
        "migrate local: {} MiB, {} pages of {} bytes, workload {:?}, via {} ({link}), destination mode {:?}",
        s.size >> 20,
        src["pages"],
        src["page_size"],
        s.workload,
        a.via,
        a.mode
    );
    let rounds = src["rounds"].as_array().map(|r| {
        r.iter()
            .map(|x| format!("{}/{}", x["pages"], x["dirty_after"]))
            .collect::<Vec<_>>()
            .join(", ")
    });
    println!(
        "  precopy rounds (pages sent / dirty after): {}; switch: {}",
        rounds.unwrap_or_default(),
        src["switch_reason"].as_str().unwrap_or("?")
    );
    println!(
        "  total {:.0} ms (wall, both processes {:.0} ms); downtime (stop → RUN acknowledged) {:.1} ms; postcopy {:.0} ms",
        f(src, "total_ms"),
        wall.as_secs_f64() * 1e3,
        f(src, "downtime_ms"),
        f(src, "postcopy_ms")
    );
    println!(
        "  bytes: precopy {:.1} MiB, postcopy {:.1} MiB; discarded {} pages; needed at switch {}",
        mib_of(src, "precopy_bytes"),
        mib_of(src, "postcopy_bytes"),
        src["discarded"],
        src["needed_at_switch"]
    );
    println!(
        "  requested pages {} ({} requests answered with {} pages), stream pages {}; blocktime {:.1} ms; requested-page latency p50 {}, p99 {}",
        dst["requested"],
        src["requests"],
        src["urgent_pages"],
        src["stream_pages"],
        f(dst, "blocktime_ms"),
        us_or_none(&dst["requested_p50_us"]),
        us_or_none(&dst["requested_p99_us"])
    );
    if let Some(b) = dst["latency_buckets_log2_us"].as_array() {
        let counts: Vec<u64> = b.iter().map(|v| v.as_u64().unwrap_or(0)).collect();
        let histogram = pager::LatencyHistogram::from_counts(&counts, Duration::ZERO);
        for line in histogram.lines() {
            println!("    {line}");
        }
    }
    println!(
        "  destination workload touched every page in {:.0} ms from RUN; reconnects {}; {} of {} pages verified: {}",
        f(dst, "workload_ms"),
        src["reconnects"],
        src["verified"],
        src["pages"],
        dst["verdict"].as_str().unwrap_or("?")
    );
}
