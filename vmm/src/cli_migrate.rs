//! `uffdkit-vmm migrate-out` / `migrate-in`: live post-copy migration of the running guest
//! between two VMM processes over postcopy's protocol (TCP or a Unix socket, PSK).
//!
//! The switch carries no device state, so the vCPU state travels beside the protocol:
//! the source writes `vm.json` (and the checksum its model expects) into a directory both
//! processes see, before the switch's RUN; the destination reads it at RUN. Same host, or
//! a shared directory, until the protocol carries it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pager::DeliveryMode;
use postcopy::auth::Key;
use postcopy::migrate::{DestOptions, Destination, Migration, RunningMemory, SourceOptions};
use postcopy::net::Addr;
use uffdkit_vmm::{Command, GuestModel, Vm, VmConfig, VmState};

/// The file the source writes the expected checksum into, beside `vm.json`.
const EXPECTED_FILE: &str = "expected-checksum";

/// Shared arguments.
#[derive(clap::Args)]
pub struct Common {
    /// Guest memory in MiB (the same on both sides).
    #[arg(long, default_value_t = 16)]
    mib: usize,
    /// The pre-shared key file (trusted links only).
    #[arg(long)]
    key_file: PathBuf,
    /// Where the vCPU state goes from source to destination (a directory both see).
    #[arg(long)]
    state_dir: PathBuf,
}

/// `migrate-out` arguments.
#[derive(clap::Args)]
pub struct OutArgs {
    #[command(flatten)]
    common: Common,
    /// The destination's address (host:port or unix:PATH).
    #[arg(long)]
    to: String,
    /// Commands the guest runs at least before the switch.
    #[arg(long, default_value_t = 200)]
    min_commands: u64,
}

/// `migrate-in` arguments.
#[derive(clap::Args)]
pub struct InArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on (host:port, port 0 for any, or unix:PATH).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
}

/// The guest's work while it migrates: 64-page runs at moving places in the first half
/// of its data pages, each with a new seed.
fn rewrite(pages: u32, n: u64) -> Command {
    let span = pages / 2;
    Command::Fill {
        first: (n as u32 * 61) % (span - 64),
        pages: 64,
        seed: 0x2222_0000 + n as u32,
        stride: 1,
    }
}

fn key(path: &Path) -> anyhow::Result<Key> {
    // Refuses a key others can read (the source writes it 0600).
    Key::from_file(path, false).with_context(|| format!("key file {}", path.display()))
}

/// Boots a guest, fills it, and migrates it while it rewrites its memory.
pub fn out(args: OutArgs) -> anyhow::Result<()> {
    let config = VmConfig::new(args.common.mib);
    let pages = config.data_pages();
    let mut model = GuestModel::new(pages);
    let mut vm = Vm::boot(config.clone())?;
    let fill = Command::Fill {
        first: 0,
        pages,
        seed: 0x1111_0000,
        stride: 1,
    };
    vm.run(&[vec![fill]])?;
    model.apply(fill);
    let to: Addr = args.to.parse().context("--to")?;
    let (base, len) = (vm.memory().addr(), vm.memory().len());
    let stop = AtomicBool::new(false);
    let issued = AtomicU64::new(0);
    let next = |_vcpu: usize, n: u64| {
        // Release: pairs with the Acquire in the stop callback; only the count matters.
        issued.fetch_add(1, Ordering::Release);
        rewrite(pages, n)
    };
    std::thread::scope(|scope| {
        let (stop, next) = (&stop, &next);
        let guest = scope.spawn(move || {
            let reports = vm.run_until(stop, next);
            (vm, reports)
        });
        // SAFETY: guest memory is the VM's private anonymous mapping; the VM comes back
        // from its thread in the stop callback and lives until this scope ends, after
        // `run` returned; only its guest writes the memory, and the callback returns once
        // the vCPU has halted.
        let migration = unsafe {
            Migration::new(
                to,
                key(&args.common.key_file)?,
                base,
                len,
                SourceOptions::default(),
            )
        }?;
        let mut stopped = None;
        let report = migration.run(|| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while issued.load(Ordering::Acquire) < args.min_commands && Instant::now() < deadline {
                std::thread::yield_now();
            }
            stop.store(true, Ordering::Release);
            stopped = Some(hand_over(guest.join(), &mut model, &args.common.state_dir));
        })?;
        let (_vm, commands) = stopped.context("the switch never came")??;
        println!(
            "migrated: {commands} guest commands during the migration, {} precopy rounds, \
             downtime {:?}, postcopy {:?}, {} pages requested by the destination",
            report.rounds.len(),
            report.downtime,
            report.postcopy,
            report.requests
        );
        Ok(())
    })
}

type GuestThread = std::thread::Result<(Vm, uffdkit_vmm::Result<Vec<uffdkit_vmm::RunReport>>)>;

/// At the switch: the stopped guest's state and the checksum its model expects go to
/// the destination. Returns the VM (its memory must outlive the migration) and the number
/// of commands the guest ran.
fn hand_over(
    joined: GuestThread,
    model: &mut GuestModel,
    dir: &Path,
) -> anyhow::Result<(Vm, usize)> {
    let (vm, reports) = joined.map_err(|_| anyhow::anyhow!("the vCPU thread panicked"))?;
    let reports = reports?;
    let ran = &reports[0].commands;
    ran.iter().for_each(|&c| model.apply(c));
    let pages = vm.config().data_pages();
    vm.state()?.save(dir)?;
    let expected = dir.join(EXPECTED_FILE);
    std::fs::write(&expected, format!("{:#x}\n", model.checksum(0, pages)))
        .with_context(|| format!("write {}", expected.display()))?;
    Ok((vm, ran.len()))
}

/// Listens, and at RUN resumes the guest on the arriving memory; checks its checksum.
pub fn into(args: InArgs) -> anyhow::Result<()> {
    let config = VmConfig::new(args.common.mib);
    let listen: Addr = args.listen.parse().context("--listen")?;
    let opts = DestOptions {
        mode: DeliveryMode::Thread,
        ..DestOptions::default()
    };
    let dest = Destination::bind(&listen, key(&args.common.key_file)?, opts)?;
    println!("listening on {}", dest.local_addr()?);
    std::io::stdout().flush()?;
    let dir = args.common.state_dir.clone();
    std::thread::scope(|scope| {
        let (resumed_tx, resumed_rx) = std::sync::mpsc::channel();
        let report = dest.run(|memory: RunningMemory| {
            let config = config.clone();
            let dir = dir.clone();
            let resumed = scope.spawn(move || resume(config, memory, &dir));
            // The receiver lives until after `run`: a send cannot fail.
            let _ = resumed_tx.send(resumed);
        })?;
        let resumed = resumed_rx.recv().context("RUN never came")?;
        let (got, want) = resumed
            .join()
            .map_err(|_| anyhow::anyhow!("the vCPU thread panicked"))??;
        println!(
            "destination: {} precopy pages, {} postcopy pages, {} requested by the guest's faults",
            report.precopy_pages, report.postcopy_pages, report.requested
        );
        if got != want {
            bail!("guest checksum {got:#x} after migration, the source's model says {want:#x}");
        }
        println!("guest checksum {got:#x} matches the source's model");
        drop(report); // the memory, after the VM that used it (joined above)
        Ok(())
    })
}

/// The guest at the destination: state from the source, a checksum of every page while
/// the pager may still be filling them.
fn resume(config: VmConfig, memory: RunningMemory, dir: &Path) -> anyhow::Result<(u32, u32)> {
    if memory.len != config.memory_len() {
        bail!(
            "{} bytes arrived for {} MiB of guest memory",
            memory.len,
            config.mib
        );
    }
    // SAFETY: the destination's memory stays mapped until its report (which owns it) is
    // dropped, after this thread is joined; only this guest and the pager write it.
    let mut vm = unsafe { Vm::over(config.clone(), memory.base) }?;
    vm.load_state(&VmState::load(dir)?)?;
    let expected = dir.join(EXPECTED_FILE);
    let text = std::fs::read_to_string(&expected)
        .with_context(|| format!("read {}", expected.display()))?;
    let want = u32::from_str_radix(text.trim().trim_start_matches("0x"), 16)
        .with_context(|| format!("{}: not a checksum", expected.display()))?;
    let pages = config.data_pages();
    let reports = vm.run(&[vec![Command::Checksum { first: 0, pages }]])?;
    Ok((reports[0].results[0], want))
}
