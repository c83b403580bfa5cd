//! Time from a silent freeze to a resumed stream: in-process pure-postcopy migrations
//! (loopback TCP through testkit's proxy) whose every connection is frozen — both ends
//! established, nothing flowing, as in a partition — once 16 MiB of pages went through.
//! The flow resumes when one end's silence deadline has passed, it cut the pair, and the
//! source reconnected and the stream restarted: the figure should sit just under the
//! deadline (the source's readers last heard a heartbeat up to one interval before the
//! freeze) plus a reconnection. Reports the median of the runs beside the deadline.
//!
//! `cargo bench -p uffdkit-benches --bench recovery` (UFFDKIT_RUNS, UFFDKIT_SILENCE_MS).

use std::sync::Arc;
use std::time::Duration;

use pager::DeliveryMode;
use postcopy::migrate::{DestOptions, Destination, Migration, SourceOptions, Timing};
use postcopy::wire::Channel;
use testkit::proxy::{Cut, CutMode, Direction, Proxy, ProxyOptions, Target};
use transport::Addr;
use transport::Key;
use uffd_core::{Mapping, MemoryKind};

fn channel_of(first: &[u8]) -> Option<&'static str> {
    postcopy::wire::peek_channel(first).map(|c| c.map_or("other", Channel::name))
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One migration with one freeze; returns freeze → resumed flow.
fn one(timing: Timing) -> Duration {
    let key = Key::new(*b"recovery-bench-key-0123").expect("key");
    let opts = DestOptions {
        mode: DeliveryMode::PerCpu,
        timing,
        ..DestOptions::default()
    };
    let dest =
        Destination::bind(&"127.0.0.1:0".parse().expect("addr"), key.clone(), opts).expect("bind");
    let Addr::Tcp(to) = dest.local_addr().expect("addr") else {
        unreachable!("TCP")
    };
    let proxy = Arc::new(
        Proxy::start(
            to,
            ProxyOptions {
                classify: channel_of,
                counted: "main",
                direction: Direction::ToListener,
                settle: 4096,
            },
        )
        .expect("proxy"),
    );
    proxy.plan(vec![Cut {
        mode: CutMode::Freeze,
        target: Target::All,
        after: 16 << 20,
    }]);
    let dest_t = std::thread::spawn(move || dest.run(|_| {}));
    let bytes = 128 << 20;
    let memory = Mapping::new(MemoryKind::Anon, bytes).expect("map");
    for p in 0..bytes / 4096 {
        // SAFETY: our fresh mapping.
        unsafe { std::ptr::write_bytes(memory.as_ptr().add(p * 4096), (p % 251) as u8 + 1, 4096) };
    }
    let opts = SourceOptions {
        max_rounds: 0,
        timing,
        ..SourceOptions::default()
    };
    // SAFETY: our mapping, mapped until `run` returns; nothing writes it.
    let m = unsafe { Migration::new(Addr::Tcp(proxy.addr()), key, memory.addr(), bytes, opts) }
        .expect("migration");
    let report = m.run(|| {}).expect("source");
    dest_t.join().expect("dest thread").expect("destination");
    assert_eq!(report.verified, report.pages);
    assert_eq!(report.reconnects, 1, "one freeze, one resume");
    proxy.resumed_after().expect("the flow resumed")
}

fn main() {
    let runs = env("UFFDKIT_RUNS", 5).max(1) as usize;
    let silence = Duration::from_millis(env("UFFDKIT_SILENCE_MS", 3000));
    let timing = Timing {
        silence,
        heartbeat: silence / 6,
        ..Timing::default()
    };
    let mut took: Vec<Duration> = (0..runs).map(|_| one(timing)).collect();
    took.sort();
    let median = took[runs / 2];
    println!(
        "freeze -> resumed flow over {runs} runs: median {:.0} ms ({:.2}x the {:.0} ms silence deadline), min {:.0} ms, max {:.0} ms; heartbeat every {:.0} ms",
        median.as_secs_f64() * 1e3,
        median.as_secs_f64() / silence.as_secs_f64(),
        silence.as_secs_f64() * 1e3,
        took[0].as_secs_f64() * 1e3,
        took[runs - 1].as_secs_f64() * 1e3,
        timing.heartbeat.as_secs_f64() * 1e3,
    );
}
