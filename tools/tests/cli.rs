//! The `uffdkit` binary end to end: `probe --json` and `demo`.

use std::process::Command;

fn uffdkit(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_uffdkit"))
        .args(args)
        .output()
        .expect("run uffdkit")
}

#[test]
fn probe_json_names_features_as_kernel_constants() {
    let out = uffdkit(&["probe", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
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
fn demo_serves_and_verifies_every_page() {
    let out = uffdkit(&["demo", "--size-mib", "8"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("faults served: 2048 "), "{text}");
    assert!(text.contains("every page verified"), "{text}");
    assert!(text.contains("µs per fault"), "{text}");
}
