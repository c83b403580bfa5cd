//! `uffdkit-vmm migrate-out` / `migrate-in`: live post-copy migration of the running guest
//! between two VMM processes over postcopy's protocol (TCP or a Unix socket, PSK).
//!
//! The vCPU state travels at the switch as postcopy's device state (RUN carries it), with
//! the source's model of guest memory beside it (a [`Handover`]), so that the destination
//! can check the guest's own checksum. The destination creates its VM first and hands its
//! guest memory — KVM's memory slot — to the migration destination, whose pager registers
//! and fills it. At RUN the guest resumes and goes on rewriting its memory while postcopy
//! brings the rest, until the migration is verified; then it checksums every page.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pager::DeliveryMode;
use postcopy::migrate::{DestOptions, Destination, Migration, SourceOptions};
use serde::{Deserialize, Serialize};
use transport::{Addr, Key};
use vmm::{Command, GuestModel, Vm, VmConfig, VmState};

/// What the source hands over at the switch, as postcopy's device state.
#[derive(Serialize, Deserialize)]
struct Handover {
    /// The vCPUs' registers.
    vm: VmState,
    /// What guest memory holds, by the source's count (the destination's check).
    model: GuestModel,
}

/// Shared arguments.
#[derive(clap::Args)]
pub struct Common {
    /// Guest memory in MiB (the same on both sides).
    #[arg(long, default_value_t = 16)]
    mib: usize,
    /// The pre-shared key file (trusted links only).
    #[arg(long)]
    key_file: PathBuf,
}

/// `migrate-out` arguments.
#[derive(clap::Args)]
pub struct OutArgs {
    #[command(flatten)]
    common: Common,
    /// The destination's address (host:port or unix:PATH).
    #[arg(long)]
    to: String,
    /// Commands the guest runs before the migration starts (it goes on through precopy,
    /// until the switch stops it).
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

/// The guest's work: 64-page runs at moving places in the first `span` data pages, each
/// with a seed of its own (`base` + n).
fn rewrite(span: u32, base: u32, n: u64) -> Command {
    Command::Fill {
        first: (n as u32).wrapping_mul(61) % (span - 64),
        pages: 64,
        seed: base.wrapping_add(n as u32),
        stride: 1,
    }
}

fn key(path: &Path) -> anyhow::Result<Key> {
    // Refuses a key others can read (the source writes it 0600).
    Key::from_file(path, false).with_context(|| format!("key file {}", path.display()))
}

/// Boots a guest, fills it, and migrates it while it rewrites the first half of its memory.
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
        rewrite(pages / 2, 0x2222_0000, n)
    };
    let key = key(&args.common.key_file)?;
    std::thread::scope(|scope| {
        let (stop, next) = (&stop, &next);
        // However this closure returns (an error before the switch included), the guest
        // stops: the scope joins its thread, which would otherwise run forever.
        let _guest_stops = StopOnDrop(stop);
        let guest = scope.spawn(move || {
            let reports = vm.run_until(stop, next);
            (vm, reports)
        });
        // Before the migration, not in the stop callback: that wait would count as
        // downtime (the switch's clock starts as the callback is called).
        let deadline = Instant::now() + Duration::from_secs(60);
        while issued.load(Ordering::Acquire) < args.min_commands && !guest.is_finished() {
            if Instant::now() > deadline {
                stop.store(true, Ordering::Release); // the scope joins the guest
                bail!(
                    "the guest ran {} commands in 60 s",
                    issued.load(Ordering::Acquire)
                );
            }
            std::thread::yield_now();
        }
        // SAFETY: guest memory is the VM's private anonymous mapping; the VM comes back
        // from its thread in the stop callback and is kept in `stopped` until this scope
        // ends, after `run_with_state` returned; only its guest writes the memory, and the
        // callback returns once the vCPU has halted.
        let migration = unsafe { Migration::new(to, key, base, len, SourceOptions::default()) }?;
        let mut stopped = None;
        let report = migration.run_with_state(|| -> anyhow::Result<Vec<u8>> {
            stop.store(true, Ordering::Release);
            let (vm, reports) = guest
                .join()
                .map_err(|_| anyhow::anyhow!("the vCPU thread panicked"))?;
            // Kept before anything can fail: its memory must outlive the migration.
            let (vm, ran) = stopped.insert((vm, 0));
            let reports = reports?;
            reports[0].commands.iter().for_each(|&c| model.apply(c));
            *ran = reports[0].commands.len();
            let handover = Handover {
                vm: vm.state()?,
                model: model.clone(),
            };
            Ok(serde_json::to_vec(&handover)?)
        })?;
        let (_vm, commands) = stopped.context("the switch never came")?;
        println!(
            "migrated: {commands} guest commands before the switch, {} precopy rounds, \
             downtime {:?}, postcopy {:?}, {} pages requested by the destination",
            report.rounds.len(),
            report.downtime,
            report.postcopy,
            report.requests
        );
        Ok(())
    })
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        // Release: pairs with the guest loop's Acquire of the flag.
        self.0.store(true, Ordering::Release);
    }
}

/// What the guest did at the destination.
struct Resumed {
    /// RUN → the guest's first exit to the VMM.
    first_instruction: Duration,
    /// Commands it ran until the migration was verified.
    commands: usize,
    /// Its checksum of every page, and what the source's model with its own commands
    /// says it must be.
    checksum: (u32, u32),
}

/// Listens, resumes the guest at RUN on its own memory, which the migration fills while
/// it runs; checks its checksum once verified.
pub fn into(args: InArgs) -> anyhow::Result<()> {
    let config = VmConfig::new(args.common.mib);
    let vm = Vm::create(config)?;
    let listen: Addr = args.listen.parse().context("--listen")?;
    let opts = DestOptions {
        mode: DeliveryMode::Thread,
        ..DestOptions::default()
    };
    let dest = Destination::bind(&listen, key(&args.common.key_file)?, opts)?
        .with_memory(vm.memory().clone());
    println!("listening on {}", dest.local_addr()?);
    std::io::stdout().flush()?;
    let verified = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let verified = &verified;
        let (resumed_tx, resumed_rx) = mpsc::channel();
        let report = dest.run_with_state(move |_memory, state| -> anyhow::Result<()> {
            let handover: Handover =
                serde_json::from_slice(&state).context("the source's device state")?;
            vm.load_state(&handover.vm)?;
            let at = Instant::now();
            let guest = scope.spawn(move || resume(vm, handover.model, verified, at));
            // The receiver lives until after `run_with_state`: a send cannot fail.
            let _ = resumed_tx.send(guest);
            Ok(())
        });
        // Release: pairs with the guest loop's Acquire; the guest stops rewriting.
        verified.store(true, Ordering::Release);
        let report = report?;
        let resumed = resumed_rx.recv().context("RUN never came")?;
        let resumed = resumed
            .join()
            .map_err(|_| anyhow::anyhow!("the vCPU thread panicked"))??;
        println!(
            "destination: {} precopy pages, {} postcopy pages, {} requested by the guest's \
             faults; the guest ran {} commands until verified, its first instruction {:?} \
             after RUN",
            report.precopy_pages,
            report.postcopy_pages,
            report.requested,
            resumed.commands,
            resumed.first_instruction
        );
        let (got, want) = resumed.checksum;
        if got != want {
            bail!("guest checksum {got:#x} after migration, the model says {want:#x}");
        }
        println!("guest checksum {got:#x} matches the source's model");
        Ok(())
    })
}

/// The guest at the destination: rewrites the whole of its memory (faulting on pages
/// still at the source) until the migration is verified, then checksums every page.
fn resume(
    mut vm: Vm,
    mut model: GuestModel,
    verified: &AtomicBool,
    at: Instant,
) -> anyhow::Result<Resumed> {
    let pages = vm.config().data_pages();
    let reports = vm.run_until(verified, &|_, n| rewrite(pages, 0x4444_0000, n))?;
    let first_instruction = reports[0].first_exit.saturating_duration_since(at);
    let ran = &reports[0].commands;
    ran.iter().for_each(|&c| model.apply(c));
    let all = Command::Checksum { first: 0, pages };
    let reports = vm.run(&[vec![all]])?;
    Ok(Resumed {
        first_instruction,
        commands: ran.len(),
        checksum: (reports[0].results[0], model.checksum(0, pages)),
    })
}
