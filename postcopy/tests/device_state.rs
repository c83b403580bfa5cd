//! What a VMM embedding a migration needs of it: the device state carried at the switch
//! (in RUN) and handed over before the workload resumes, the destination serving the
//! embedder's own memory, and a verdict that holds while the resumed workload writes.
//! Breaks at the switch, with the state in flight: `explore.rs`.

use crate::common;

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{key, source_memory, test_timing};
use pager::DeliveryMode;
use postcopy::migrate::{DestOptions, Destination, Migration, SourceOptions};
use postcopy::{Error, Refusal};
use uffd_core::{Mapping, MemoryKind};

const PS: usize = 4096;

fn destination() -> Destination {
    let opts = DestOptions {
        mode: DeliveryMode::Thread,
        timing: test_timing(),
        ..DestOptions::default()
    };
    Destination::bind(&"127.0.0.1:0".parse().unwrap(), key(), opts).expect("bind")
}

fn source_opts(max_rounds: u32) -> SourceOptions {
    SourceOptions {
        max_rounds,
        timing: test_timing(),
        ..SourceOptions::default()
    }
}

/// 100 000 bytes no page holds.
fn device_state() -> Vec<u8> {
    (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// The word a destination workload writes at offset 8 of page `p`.
fn mark(p: usize) -> u64 {
    0xd00d_0000_0000 | p as u64
}

#[test]
fn device_state_arrives_before_the_workload_resumes_on_the_embedders_memory_and_writes_do_not_fail_the_verdict(
) {
    let bytes = 8 << 20;
    let pages = bytes / PS;
    let embedders = Arc::new(Mapping::new(MemoryKind::Anon, bytes).expect("map"));
    let dest = destination().with_memory(embedders.clone());
    let addr = dest.local_addr().expect("addr");
    let (state_tx, state_rx) = mpsc::channel();
    let (workload_tx, workload_rx) = mpsc::channel();
    let dest_t = std::thread::spawn(move || {
        dest.run_with_state(move |memory, state| {
            // The state comes before the workload: it is what the workload resumes from.
            state_tx.send(state).expect("hand over the state");
            // Writes every page at once, in order (each a fault while postcopy runs):
            // with no background stream, the migration ends only once the last page was
            // asked for, after every earlier page was written.
            let writer = std::thread::spawn(move || {
                for p in 0..memory.len / PS {
                    // SAFETY: the embedder's mapping, alive for the whole test.
                    unsafe { ((memory.base + p * PS + 8) as *mut u64).write_volatile(mark(p)) };
                }
            });
            workload_tx.send(writer).expect("hand over the workload");
            Ok::<(), std::convert::Infallible>(())
        })
    });
    let memory = source_memory(bytes);
    let opts = SourceOptions {
        background: false,
        ..source_opts(0)
    };
    // SAFETY: our mapping, alive until the end; nothing writes it.
    let migration =
        unsafe { Migration::new(addr, key(), memory.addr(), bytes, opts) }.expect("a migration");
    let src = migration
        .run_with_state(|| Ok::<_, std::convert::Infallible>(device_state()))
        .expect("the migration verified");
    workload_rx
        .recv()
        .expect("RUN came")
        .join()
        .expect("the workload");
    let dst = dest_t
        .join()
        .expect("dest thread")
        .expect("the destination");
    assert_eq!(state_rx.recv().expect("the state"), device_state());
    assert!(state_rx.try_recv().is_err(), "handed over once");
    assert_eq!(src.verified, src.pages, "{src:?}");
    assert!(src.requests > 0, "{src:?}");
    assert!(
        Arc::ptr_eq(&dst.memory, &embedders),
        "the embedder's memory"
    );
    for p in 0..pages {
        // SAFETY: both mappings alive; nothing writes them any more.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts((memory.addr() + p * PS) as *const u8, PS),
                std::slice::from_raw_parts((embedders.addr() + p * PS) as *const u8, PS),
            )
        };
        assert_eq!(
            b[8..16],
            mark(p).to_ne_bytes(),
            "page {p}: the workload's write"
        );
        assert!(
            a[..8] == b[..8] && a[16..] == b[16..],
            "page {p}: the rest is the source's"
        );
    }
}

#[test]
fn a_destination_that_cannot_take_the_device_state_fails_both_sides_before_run_completes() {
    let dest = destination();
    let addr = dest.local_addr().expect("addr");
    let dest_t = std::thread::spawn(move || {
        dest.run_with_state(|_memory, state| {
            Err(format!(
                "{} bytes of a state this VMM does not know",
                state.len()
            ))
        })
    });
    let memory = source_memory(4 << 20);
    // SAFETY: our mapping, alive until the end; nothing writes it.
    let migration =
        unsafe { Migration::new(addr, key(), memory.addr(), memory.len(), source_opts(1)) }
            .expect("a migration");
    let began = Instant::now();
    let src = migration.run_with_state(|| Ok::<_, std::convert::Infallible>(vec![7; 64]));
    let dst = dest_t.join().expect("dest thread");
    assert!(
        matches!(&dst, Err(Error::DeviceState { .. })),
        "destination: {dst:?}"
    );
    match src {
        Err(Error::Refused {
            reason: Refusal::PeerShut { detail, .. },
        }) => assert!(detail.contains("64 bytes of a state"), "{detail}"),
        other => panic!("source: {other:?}"),
    }
    // Told at once, not at the bound (30 s).
    assert!(began.elapsed() < Duration::from_secs(20));
}

#[test]
fn a_source_that_cannot_give_its_device_state_fails_both_sides_before_run() {
    let dest = destination();
    let addr = dest.local_addr().expect("addr");
    let dest_t = std::thread::spawn(move || {
        dest.run_with_state(|_memory, _state| -> Result<(), String> { panic!("RUN must not come") })
    });
    let memory = source_memory(4 << 20);
    // SAFETY: our mapping, alive until the end; nothing writes it.
    let migration =
        unsafe { Migration::new(addr, key(), memory.addr(), memory.len(), source_opts(1)) }
            .expect("a migration");
    let src = migration.run_with_state(|| Err::<Vec<u8>, _>("the vCPU would not stop"));
    assert!(
        matches!(&src, Err(Error::DeviceState { .. })),
        "source: {src:?}"
    );
    let dst = dest_t.join().expect("dest thread");
    assert!(
        matches!(
            &dst,
            Err(Error::Refused {
                reason: Refusal::PeerShut { .. }
            })
        ),
        "destination: {dst:?}"
    );
}

#[test]
fn an_embedders_memory_of_another_size_is_refused_before_anything_lands() {
    let embedders = Arc::new(Mapping::new(MemoryKind::Anon, 2 << 20).expect("map"));
    let dest = destination().with_memory(embedders);
    let addr = dest.local_addr().expect("addr");
    let dest_t = std::thread::spawn(move || dest.run(|_| panic!("RUN must not come")));
    let memory = source_memory(4 << 20);
    // SAFETY: our mapping, alive until the end; nothing writes it.
    let migration =
        unsafe { Migration::new(addr, key(), memory.addr(), memory.len(), source_opts(1)) }
            .expect("a migration");
    let src = migration.run(|| {});
    let dst = dest_t.join().expect("dest thread");
    assert!(
        matches!(
            &dst,
            Err(Error::Refused {
                reason: Refusal::Geometry(_)
            })
        ),
        "destination: {dst:?}"
    );
    assert!(
        matches!(
            &src,
            Err(Error::Refused {
                reason: Refusal::PeerShut { .. }
            })
        ),
        "source: {src:?}"
    );
}
