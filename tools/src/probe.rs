//! `uffdkit probe`: the kernel's userfaultfd features, per-kind ioctls, and the system
//! settings that decide what a pager can do here.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use uffd_core::{hugetlb, probe, PathProbe, Probe};

/// Options of `uffdkit probe`.
#[derive(clap::Args, Default)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// System settings around userfaultfd.
struct System {
    kernel: String,
    unprivileged_userfaultfd: Option<u32>,
    huge_reserved: Option<usize>,
    huge_free: Option<usize>,
    thp: Option<String>,
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn system() -> System {
    let thp = read_trimmed("/sys/kernel/mm/transparent_hugepage/enabled").and_then(|s| {
        s.split_whitespace()
            .find(|w| w.starts_with('['))
            .map(|w| w.trim_matches(['[', ']']).to_string())
    });
    System {
        kernel: read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into()),
        unprivileged_userfaultfd: read_trimmed("/proc/sys/vm/unprivileged_userfaultfd")
            .and_then(|s| s.parse().ok()),
        huge_reserved: hugetlb::reserved().ok(),
        huge_free: hugetlb::free().ok(),
        thp,
    }
}

fn path_json(p: &PathProbe) -> Value {
    json!({
        "works": p.works,
        "kernel_faults": p.kernel_faults,
        "error": p.error.map(|e| e.to_string()),
    })
}

fn to_json(probe: &Probe, sys: &System) -> Value {
    let kinds: serde_json::Map<String, Value> = probe
        .kinds
        .iter()
        .map(|k| {
            let modes: serde_json::Map<String, Value> = k
                .modes
                .iter()
                .map(|m| {
                    let v = match m.result {
                        Ok(ioctls) => json!({ "ok": true, "ioctls": ioctls.names() }),
                        Err(e) => json!({ "ok": false, "error": e.to_string() }),
                    };
                    (m.mode.label(), v)
                })
                .collect();
            (
                k.kind.name().to_string(),
                json!({ "unavailable": k.unavailable, "modes": modes }),
            )
        })
        .collect();
    json!({
        "kernel": sys.kernel,
        "features": probe.features.names(),
        "api_ioctls": probe.api_ioctls.names(),
        "open": { "device": path_json(&probe.device), "syscall": path_json(&probe.syscall) },
        "kernel_faults": probe.device.kernel_faults || probe.syscall.kernel_faults,
        "unprivileged_userfaultfd": sys.unprivileged_userfaultfd,
        "hugepages_2m": { "reserved": sys.huge_reserved, "free": sys.huge_free },
        "thp": sys.thp,
        "kinds": kinds,
    })
}

fn path_line(name: &str, p: &PathProbe) -> String {
    match (p.works, p.kernel_faults) {
        (true, true) => format!("{name:<20} yes, kernel-mode faults"),
        (true, false) => format!("{name:<20} yes, user-mode faults only"),
        (false, _) => format!(
            "{name:<20} no ({})",
            p.error.map_or("unknown".into(), |e| e.to_string())
        ),
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or("unknown".into(), |v| v.to_string())
}

fn print_table(probe: &Probe, sys: &System) {
    println!("kernel               {}", sys.kernel);
    println!("{}", path_line("/dev/userfaultfd", &probe.device));
    println!("{}", path_line("userfaultfd(2)", &probe.syscall));
    println!("unprivileged_uffd    {}", opt(sys.unprivileged_userfaultfd));
    println!(
        "hugepages (2 MiB)    {} reserved, {} free",
        opt(sys.huge_reserved),
        opt(sys.huge_free)
    );
    println!("THP                  {}", opt(sys.thp.clone()));
    println!(
        "api ioctls           {}",
        probe.api_ioctls.names().join(" ")
    );
    println!("features:");
    for name in probe.features.names() {
        println!("  {name}");
    }
    for kind in &probe.kinds {
        println!("register on {}:", kind.kind.name());
        if let Some(why) = &kind.unavailable {
            println!("  unavailable: {why}");
            continue;
        }
        for m in &kind.modes {
            let result = match m.result {
                Ok(ioctls) => ioctls.names().join(" "),
                Err(e) => format!("refused ({e})"),
            };
            println!("  {:<18} {result}", m.mode.label());
        }
    }
}

/// Runs `uffdkit probe`.
pub fn run(args: &Args) -> Result<()> {
    let probe = probe().context("probing userfaultfd")?;
    let sys = system();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&probe, &sys))?);
    } else {
        print_table(&probe, &sys);
    }
    Ok(())
}
