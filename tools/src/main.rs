//! `uffdkit`: probe, benchmark and serve memory on demand through userfaultfd.

mod bench;
mod cli_args;
mod demo;
mod exit;
mod fc_client;
mod fc_handler;
mod guarded;
mod hugepages;
mod image;
mod link_args;
mod logging;
mod migrate;
mod netbench;
mod partial;
mod plot;
mod probe;
mod progress;
mod restore;
mod serve;
mod signals;
mod snapshot;
mod stretched;
mod sweep;
mod units;
mod workload;
mod zero_pages;

use std::process::ExitCode;

use anyhow::Result;
use clap::{ArgAction, Parser, Subcommand};

/// Serve memory pages to a running process on demand through Linux userfaultfd.
#[derive(Parser)]
#[command(name = "uffdkit", version, about, after_help = exit::HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// More output: -v debug messages (and error backtraces), -vv trace.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Less output: -q only warnings and errors (no progress), -qq only errors.
    #[arg(short, long, action = ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,
    /// How migrate, restore and serve show their progress (other commands have none): a
    /// live bar on a terminal, plain lines otherwise (auto), or as chosen.
    #[arg(long, value_enum, default_value_t = progress::Display::Auto, global = true)]
    progress: progress::Display,
}

#[derive(Subcommand)]
enum Command {
    /// What this kernel and this process can do with userfaultfd.
    Probe(probe::Args),
    /// The main job: lazily restore a 512 MiB synthetic image through the pager, verify
    /// every page, report.
    Demo(demo::Args),
    /// Run a workload over memory restored lazily from an image file (and compare).
    Restore(restore::Args),
    /// Fault-latency stress across delivery modes, with same-run baselines.
    Bench(bench::Args),
    /// Live migration of a memory region with a running, writing workload.
    #[command(subcommand)]
    Migrate(migrate::Args),
    /// A page server that many destinations restore one image from.
    Serve(serve::Args),
    /// External page-fault handler for Firecracker snapshot restore (a drop-in for
    /// Firecracker's example handlers: `uffdkit fc-handler SOCKET MEMFILE`).
    FcHandler(Box<fc_handler::Args>),
    /// Chunked images in an object store: push, pull, inspect, merge.
    #[command(subcommand)]
    Image(image::Args),
    /// Play Firecracker's side of the UFFD handshake against a handler, and verify.
    FcClient(fc_client::ClientArgs),
    /// Live and incremental snapshots of a region that keeps being written.
    #[command(subcommand)]
    Snapshot(snapshot::Args),
}

fn main() -> ExitCode {
    // Usage errors (and --help, --version) exit here, through clap: status 2 (0).
    let cli = Cli::parse();
    let backtrace = exit::decide_backtraces(cli.verbose);
    logging::init(cli.verbose, cli.quiet);
    progress::set_display(cli.progress);
    let outcome = run(cli.command.unwrap_or(Command::Demo(demo::Args::default())));
    // A termination signal ends the process itself, after its cleanup: what the command
    // returned meanwhile (often an error the cleanup caused) is not its outcome.
    signals::await_termination();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit::report(&e, backtrace),
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Probe(args) => probe::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Restore(args) => restore::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Migrate(args) => migrate::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::FcHandler(args) => fc_handler::run(&args),
        Command::FcClient(args) => fc_client::run(&args),
        Command::Image(args) => image::run(&args),
        Command::Snapshot(args) => snapshot::run(&args),
    }
}
