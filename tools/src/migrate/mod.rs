//! `uffdkit migrate`: live migration of a memory region with a running, writing workload.
//!
//! `source` owns the region and a writer workload, `dest` receives it and runs a workload
//! from RUN on, `local` runs both as two processes over loopback and prints the figures.
//! Both ends survive broken and silent connections (they pause and resume); each gives
//! up after `--give-up` seconds without a working connection, exiting 1.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use postcopy::migrate::{
    DestOptions, Destination, LinkStatus, Migration, SourceControl, SourceOptions, Timing,
};
use serde_json::json;
use transport::Addr;
use uffd_core::{Mapping, MemoryKind, HUGE_PAGE_SIZE};

use crate::cli_args::Mode;
use crate::link_args::{raise_open_files, AutoTls, SecurityArgs, SECURITY_HELP};
use crate::progress::{self, Status};
/// Sizes on the command line are read by `units` (re-exported for the subcommands that
/// name it here).
pub(crate) use crate::units::parse_size;
use crate::workload::fill_page;

mod dest;
mod local;
mod source;

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
    /// The source region's memory: thp (anonymous memory with MADV_HUGEPAGE, as QEMU
    /// gives its guest RAM: the kernel maps 2 MiB where it can, and the dirty tracker's
    /// page-table walk passes over an unwritten 2 MiB in one entry, where a write splits
    /// it) or 4k (base pages only: every scan walks a page-table entry per 4 KiB).
    #[arg(long, default_value = "thp", value_parser = ["thp", "4k"])]
    source_memory: String,
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
    /// Move the stream's whole 2 MiB blocks in as transparent huge pages, uncopied, and
    /// advise the memory for huge pages from LISTEN on (postcopy's `DestOptions::huge_pages`;
    /// the README's "The network data path" has what it costs).
    #[arg(long)]
    huge_pages: bool,
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
        Args::Source(a) => source::source(a),
        Args::Dest(a) => dest::dest(a),
        Args::Local(a) => local::local(a),
        Args::Netbench(a) => crate::netbench::run(a),
    }
}

/// Milliseconds, for the JSON reports.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
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

fn print_report(report: &serde_json::Value, json: bool) -> Result<()> {
    if json {
        println!("{report}");
    } else {
        eprintln!("{}", serde_json::to_string_pretty(report)?);
    }
    Ok(())
}

/// `≤ N µs` for a latency bound, `n/a` when nothing was requested.
fn us_or_none(v: &serde_json::Value) -> String {
    v.as_u64()
        .map_or_else(|| "n/a (no requests)".into(), |us| format!("≤ {us} µs"))
}

/// `CLOCK_MONOTONIC` in ns: one clock for every process on the host, so `migrate local`
/// can tell how long after the source's workload stopped the destination's resumed.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}
