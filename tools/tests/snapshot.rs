//! `uffdkit snapshot`, `image merge` and `fc-handler --diff` end to end, as a user runs
//! them: a live snapshot checked against the writers' log; an incremental chain restored
//! lazily and merged; a Firecracker-style diff-snapshot chain served by `fc-handler` to
//! `fc-client` (which plays Firecracker and verifies every page) without rebase-snap.

use crate::common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{run, temp, uffdkit, wait_listening, Finished, Proc};

/// A scratch directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let p = temp(name);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn url(&self, name: &str) -> String {
        format!("file://{}/{name}", self.0.display())
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ok(f: Finished) -> Finished {
    assert!(f.status.success(), "{}", f.text());
    f
}

fn json(f: &Finished) -> serde_json::Value {
    serde_json::from_str(&f.stdout).unwrap_or_else(|e| panic!("{e}: {}", f.text()))
}

#[test]
fn snapshot_live_holds_one_instant_of_the_writers_and_reports_both_ways() {
    let dir = Dir::new("snap-live");
    let out = dir.path("live.raw");
    let f = ok(run(uffdkit([
        "snapshot",
        "live",
        "--size",
        "32M",
        "--writers",
        "2",
        "--dirty-rate",
        "0",
        "--warm-up",
        "0.3",
        "--verify",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ])));
    let v = json(&f);
    assert_eq!(v["live"]["pages"], 8192);
    let cut = v["verified_cut"].as_array().expect("verified");
    assert_eq!(cut.len(), 2, "one cut per writer");
    let held = v["live_stalls"]["count"].as_u64().unwrap();
    assert!(held > 0, "{v}");
    assert!(
        v["live_stalls_after_cut"]["count"].as_u64().unwrap() <= held,
        "writes begun after the cut are some of those held: {v}"
    );
    assert!(v["stop_the_world"]["paused_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 32 << 20);
}

/// Runs a command of the chain test: the bound is against hanging only (starved of CPU,
/// pinned beside busy loops, the chain command took over a minute, its live base alone
/// over 10 s).
fn run_long(cmd: std::process::Command) -> Finished {
    Proc::start(cmd).finish_within(Duration::from_secs(300))
}

#[test]
fn snapshot_chain_layers_restore_lazily_and_merge_to_the_same_memory() {
    let dir = Dir::new("snap-chain");
    let reference = dir.path("reference.raw");
    let work = dir.path("work");
    let f = ok(run_long(uffdkit([
        "snapshot",
        "chain",
        "--size",
        "16M",
        "--dirty-rate",
        "8",
        // 90 % of the writes to a hot 5 %: live layers leave most chunks unchanged too.
        "--workload",
        "hot",
        "--layers",
        "5",
        // Layers 1–3 live; 4 with the writers stopped (what they wrote since 3); 5 finds
        // nothing written, whatever the timing was.
        "--still-layers",
        "2",
        "--interval",
        "0.1",
        "--chunk-kib",
        "64",
        "--json",
        "--url",
        &dir.url("vm"),
        "--work-dir",
        work.to_str().unwrap(),
        "--reference",
        reference.to_str().unwrap(),
    ])));
    let v = json(&f);
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 5);
    let count = |l: &serde_json::Value, k: &str| {
        l[k].as_u64()
            .unwrap_or_else(|| panic!("{k} of layer {}: {v}", l["layer"]))
    };
    // A layer stores the chunks written since its parent, at most: every other chunk is
    // inherited (a written chunk whose content is unchanged may be inherited too).
    for l in layers {
        assert_eq!(count(l, "chunks"), 256, "16 MiB in 64 KiB chunks: {v}");
        assert!(
            count(l, "inherited_chunks") + count(l, "dirty_chunks") >= 256,
            "unchanged chunks are inherited, not stored: layer {l}"
        );
    }
    let last = &layers[4];
    assert_eq!(count(last, "dirty_pages"), 0, "nothing written: {last}");
    assert_eq!(
        count(last, "inherited_chunks"),
        256,
        "all inherited: {last}"
    );
    assert_eq!(count(last, "uploaded_bytes"), 0, "nothing stored: {last}");
    let stored: u64 = layers.iter().map(|l| count(l, "uploaded_bytes")).sum();
    assert!(
        stored < v["full"]["uploaded_bytes"].as_u64().unwrap() * 5,
        "five layers store less than five full images: {v}"
    );
    let top = dir.url("vm.5");
    // The chain restores lazily, verified page by page against the memory at layer 5.
    let restore = |image: &str| {
        ok(run_long(uffdkit([
            "restore",
            "--image",
            image,
            "--reference",
            reference.to_str().unwrap(),
            "--mode",
            "thread",
            "--no-cache",
        ])))
    };
    restore(&top);
    let merged = dir.url("merged");
    let m = ok(run_long(uffdkit([
        "image", "merge", &top, "--out", &merged,
    ])));
    assert!(m.stdout.contains("no chunk data copied"), "{}", m.text());
    restore(&merged);
    let raw = dir.path("merged.raw");
    ok(run_long(uffdkit([
        "image",
        "merge",
        &top,
        "--out",
        raw.to_str().unwrap(),
    ])));
    assert!(std::fs::read(&raw).unwrap() == std::fs::read(&reference).unwrap());
    let i = ok(run_long(uffdkit(["image", "inspect", &top, "--json"])));
    let iv = json(&i);
    assert_eq!(iv["chain"].as_array().unwrap().len(), 6, "{iv}");
    assert_eq!(iv["parent"]["name"], "vm.4");
}

/// A chain needs a layer (the writers stop before the last one, and the full image is
/// dumped after it), and at least that last one still.
#[test]
fn snapshot_chain_refuses_no_layers_and_no_still_layer() {
    let dir = Dir::new("snap-chain-none");
    for (flag, value) in [("--layers", "0"), ("--still-layers", "0")] {
        let f = run(uffdkit([
            "snapshot",
            "chain",
            "--size",
            "1M",
            flag,
            value,
            "--url",
            &dir.url("vm"),
            "--work-dir",
            dir.path("work").to_str().unwrap(),
        ]));
        assert_eq!(f.code(), Some(2), "{flag} {value}: {}", f.text());
        assert!(f.stderr.contains(flag), "{flag} {value}: {}", f.text());
    }
}

const PS: usize = 4096;

/// A Firecracker-style chain of `pages` pages: a base memory file (every 8th page a
/// hole) and three sparse diffs of dirtied pages; returns their paths and the memory.
fn fc_chain(dir: &Dir, pages: usize) -> (PathBuf, Vec<PathBuf>, Vec<u8>) {
    let mut memory = vec![0u8; pages * PS];
    let write = |path: &Path, pages_written: &[(usize, u8)], memory: &mut Vec<u8>| {
        let f = File::create(path).unwrap();
        f.set_len((pages * PS) as u64).unwrap();
        for &(i, v) in pages_written {
            let mut page = vec![v; PS];
            page[..8].copy_from_slice(&(i as u64).to_le_bytes());
            if v == 0 {
                page.fill(0); // dirtied to zero: data in the diff, not a hole
            }
            f.write_all_at(&page, (i * PS) as u64).unwrap();
            memory[i * PS..(i + 1) * PS].copy_from_slice(&page);
        }
    };
    let base = dir.path("base.mem");
    let base_pages: Vec<(usize, u8)> = (0..pages).filter(|i| i % 8 != 7).map(|i| (i, 1)).collect();
    write(&base, &base_pages, &mut memory);
    let diffs: Vec<PathBuf> = (0..3)
        .map(|d| {
            let path = dir.path(&format!("diff{d}.mem"));
            let dirty: Vec<(usize, u8)> = (0..40)
                .map(|k| ((k * 53 + d * 7) % pages, d as u8 + 2))
                .chain([((d * 11) % pages, 0)])
                .collect();
            write(&path, &dirty, &mut memory);
            path
        })
        .collect();
    (base, diffs, memory)
}

#[test]
fn fc_handler_serves_a_diff_snapshot_chain_to_fc_client_without_rebase_snap() {
    let dir = Dir::new("snap-fc");
    let (base, diffs, memory) = fc_chain(&dir, 2048);
    // What rebase-snap would produce, for fc-client to verify against.
    let merged = dir.path("merged.mem");
    let mut args = vec!["image".to_owned(), "merge".to_owned()];
    args.push(base.display().to_string());
    args.extend(diffs.iter().map(|d| d.display().to_string()));
    args.extend(["--out".to_owned(), merged.display().to_string()]);
    ok(run(uffdkit(&args)));
    assert!(
        std::fs::read(&merged).unwrap() == memory,
        "merge folds the chain as rebase-snap does"
    );
    let sock = dir.path("fc.sock");
    let mut handler_args = vec![
        "fc-handler".to_owned(),
        sock.display().to_string(),
        base.display().to_string(),
    ];
    for d in &diffs {
        handler_args.extend(["--diff".to_owned(), d.display().to_string()]);
    }
    let mut handler = Proc::start(uffdkit(&handler_args));
    wait_listening(&sock, &mut handler);
    let client = Proc::start(uffdkit([
        "fc-client",
        "--socket",
        sock.to_str().unwrap(),
        "--mem-file",
        merged.to_str().unwrap(),
        "--regions",
        "2",
    ]))
    .finish();
    let h = handler.finish();
    assert!(
        client.status.success(),
        "client: {}\nhandler: {}",
        client.text(),
        h.text()
    );
    assert!(
        client.stdout.contains("touched and verified"),
        "{}",
        client.text()
    );
    assert!(h.status.success(), "{}", h.text());
}

#[test]
fn fc_handler_refuses_a_diff_of_another_guest_before_listening() {
    let dir = Dir::new("snap-fc-bad");
    let (base, _, _) = fc_chain(&dir, 64);
    let other = dir.path("other.mem");
    std::fs::write(&other, vec![3u8; 32 * PS]).unwrap();
    let sock = dir.path("fc.sock");
    let f = run(uffdkit([
        "fc-handler",
        sock.to_str().unwrap(),
        base.to_str().unwrap(),
        "--diff",
        other.to_str().unwrap(),
    ]));
    assert_eq!(f.code(), Some(1), "{}", f.text());
    assert!(
        f.stderr
            .contains("not a diff snapshot of the same guest memory"),
        "{}",
        f.text()
    );
    assert!(!sock.exists(), "refused before the socket exists");
}
