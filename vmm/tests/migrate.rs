//! Live post-copy migration of a running guest: precopy rounds with the source's
//! write-protect dirty tracking while the vCPU keeps rewriting guest memory (through KVM),
//! the switch carrying the vCPU state in RUN, then the guest continuing at the destination
//! on its VM's own memory, which the destination's pager fills from the source while the
//! guest writes on. The guest's checksums at the destination must equal the model of every
//! command it ran, at the source and then at the destination: a write KVM made that dirty
//! tracking missed would leave a stale page there. And the migration's verdict must hold
//! although the guest wrote before it came (it is of what was placed, not of memory now).
//!
//! The two VMs live in one process here (two KVM VMs, two guest memories, a TCP
//! connection between them).

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{kvm_available, run_checked};
use pager::DeliveryMode;
use postcopy::migrate::{DestOptions, Destination, Migration, SourceOptions};
use transport::Key;
use vmm::{Command, GuestModel, Vm, VmConfig, VmState};

/// Commands the source guest runs at least before the switch stops it.
const WRITES_BEFORE_SWITCH: u64 = 200;

/// The data pages the source guest rewrites while the migration runs (of 4 080).
const DIRTIED_PAGES: u32 = 2000;

fn key() -> Key {
    Key::new(*b"uffdkit-vmm-migrate-key-0").expect("key")
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn postcopy_migration_of_a_running_guest_matches_checksum() {
    let test = "postcopy_migration_of_a_running_guest_matches_checksum";
    if !kvm_available(test) {
        return;
    }
    let config = VmConfig::new(16);
    let pages = config.data_pages();
    assert!(DIRTIED_PAGES <= pages / 2);
    let mut model = GuestModel::new(pages);
    let mut source = Vm::boot(config.clone()).expect("boot");
    let fill = Command::Fill {
        first: 0,
        pages,
        seed: 0x1111_0000,
        stride: 1,
    };
    run_checked(&mut source, &mut model, &[vec![fill]]);

    // The destination's VM first: its guest memory is what the migration fills.
    let target = Vm::create(config.clone()).expect("the destination's VM");
    let target_memory = target.memory().clone();
    let opts = DestOptions {
        mode: DeliveryMode::Thread,
        ..DestOptions::default()
    };
    let dest = Destination::bind(&"127.0.0.1:0".parse().expect("addr"), key(), opts)
        .expect("bind the destination")
        .with_memory(target_memory.clone());
    let addr = dest.local_addr().expect("its address");
    let stop = AtomicBool::new(false);
    // The guest rewrites 64-page runs at moving places in the first half of its data
    // pages, each with a new seed, until stopped.
    let issued = AtomicU64::new(0);
    let rewrite = |_vcpu: usize, n: u64| {
        // Release: pairs with the Acquire below; only the count matters.
        issued.fetch_add(1, Ordering::Release);
        Command::Fill {
            first: (n as u32 * 61) % (DIRTIED_PAGES - 64),
            pages: 64,
            seed: 0x2222_0000 + n as u32,
            stride: 1,
        }
    };
    // Written once the source guest stopped, after every page was last sent: 64 pages
    // the destination must get in postcopy (discarded there, then requested).
    let last_write = Command::Fill {
        first: 1000,
        pages: 64,
        seed: 0x5555_0000,
        stride: 1,
    };

    std::thread::scope(|scope| {
        let checksum = Command::Checksum { first: 0, pages };
        // At the destination the guest writes first — over the whole of memory, faulting
        // on pages still at the source — then reads every page; and after the verdict it
        // writes and reads again.
        let during = vec![
            Command::Fill {
                first: 5,
                pages: pages / 7,
                seed: 0x3333_0000,
                stride: 7,
            },
            checksum,
        ];
        let after = vec![
            Command::Fill {
                first: 2,
                pages: pages / 3,
                seed: 0x4444_0000,
                stride: 3,
            },
            checksum,
        ];
        let dest_programs = [during.clone(), after.clone()];
        let (resumed_tx, resumed_rx) = mpsc::channel();
        let (verified_tx, verified_rx) = mpsc::channel::<()>();
        // At RUN the guest gets its vCPU state from RUN's device state and resumes at
        // once, on memory the pager is still filling (faults in KVM_RUN become requests).
        let destination = scope.spawn(move || {
            dest.run_with_state(move |_memory, state| -> vmm::Result<()> {
                let mut vm = target;
                vm.load_state(&VmState::from_bytes(&state)?)?;
                let resumed = scope.spawn(move || {
                    let during = vm.run(&[during])?;
                    verified_rx.recv().expect("the migration verified");
                    let after = vm.run(&[after])?;
                    Ok::<_, vmm::Error>([during, after])
                });
                resumed_tx.send(resumed).expect("hand over the guest");
                Ok(())
            })
        });
        let (base, len) = (source.memory().addr(), source.memory().len());
        let stop = &stop;
        let rewrite = &rewrite;
        let guest = scope.spawn(move || {
            let reports = source.run_until(stop, rewrite);
            (source, reports)
        });
        // Without the background stream, postcopy moves only what the destination asks
        // for and ends once it has asked for every page it needs: the destination guest's
        // writes come before the digests, whatever the timing.
        let opts = SourceOptions {
            max_rounds: 4,
            background: false,
            ..SourceOptions::default()
        };
        // SAFETY: guest memory is the source VM's private anonymous mapping, kept mapped
        // until after `run_with_state` returns (the VM comes back from its thread inside
        // the stop callback and lives on below); only its guest writes it, and the
        // callback stops the guest and returns once its vCPU has halted.
        let migration =
            unsafe { Migration::new(addr, key(), base, len, opts) }.expect("a migration");
        let mut stopped = None;
        let report = migration.run_with_state(|| {
            // The guest must have run during the migration: wait (bounded) for
            // WRITES_BEFORE_SWITCH commands, issued since before the first round.
            let deadline = Instant::now() + Duration::from_secs(60);
            while issued.load(Ordering::Acquire) < WRITES_BEFORE_SWITCH {
                assert!(Instant::now() < deadline, "the source guest stalled");
                std::thread::yield_now();
            }
            stop.store(true, Ordering::Release);
            let (mut vm, reports) = guest.join().expect("the source vCPU thread");
            let reports = reports.expect("the guest ran at the source");
            vm.run(&[vec![last_write]]).expect("the last write");
            let state = vm.state().expect("the vCPU state").to_bytes();
            stopped = Some((vm, reports));
            state
        });
        let (_source_vm, reports) = stopped.expect("the switch stopped the guest");
        let ran = &reports[0].commands;
        ran.iter().for_each(|&command| model.apply(command));
        model.apply(last_write);
        assert!(ran.len() as u64 >= WRITES_BEFORE_SWITCH);
        let report = match report {
            Ok(report) => report,
            Err(e) => panic!("the migration: {e}"),
        };
        assert_eq!(
            report.verified, report.pages,
            "every page verified, the guest writing since RUN"
        );
        verified_tx
            .send(())
            .expect("let the destination guest write on");
        let resumed = resumed_rx.recv().expect("RUN at the destination");
        let dest_reports = resumed
            .join()
            .expect("the destination vCPU thread")
            .expect("the guest ran at the destination");
        let dest_report = destination
            .join()
            .expect("the destination thread")
            .expect("the destination");
        eprintln!(
            "source: {} commands during the migration, {report:?}",
            ran.len()
        );
        // The guest only writes the first half of its data pages (and nothing else): a
        // dirty set beyond it would mean the tracking took KVM's reads for writes.
        let writable = u64::from(DIRTIED_PAGES) + 1; // + the page a run may straddle into
        for round in &report.rounds[1..] {
            assert!(round.pages <= writable, "{round:?}");
        }
        assert!(
            report.rounds.iter().all(|r| r.dirty_after <= writable),
            "{report:?}"
        );
        assert!(
            report.needed_at_switch >= 64 && report.urgent_pages >= 64,
            "the last write's pages came in postcopy, on request: {report:?}"
        );
        assert!(
            Arc::ptr_eq(&dest_report.memory, &target_memory),
            "the destination served the VM's own memory"
        );

        for (program, reports) in dest_programs.iter().zip(&dest_reports) {
            for (&command, &result) in program.iter().zip(&reports[0].results) {
                model.apply(command);
                if let Command::Checksum { first, pages } = command {
                    assert_eq!(result, model.checksum(first, pages), "after {command:?}");
                }
            }
        }
        eprintln!(
            "destination: {} precopy pages, {} postcopy pages, {} requested, pager {:?}",
            dest_report.precopy_pages,
            dest_report.postcopy_pages,
            dest_report.requested,
            dest_report.pager
        );
    });
}
