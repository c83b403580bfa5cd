//! Outputs are complete or absent: a snapshot that fails (its disk full) or is
//! terminated (SIGTERM, SIGINT, SIGHUP) leaves no file behind — neither under its name
//! nor under the temporary one it was written to. A full-length sparse file whose unsaved
//! pages are holes would read as a good snapshot of zero pages.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{temp, uffdkit, Proc};
use nix::sys::signal::Signal;

/// A directory removed when the test ends, however it ends.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = temp(name);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("dir");
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let small = self.0.join("small");
        if small.exists() {
            let _ = Command::new("umount")
                .arg(&small)
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read the output directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn snapshot(out: &Path, warm_up: &str) -> Command {
    let mut cmd = uffdkit([
        "snapshot",
        "live",
        "--size",
        "32M",
        "--writers",
        "1",
        "--no-baseline",
        "--warm-up",
        warm_up,
        "--out",
    ]);
    cmd.arg(out);
    cmd
}

#[test]
fn a_terminated_snapshot_leaves_no_output_behind() {
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        let dir = Dir::new(&format!("partial-{signal}"));
        let out = dir.0.join("live.raw");
        // A long warm-up: the output exists, full length, under its temporary name,
        // until the signal comes.
        let mut proc = Proc::start(snapshot(&out, "600"));
        let until = Instant::now() + common::DEADLINE;
        while !entries(&dir.0)
            .iter()
            .any(|n| n.starts_with(".live.raw.partial."))
        {
            assert!(
                !proc.exited(),
                "the snapshot ended before writing its output"
            );
            assert!(Instant::now() < until, "no partial output appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        let signalled = Instant::now();
        proc.signal(signal);
        let f = proc.finish_within(Duration::from_secs(20));
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "{signal} took {:?}",
            signalled.elapsed()
        );
        assert_eq!(f.code(), Some(128 + signal as i32), "{}", f.text());
        assert_eq!(
            entries(&dir.0),
            Vec::<String>::new(),
            "{signal} left files behind"
        );
    }
}

#[test]
fn a_snapshot_whose_disk_fills_up_exits_1_and_leaves_no_output() {
    let dir = Dir::new("partial-full");
    let small = dir.0.join("small");
    std::fs::create_dir_all(&small).expect("dir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
        .arg(&small)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        testkit::skip(
            "a_snapshot_whose_disk_fills_up_exits_1_and_leaves_no_output",
            "cannot mount a small tmpfs (needs root)",
        );
        return;
    }
    let out = small.join("live.raw");
    let started = Instant::now();
    let f = Proc::start(snapshot(&out, "0.1")).finish();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(f.code(), Some(1), "{}", f.text());
    assert!(
        f.stderr.contains("No space left on device"),
        "says why: {}",
        f.text()
    );
    assert_eq!(entries(&small), Vec::<String>::new(), "{}", f.text());
}
