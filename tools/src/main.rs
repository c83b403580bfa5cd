//! `uffdkit`: probe, benchmark and serve memory on demand through userfaultfd.

mod demo;
mod probe;

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
    /// The main job: serve a 64 MiB region on demand, verify every page, report.
    Demo(demo::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Demo(demo::Args::default())) {
        Command::Probe(args) => probe::run(&args),
        Command::Demo(args) => demo::run(&args),
    }
}
