//! `uffdkit-vmm`: the minimal KVM VMM's command line, the tools package's second program;
//! the `vmm` library it runs on logs and prints nothing.
//!
//! - `uffdkit-vmm bench`: boot the tiny guest, fill its memory, snapshot it, then restore
//!   it eagerly and lazily (through the pager) several times each, checking the guest's
//!   checksum every time, and print medians of restore-to-first-instruction and the first
//!   full pass.
//! - `uffdkit-vmm migrate-in` / `migrate-out`: live post-copy migration of the running
//!   guest between two VMM processes, checked by the guest's checksum at the destination.
//! - `uffdkit-vmm probe`: what KVM on this host does with guest memory registered in
//!   SIGBUS mode (memory-fault exit, MMIO exit, emulation failure).

mod cli_migrate;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use pager::{DeliveryMode, MemoryKind, Prefetch};
use vmm::bench::{median, prepare, time_restore};
use vmm::{Command, Error, Lazy, Restore, Vm, VmConfig};

#[derive(Parser)]
#[command(about = "A minimal KVM VMM embedding the uffdkit pager")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Lazy against eager restore of a snapshot of the tiny guest.
    Bench(BenchArgs),
    /// Migrate a running guest to `migrate-in` (boots and fills it first).
    MigrateOut(cli_migrate::OutArgs),
    /// Receive a migrating guest, resume it at RUN and check its checksum.
    MigrateIn(cli_migrate::InArgs),
    /// What KVM does with guest memory registered in SIGBUS mode.
    Probe {
        /// Where to keep the snapshot (a fresh directory under /tmp by default).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    /// Restores of each kind (the median is printed; at least 1).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// 2 MiB hugetlb guest memory instead of anonymous 4 KiB pages.
    #[arg(long)]
    hugetlb: bool,
    /// Pin the vCPU threads to these CPUs (vCPU i to the i-th, round robin).
    #[arg(long, value_delimiter = ',')]
    vcpu_cpus: Vec<usize>,
    /// Pin the pager's handler thread to this CPU.
    #[arg(long)]
    handler_cpu: Option<usize>,
    /// Fault delivery: thread, poll (busy-polling handler), sigbus (resolved in the vCPU
    /// thread).
    #[arg(long, default_value = "thread")]
    mode: String,
    /// Sequential readahead in the pager (runs doubling up to 2 MiB).
    #[arg(long)]
    readahead: bool,
    /// Background prefetch: none, sequential.
    #[arg(long, default_value = "none")]
    prefetch: String,
    /// Where to keep the snapshot (a fresh directory under /tmp by default).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The snapshot's directory: `dir`, which must not exist yet (created 0700), or a fresh
/// one under the temporary directory with an unguessable name (`mkdtemp(3)`, 0700 —
/// never a pid-derived name another user could create first). The run removes it.
fn snapshot_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let Some(dir) = dir else {
        let template = std::env::temp_dir().join("uffdkit-vmm-XXXXXX");
        return nix::unistd::mkdtemp(&template)
            .with_context(|| format!("create a directory like {}", template.display()));
    };
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("create {} (it must not exist)", dir.display()))?;
    Ok(dir)
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let mode = match args.mode.as_str() {
        "thread" => DeliveryMode::Thread,
        "poll" => DeliveryMode::BusyPoll,
        "sigbus" => DeliveryMode::Sigbus,
        other => bail!("--mode {other}: thread, poll or sigbus"),
    };
    let config = VmConfig {
        mib: args.mib,
        kind: if args.hugetlb {
            MemoryKind::Hugetlb
        } else {
            MemoryKind::Anon
        },
        vcpus: args.vcpus,
        pin: args.vcpu_cpus.clone(),
    };
    let dir = snapshot_dir(args.dir)?;
    let model = prepare(
        &VmConfig {
            kind: MemoryKind::Anon,
            ..config.clone()
        },
        &dir,
    )
    .context("boot, fill and snapshot the guest")?;
    let prefetch = match args.prefetch.as_str() {
        "none" => Prefetch::None,
        "sequential" => Prefetch::Sequential,
        other => bail!("--prefetch {other}: none or sequential"),
    };
    let lazy = Restore::Lazy(Lazy {
        mode,
        handler_cpu: args.handler_cpu,
        readahead: args.readahead,
        prefetch: prefetch.clone(),
        in_thread: true,
    });
    println!(
        "{} MiB {} guest memory, {} vCPU(s) pinned to {:?}, handler ({}) on {:?}, readahead {}, prefetch {:?}; {} runs each",
        config.mib,
        config.kind.name(),
        config.vcpus,
        config.pin,
        mode.name(),
        args.handler_cpu,
        args.readahead,
        prefetch,
        args.runs
    );
    let mut rows = Vec::new();
    for (name, how) in [("eager", Restore::Eager), ("lazy", lazy)] {
        let mut first = Vec::new();
        let mut full = Vec::new();
        for _ in 0..args.runs {
            let t = time_restore(&dir, &config, &how, &model)
                .with_context(|| format!("{name} restore"))?;
            first.push(t.first_instruction);
            full.push(t.full_pass);
        }
        println!("{name:>5}: first instruction {first:?}");
        println!("{name:>5}: full pass         {full:?}");
        rows.push((name, median(first), median(full)));
    }
    for (name, first, full) in &rows {
        println!(
            "{name:>5} median: first instruction {:.3} ms, first full pass {:.3} ms (checksums match)",
            first.as_secs_f64() * 1e3,
            full.as_secs_f64() * 1e3
        );
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(())
}

fn probe(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let kvm = kvm_ioctls::Kvm::new().context("open /dev/kvm")?;
    let info = kvm.check_extension_raw(kvm_bindings::KVM_CAP_MEMORY_FAULT_INFO.into());
    println!("KVM_CAP_MEMORY_FAULT_INFO: {info}");
    let config = VmConfig::new(4);
    let dir = snapshot_dir(dir)?;
    let model = prepare(&config, &dir)?;
    let sigbus = Restore::Lazy(Lazy {
        mode: DeliveryMode::Sigbus,
        in_thread: false,
        ..Lazy::DEMAND
    });
    let pages = config.data_pages();
    let checksum = vec![vec![Command::Checksum { first: 0, pages }]];
    let report = |what: &str, outcome: Result<Vec<vmm::RunReport>, Error>| match outcome {
        Ok(r) if r[0].results == [model.checksum(0, pages)] => {
            println!("{what}: served, checksum matches")
        }
        Ok(r) => println!("{what}: WRONG checksum {:x?}", r[0].results),
        Err(e) => println!("{what}: {e}"),
    };
    let mut vm = Vm::restore(&dir, config.clone(), sigbus.clone())?;
    report("SIGBUS mode, instruction fetch", vm.run(&checksum));
    drop(vm);
    let mut vm = Vm::restore(&dir, config.clone(), sigbus.clone())?;
    // SAFETY: guest memory is mapped and no vCPU runs; the read faults and the pager's
    // SIGBUS handler places the code page in this thread.
    unsafe { std::ptr::read_volatile(vm.memory().as_ptr().add(vmm::guest::CODE_GPA as usize)) };
    report("SIGBUS mode, data read", vm.run(&checksum));
    drop(vm);
    let mut vm = Vm::restore(&dir, config.clone(), Restore::LAZY)?;
    report("handler thread", vm.run(&checksum));
    drop(vm);
    let in_thread = Restore::Lazy(Lazy {
        mode: DeliveryMode::Sigbus,
        ..Lazy::DEMAND
    });
    let mut vm = Vm::restore(&dir, config.clone(), in_thread)?;
    let outcome = vm.run(&checksum);
    if let Ok(r) = &outcome {
        println!(
            "SIGBUS mode, resolved in the vCPU thread: {} exits",
            r[0].resolved_in_thread
        );
    }
    report("SIGBUS mode, resolved in the vCPU thread", outcome);
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Bench(args) => bench(args),
        Cmd::Probe { dir } => probe(dir),
        Cmd::MigrateOut(args) => cli_migrate::out(args),
        Cmd::MigrateIn(args) => cli_migrate::into(args),
    }
}
