//! `uffdkit`: probe, benchmark and serve memory on demand through userfaultfd.

mod bench;
mod cli_args;
mod demo;
mod fc_handler;
mod image;
mod migrate;
mod netbench;
mod probe;
mod restore;
mod serve;
mod workload;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Serve memory pages to a running process on demand through Linux userfaultfd.
#[derive(Parser)]
#[command(name = "uffdkit", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
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
    /// External page-fault handler for Firecracker snapshot restore.
    FcHandler(fc_handler::Args),
    /// Chunked images in an object store: push, pull, inspect.
    #[command(subcommand)]
    Image(image::Args),
    /// Play Firecracker's side of the UFFD handshake against a handler, and verify.
    FcClient(fc_handler::ClientArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Demo(demo::Args::default())) {
        Command::Probe(args) => probe::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Restore(args) => restore::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Migrate(args) => migrate::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::FcHandler(args) => fc_handler::run(&args),
        Command::FcClient(args) => fc_handler::run_client(&args),
        Command::Image(args) => image::run(&args),
    }
}
