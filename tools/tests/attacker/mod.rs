//! Another local user against a root `uffdkit` (issue 27): each test forks a child that
//! drops to `nobody` and plants what an unprivileged tenant could — links, FIFOs, sparse
//! fillers, read locks, pre-created directories — then runs the root command and asserts
//! that it refuses or is unaffected, and that nothing outside its own files changed.
//!
//! Every scene lives under a root-owned directory (0755) of the test with a shared,
//! sticky, world-writable `shared/` in it standing in for `/var/tmp` or `/tmp`, and a
//! root-owned `victims/` holding the files the attacker would like root to damage.

use crate::common;

mod cache;
mod inputs;
mod socket;
mod temporaries;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{run, temp, uffdkit, write_key, Finished, Proc};
use testkit::attacker::{self, failed, Planted};

/// The chunk size `image push` uses by default.
const CHUNK: usize = 512 << 10;
/// Image length: four data chunks.
const IMAGE: usize = 4 * CHUNK;

struct Scene {
    base: PathBuf,
}

impl Scene {
    /// A fresh scene, or `None` (reported as skipped) when not root.
    fn new(test: &str) -> Option<Scene> {
        if !attacker::available(test) {
            return None;
        }
        // Short: Unix socket paths under it must fit in sun_path (108 bytes).
        let base = temp(&format!(
            "atk-{}",
            &chunked::Digest::of(test.as_bytes()).to_hex()[..8]
        ));
        let _ = std::fs::remove_dir_all(&base);
        for (dir, mode) in [
            ("", 0o755),
            ("shared", 0o1777),
            ("victims", 0o755),
            ("rootonly", 0o700),
            ("store", 0o755),
        ] {
            let p = base.join(dir);
            std::fs::create_dir_all(&p).expect("create the scene");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        let scene = Scene { base };
        common::image(&scene.path("raw"), IMAGE);
        std::fs::write(scene.victim("file"), b"keep").expect("victim");
        Some(scene)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.base.join(name)
    }

    fn shared(&self, name: &str) -> PathBuf {
        self.base.join("shared").join(name)
    }

    fn victim(&self, name: &str) -> PathBuf {
        self.base.join("victims").join(name)
    }

    fn url(&self) -> String {
        format!("file://{}/vm", self.path("store").display())
    }

    /// Pushes the scene's image to its store.
    fn push(&self) {
        ok(run(uffdkit([
            "image".as_ref(),
            "push".as_ref(),
            self.path("raw").as_os_str(),
            self.url().as_ref(),
        ])));
    }

    /// The hex digests of the image's distinct data chunks.
    fn chunk_names(&self) -> Vec<String> {
        let raw = std::fs::read(self.path("raw")).expect("read the image");
        let mut names: Vec<String> = raw
            .chunks(CHUNK)
            .map(|c| chunked::Digest::of(c).to_hex())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// `image pull` of the scene's image into `out` through the cache `cache`.
    fn pull(&self, cache: &Path, out: &Path, extra: &[&str]) -> Proc {
        let mut cmd = uffdkit(["image", "pull"]);
        cmd.arg(self.url())
            .arg(out)
            .arg("--cache")
            .arg(cache)
            .args(extra);
        Proc::start(cmd)
    }

    /// Everything in the victims', root-only and store directories, with a digest of
    /// each file's contents: what the attacker would like root to change.
    fn outside(&self) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        for dir in ["victims", "rootonly", "store"] {
            walk(&self.path(dir), &mut out);
        }
        out.sort();
        out
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p).expect("lstat");
        if meta.is_dir() {
            walk(&p, out);
        } else {
            let bytes = std::fs::read(&p).unwrap_or_default();
            out.push((p, chunked::Digest::of(&bytes).to_hex()));
        }
    }
}

fn ok(f: Finished) -> Finished {
    assert!(f.status.success(), "{}", f.text());
    f
}

fn refused_because_another_user_owns(f: &Finished) {
    assert!(!f.status.success(), "ran anyway: {}", f.text());
    assert!(
        f.stderr
            .contains(&format!("owned by uid {}", attacker::NOBODY)),
        "not refused for the owner: {}",
        f.text()
    );
}

// The attacker's moves (they run as nobody, in the forked child).

fn mkdir(p: &Path, mode: u32) -> Planted {
    std::fs::create_dir(p).map_err(|e| failed("mkdir", p, e))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| failed("chmod", p, e))
}

fn symlink(target: &Path, link: &Path) -> Planted {
    std::os::unix::fs::symlink(target, link).map_err(|e| failed("symlink", link, e))
}

fn mkfifo(p: &Path) -> Planted {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o666))
        .map_err(|e| failed("mkfifo", p, e))
}

/// Runs a root `uffdkit` command whose pid is known before it starts (a shell that
/// `exec`s it once `gate` exists), so that the attacker can plant names derived from it.
fn gated(gate: &Path, env: &[(&str, &Path)], args: &[&str]) -> Proc {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"while [ ! -e "$GATE" ]; do sleep 0.01; done; exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_uffdkit"))
        .args(args)
        .env("GATE", gate);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::start(cmd)
}

fn open_gate(gate: &Path) {
    std::fs::write(gate, b"").expect("open the gate");
}
