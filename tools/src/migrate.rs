//! `uffdkit migrate`: live migration of a memory region with a running, writing workload.
//!
//! `source` owns the region and a writer workload, `dest` receives it and runs a workload
//! from RUN on, `local` runs both as two processes over loopback and prints the figures.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use postcopy::auth::Key;
use postcopy::migrate::{
    DestOptions, Destination, Migration, Phase, SourceControl, SourceOptions, Timing,
};
use postcopy::net::Addr;
use serde_json::json;
use uffd_core::{Mapping, MemoryKind, HUGE_PAGE_SIZE};

use crate::cli_args::Mode;
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
    /// Give up after this many seconds paused (no reconnection).
    #[arg(long, default_value_t = 60)]
    give_up: u64,
}

/// Options of `uffdkit migrate source`.
#[derive(clap::Args, Debug)]
pub struct SourceArgs {
    /// The destination: host:port or unix:/path.
    #[arg(long)]
    connect: String,
    /// File holding the pre-shared key.
    #[arg(long)]
    key_file: PathBuf,
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
pub struct DestArgs {
    /// Where to listen: host:port (loopback unless told otherwise) or unix:/path. The
    /// bound address is printed on stdout as `LISTEN <addr>`.
    #[arg(long, default_value = "127.0.0.1:7701")]
    listen: String,
    /// File holding the pre-shared key.
    #[arg(long)]
    key_file: PathBuf,
    /// Destination workload order.
    #[arg(long, value_enum, default_value = "random")]
    workload: Workload,
    /// Fault delivery mode of the destination's pager.
    #[arg(long, value_enum, default_value = "percpu")]
    mode: Mode,
    /// Give up after this many seconds waiting for the source.
    #[arg(long, default_value_t = 60)]
    give_up: u64,
    /// Fault injection: SIGKILL this process once this many postcopy pages arrived.
    #[arg(long)]
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

/// Forwards SIGUSR1 (resume) and SIGUSR2 (switch to postcopy) to a migration.
fn operator_signals(control: Arc<SourceControl>, done: Arc<AtomicBool>) {
    static USR1: AtomicBool = AtomicBool::new(false);
    static USR2: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_signal(sig: libc::c_int) {
        if sig == libc::SIGUSR1 {
            USR1.store(true, Ordering::Relaxed);
        } else {
            USR2.store(true, Ordering::Relaxed);
        }
    }
    // SAFETY: the handler only stores to atomics (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGUSR1, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGUSR2, on_signal as *const () as libc::sighandler_t);
    }
    std::thread::spawn(move || {
        while !done.load(Ordering::Relaxed) {
            if USR1.swap(false, Ordering::Relaxed) {
                log::info!("SIGUSR1: resume");
                control.resume();
            }
            if USR2.swap(false, Ordering::Relaxed) {
                log::info!("SIGUSR2: switch to postcopy after this round");
                control.switch_to_postcopy();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

fn source(a: &SourceArgs) -> Result<()> {
    let key = Key::from_file(&a.key_file).context("read the key file")?;
    let addr: Addr = a.connect.parse()?;
    let ps = a.shape.page_size();
    let size = a.shape.size.div_ceil(ps) * ps;
    let memory = Mapping::new(MemoryKind::Anon, size).context("map the region")?;
    for p in 0..size / 4096 {
        // SAFETY: our fresh mapping; no other thread yet.
        let page =
            unsafe { std::slice::from_raw_parts_mut((memory.addr() + p * 4096) as *mut u8, 4096) };
        fill_page(page, p, 7);
    }
    let writer = Arc::new(Mutex::new(Some(Writer::start(
        memory.addr(),
        size,
        a.shape.workload,
        a.shape.dirty_rate,
    ))));
    let opts = SourceOptions {
        page_size: ps,
        max_rounds: a.shape.precopy_rounds,
        auto_resume: !a.no_auto_resume,
        timing: Timing {
            give_up_after: Duration::from_secs(a.shape.give_up),
            ..Timing::default()
        },
        ..SourceOptions::default()
    };
    // SAFETY: `memory` is ours and outlives `run`; only the writer writes it, and the
    // callback stops it.
    let migration = unsafe { Migration::new(addr, key, memory.addr(), size, opts)? };
    let control = migration.control();
    let done = Arc::new(AtomicBool::new(false));
    operator_signals(control.clone(), done.clone());
    let status = || {
        let p = &control.progress;
        let phase = p.phase();
        let extra = match phase {
            Phase::Precopy => format!("round {}", p.round.load(Ordering::Relaxed)),
            _ => format!(
                "stream {} urgent {} pages, {} requests, {} reconnects",
                p.stream_pages.load(Ordering::Relaxed),
                p.urgent_pages.load(Ordering::Relaxed),
                p.requests.load(Ordering::Relaxed),
                p.reconnects.load(Ordering::Relaxed)
            ),
        };
        Status {
            phase: format!("{phase:?}"),
            fraction: None,
            text: format!(
                "precopy {:.0} MiB, postcopy {:.0} MiB, {extra}",
                mib(p.precopy_bytes.load(Ordering::Relaxed)),
                mib(p.postcopy_bytes.load(Ordering::Relaxed)),
            ),
        }
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
    done.store(true, Ordering::Relaxed);
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
        "switch_reason": r.switch_reason,
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
    if a.json {
        println!("{report}");
    } else {
        eprintln!("{}", serde_json::to_string_pretty(&report)?);
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

fn dest(a: &DestArgs) -> Result<()> {
    let key = Key::from_file(&a.key_file).context("read the key file")?;
    let addr: Addr = a.listen.parse()?;
    let d = Destination::bind(
        &addr,
        key,
        DestOptions {
            mode: a.mode.into(),
            timing: Timing {
                give_up_after: Duration::from_secs(a.give_up),
                ..Timing::default()
            },
        },
    )
    .context("bind")?;
    println!("LISTEN {}", addr_text(&d.local_addr()?));
    std::io::stdout().flush()?;
    let control = d.control();
    if let Some(die) = a.die_after_pages {
        let control = control.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(1));
            let arrived = control.postcopy_pages.load(Ordering::Relaxed);
            if arrived >= die {
                log::warn!("dest: fault injection: dying after {arrived} postcopy pages");
                // SAFETY: kill(2) on ourselves.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
        });
    }
    let status = || Status {
        phase: format!("{:?}", control.phase()),
        fraction: None,
        text: format!(
            "precopy {} pages, postcopy {} pages, {} reconnects",
            control.precopy_pages.load(Ordering::Relaxed),
            control.postcopy_pages.load(Ordering::Relaxed),
            control.reconnects.load(Ordering::Relaxed)
        ),
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
    if a.json {
        println!("{report}");
    } else {
        eprintln!("{}", serde_json::to_string_pretty(&report)?);
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

fn addr_text(a: &Addr) -> String {
    match a {
        Addr::Tcp(s) => s.to_string(),
        Addr::Unix(p) => format!("unix:{}", p.display()),
    }
}

fn local(a: &LocalArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("uffdkit-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key_file = dir.join("key");
    std::fs::write(&key_file, postcopy::auth::nonce())?;
    let listen = match a.via.as_str() {
        "unix" => format!("unix:{}", dir.join("sock").display()),
        _ => "127.0.0.1:0".to_string(),
    };
    let exe = std::env::current_exe()?;
    let mode = format!("{:?}", a.mode).to_lowercase();
    let workload = format!("{:?}", a.shape.workload).to_lowercase();
    let started = Instant::now();
    let mut dest = Command::new(&exe)
        .args([
            "migrate", "dest", "--json", "--listen", &listen, "--mode", &mode,
        ])
        // Two live bars on one terminal would tear each other: the children print lines.
        .args(["--progress", "lines"])
        .args([
            "--workload",
            &workload,
            "--give-up",
            &a.shape.give_up.to_string(),
        ])
        .arg("--key-file")
        .arg(&key_file)
        .stdout(Stdio::piped())
        .spawn()
        .context("start the destination")?;
    let mut dest_out = BufReader::new(dest.stdout.take().context("dest stdout")?);
    let mut line = String::new();
    dest_out.read_line(&mut line)?;
    let Some(addr) = line.trim().strip_prefix("LISTEN ") else {
        let _ = dest.kill();
        bail!("the destination did not start: {line:?}");
    };
    let s = &a.shape;
    let source = Command::new(&exe)
        .args(["migrate", "source", "--json", "--connect", addr])
        .args(["--progress", "lines"])
        .args(["--size", &s.size.to_string(), "--workload", &workload])
        .args(["--precopy-rounds", &s.precopy_rounds.to_string()])
        .args([
            "--page-size",
            &s.page_size,
            "--dirty-rate",
            &s.dirty_rate.to_string(),
        ])
        .args(["--give-up", &s.give_up.to_string()])
        .arg("--key-file")
        .arg(&key_file)
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
        println!(
            "{}",
            json!({ "wall_ms": wall.as_secs_f64() * 1e3, "source": src, "dest": dst })
        );
        return Ok(());
    }
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let mib_of = |v: &serde_json::Value, k: &str| f(v, k) / f64::from(1u32 << 20);
    println!(
        "migrate local: {} MiB, {} pages of {} bytes, workload {workload}, via {}, destination mode {mode}",
        s.size >> 20,
        src["pages"],
        src["page_size"],
        a.via
    );
    println!(
        "  precopy rounds (pages sent / dirty after): {}; switch: {}",
        src["rounds"]
            .as_array()
            .map(|r| r
                .iter()
                .map(|x| format!("{}/{}", x["pages"], x["dirty_after"]))
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
        src["switch_reason"].as_str().unwrap_or("?")
    );
    println!(
        "  total {:.0} ms (wall, both processes {:.0} ms); downtime (stop → RUN acknowledged) {:.1} ms; postcopy {:.0} ms",
        f(&src, "total_ms"),
        wall.as_secs_f64() * 1e3,
        f(&src, "downtime_ms"),
        f(&src, "postcopy_ms")
    );
    println!(
        "  bytes: precopy {:.1} MiB, postcopy {:.1} MiB; discarded {} pages; needed at switch {}",
        mib_of(&src, "precopy_bytes"),
        mib_of(&src, "postcopy_bytes"),
        src["discarded"],
        src["needed_at_switch"]
    );
    println!(
        "  requested pages {} ({} requests answered with {} pages), stream pages {}; blocktime {:.1} ms; requested-page latency p50 {}, p99 {}",
        dst["requested"],
        src["requests"],
        src["urgent_pages"],
        src["stream_pages"],
        f(&dst, "blocktime_ms"),
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
        f(&dst, "workload_ms"),
        src["reconnects"],
        src["verified"],
        src["pages"],
        dst["verdict"].as_str().unwrap_or("?")
    );
    Ok(())
}
