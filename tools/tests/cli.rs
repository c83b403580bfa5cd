//! The `uffdkit` binary end to end: `probe --json` and `demo`. (`fc-handler`: see
//! `fc_handler.rs`; `migrate` and `serve`: `migrate.rs`.)

use std::process::Command;

/// The stdout of a run that must have succeeded (else fails showing both streams).
fn success_text(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The stdout of a run that must have succeeded, parsed as JSON.
fn success_json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&success_text(out)).expect("valid JSON")
}

fn uffdkit(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_uffdkit"))
        .args(args)
        .output()
        .expect("run uffdkit")
}

#[test]
fn probe_json_names_features_as_kernel_constants() {
    let out = uffdkit(&["probe", "--json"]);
    let v = success_json(&out);
    let features: Vec<&str> = v["features"]
        .as_array()
        .expect("features array")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    for f in ["MOVE", "POISON", "WP_ASYNC", "MINOR_SHMEM"] {
        assert!(features.contains(&f), "{f} missing: {features:?}");
    }
    assert_eq!(v["open"]["device"]["works"], true);
    assert_eq!(v["kinds"]["anon"]["modes"]["MINOR"]["ok"], false);
    let anon_missing = &v["kinds"]["anon"]["modes"]["MISSING"]["ioctls"];
    assert!(anon_missing
        .as_array()
        .expect("ioctls")
        .contains(&"COPY".into()));
    assert!(v["thp"].is_string());
    assert!(v["hugepages_2m"]["free"].is_number());
}

#[test]
fn probe_table_is_readable() {
    let out = uffdkit(&["probe"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf8");
    assert!(text.contains("/dev/userfaultfd"), "{text}");
    assert!(text.contains("register on shmem:"), "{text}");
}

#[test]
fn demo_restores_lazily_and_verifies_every_page() {
    let out = uffdkit(&["demo", "--size-mib", "16"]);
    let text = success_text(&out);
    assert!(text.contains("all 4096 pages"), "{text}");
    assert!(text.contains("every page verified"), "{text}");
    assert!(text.contains("zero pages (never transferred)"), "{text}");
    assert!(text.contains("latency histogram"), "{text}");
}

#[test]
fn bench_json_reports_percentiles_and_ratios_for_each_mode() {
    let out = uffdkit(&[
        "bench",
        "--pages",
        "300",
        "--repeat",
        "1",
        "--placement",
        "unpinned",
        "--json",
    ]);
    let v = success_json(&out);
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 4, "thread, poll, percpu, sigbus");
    for r in results {
        assert!(r["pager"]["p50_us"].as_f64().expect("p50") > 0.0, "{r}");
        assert!(r["raw"]["p99_us"].as_f64().expect("p99") > 0.0, "{r}");
        assert!(r["pager_vs_raw_p50"].as_f64().expect("ratio") > 0.0);
        assert_eq!(r["pager"]["count"], 300);
    }
    assert!(v["first_touch"]["p50_us"].as_f64().expect("baseline") > 0.0);
}

/// In a cpuset of one CPU (here `taskset`), the bench pins to the CPU it may use — not to
/// CPU 0, which would fail and leave one side unpinned — records where each side ran,
/// and refuses the placement that needs two CPUs instead of printing ratios of unlike
/// placements.
#[test]
fn bench_in_a_one_cpu_cpuset_pins_where_it_may_and_refuses_what_it_cannot_place() {
    let cpu = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .ok()
        .and_then(|set| {
            (0..nix::sched::CpuSet::count())
                .rev()
                .find(|&c| set.is_set(c).unwrap_or(false))
        })
        .expect("an allowed CPU");
    let run = |placement: &str| {
        Command::new("taskset")
            .args([
                "-c",
                &cpu.to_string(),
                env!("CARGO_BIN_EXE_uffdkit"),
                "bench",
            ])
            .args([
                "--pages",
                "200",
                "--repeat",
                "1",
                "--modes",
                "thread,percpu",
            ])
            .args(["--placement", placement, "--json"])
            .output()
            .expect("run uffdkit under taskset")
    };
    let v = success_json(&run("same"));
    for r in v["results"].as_array().expect("results") {
        assert_eq!(r["pager_placed"], r["raw_placed"], "{r}");
        assert_eq!(r["pager_placed"]["faulting"], cpu, "{r}");
        assert!(r["pager_vs_raw_p50"].as_f64().is_some(), "{r}");
    }
    let out = run("other");
    assert!(
        !out.status.success(),
        "placement other on one CPU is refused"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs two CPUs"), "{err}");
}

#[test]
fn restore_compares_strategies_and_verifies_pages() {
    let path = std::env::temp_dir().join(format!("uffdkit-cli-image-{}", std::process::id()));
    let image: Vec<u8> = (0..4 << 20)
        .map(|i: u32| (i / 4096) as u8 ^ (i as u8))
        .collect();
    std::fs::write(&path, &image).expect("write image");
    let out = uffdkit(&[
        "restore",
        "--image",
        path.to_str().expect("utf8"),
        "--strategy",
        "all",
        "--touch",
        "0.5",
        "--json",
    ]);
    std::fs::remove_file(&path).ok();
    let v = success_json(&out);
    assert_eq!(v["verified"], true);
    assert_eq!(v["touched_pages"], 512);
    let names: Vec<&str> = v["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|r| r["strategy"].as_str())
        .collect();
    assert_eq!(names, ["pager", "eager", "mmap"]);
}

#[test]
fn restore_of_a_missing_image_fails_clearly() {
    let out = uffdkit(&["restore", "--image", "/nonexistent/image"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/image"));
}

#[test]
fn vmm_bench_refuses_zero_runs_as_a_usage_error() {
    // A median of no runs has no value: refused before any guest is booted.
    let out = Command::new(env!("CARGO_BIN_EXE_uffdkit-vmm"))
        .args(["bench", "--runs", "0"])
        .output()
        .expect("run uffdkit-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--runs"), "{stderr}");
}

#[test]
fn netbench_without_touches_says_its_latencies_were_not_measured() {
    let out = uffdkit(&[
        "migrate",
        "netbench",
        "--touches",
        "0",
        "--size",
        "4M",
        "--idle-size",
        "1M",
        "--repeat",
        "1",
    ]);
    let text = success_text(&out);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("requested page"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for line in lines {
        assert!(line.contains("not measured"), "{line}");
        assert!(!line.contains("p50"), "{line}");
    }
}
