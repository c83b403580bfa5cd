//! Another local user against a root `uffdkit` (issue 27): each test forks a child that
//! drops to `nobody` and plants what an unprivileged tenant could — links, FIFOs, sparse
//! fillers, read locks, pre-created directories — then runs the root command and asserts
//! that it refuses or is unaffected, and that nothing outside its own files changed.
//!
//! Every scene lives under a root-owned directory (0755) of the test with a shared,
//! sticky, world-writable `shared/` in it standing in for `/var/tmp` or `/tmp`, and a
//! root-owned `victims/` holding the files the attacker would like root to damage.

mod common;

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
        let base = temp(test);
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

/// Finding 1: a cache directory another user created, with `fetch.lock` and
/// `evict.lock` linked to root's files and every fan-out directory linked into a
/// root-only directory. Before: root created and truncated files through the links and
/// wrote chunks into the root-only directory.
#[test]
fn a_cache_another_user_created_is_refused_and_none_of_its_links_is_followed() {
    let Some(s) = Scene::new("attacker-planted-cache") else {
        return;
    };
    s.push();
    let cache = s.shared("cache");
    let (created, truncated, rootonly) =
        (s.victim("created"), s.victim("file"), s.path("rootonly"));
    attacker::as_nobody(|| {
        mkdir(&cache, 0o777)?;
        symlink(&created, &cache.join("fetch.lock"))?;
        symlink(&truncated, &cache.join("evict.lock"))?;
        mkdir(&cache.join("chunks"), 0o777)?;
        mkdir(&cache.join("chunks/tmp"), 0o777)?;
        for b in 0..=255u8 {
            symlink(&rootonly, &cache.join(format!("chunks/{b:02x}")))?;
        }
        Ok(())
    });
    let before = s.outside();
    let f = s
        .pull(&cache, &s.path("out.raw"), &["--cache-mib", "1"])
        .finish();
    assert_eq!(s.outside(), before, "root changed a file outside the cache");
    refused_because_another_user_owns(&f);
    assert!(!created.exists(), "root created a file through fetch.lock");
}

/// Finding 1: a link another user planted where the cache should be, pointing into a
/// root-only directory. Before: root created its cache there.
#[test]
fn a_cache_path_another_user_linked_elsewhere_is_refused() {
    let Some(s) = Scene::new("attacker-cache-link") else {
        return;
    };
    s.push();
    let (cache, rootonly) = (s.shared("cache"), s.path("rootonly"));
    attacker::as_nobody(|| symlink(&rootonly, &cache));
    let before = s.outside();
    let f = s.pull(&cache, &s.path("out.raw"), &[]).finish();
    assert_eq!(s.outside(), before, "root changed a file outside the cache");
    assert_eq!(
        std::fs::read_dir(&rootonly).unwrap().count(),
        0,
        "root wrote into the link's target"
    );
    refused_because_another_user_owns(&f);
}

/// Finding 1, eviction: a 9 GB sparse filler pushes "used" over the bound, and a fan-out
/// directory linked to a directory of root's files. Before: eviction deleted root's
/// files through the link.
#[test]
fn eviction_never_deletes_through_a_planted_link_nor_for_a_sparse_filler() {
    let Some(s) = Scene::new("attacker-evict") else {
        return;
    };
    s.push();
    let dir = s.victim("dir");
    std::fs::create_dir(&dir).expect("victim dir");
    for name in ["a", "b"] {
        let p = dir.join(name);
        std::fs::write(&p, b"root's").expect("victim");
        // Older than any chunk: first in line for eviction.
        let t = nix::sys::time::TimeSpec::new(1_000_000, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &p,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .expect("utimensat");
    }
    let cache = s.shared("cache");
    attacker::as_nobody(|| {
        mkdir(&cache, 0o777)?;
        mkdir(&cache.join("chunks"), 0o777)?;
        mkdir(&cache.join("chunks/ff"), 0o777)?;
        let filler = cache.join("chunks/ff/filler");
        std::fs::File::create(&filler)
            .and_then(|f| f.set_len(9 << 30))
            .map_err(|e| failed("fill", &filler, e))?;
        symlink(&dir, &cache.join("chunks/aa"))
    });
    let before = s.outside();
    let f = s
        .pull(&cache, &s.path("out.raw"), &["--cache-mib", "64"])
        .finish();
    assert_eq!(s.outside(), before, "root changed a file outside the cache");
    refused_because_another_user_owns(&f);
}

/// Finding 2: guest memory in the cache and in a pulled image must be unreadable to
/// other users. Before: chunks were 0644 in 0755 directories, pulled images 0644.
#[test]
fn cached_chunks_and_pulled_images_are_unreadable_to_other_users() {
    let Some(s) = Scene::new("attacker-read") else {
        return;
    };
    s.push();
    let (cache, out) = (s.shared("cache"), s.shared("out.raw"));
    ok(s.pull(&cache, &out, &[]).finish());
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(s.path("raw")).unwrap()
    );
    let mut files = vec![out.clone()];
    let mut dirs = vec![cache.clone()];
    while let Some(d) = dirs.pop() {
        let mode = std::fs::metadata(&d).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                dirs.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    let chunks = files
        .iter()
        .filter(|p| p.starts_with(cache.join("chunks")))
        .count();
    assert_eq!(
        chunks,
        s.chunk_names().len(),
        "every chunk cached: {files:?}"
    );
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", f.display());
    }
    attacker::as_nobody(|| {
        for f in &files {
            if std::fs::read(f).is_ok() {
                return Err(format!("nobody read {}", f.display()));
            }
        }
        Ok(())
    });
}

/// Finding 2: an output another user created first in a shared directory (mode 0666, so
/// root could write it) would hand that user the guest memory written into it. Before:
/// `image pull` wrote into it.
#[test]
fn a_pull_never_writes_into_an_output_another_user_created() {
    let Some(s) = Scene::new("attacker-output") else {
        return;
    };
    s.push();
    let out = s.shared("out.raw");
    attacker::as_nobody(|| {
        std::fs::File::create(&out).map_err(|e| failed("create", &out, e))?;
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| failed("chmod", &out, e))
    });
    let f = s.pull(&s.shared("cache"), &out, &[]).finish();
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        0,
        "root wrote into it"
    );
    refused_because_another_user_owns(&f);
}

/// Finding 3: a read lock on the cache's lock file, held by another user, made every
/// chunk wait for the retry deadline (60 s a chunk). Now the lock file is unreachable to
/// others and the pull does not wait.
#[test]
fn another_user_cannot_lock_the_cache_and_stall_a_pull() {
    let Some(s) = Scene::new("attacker-lock") else {
        return;
    };
    s.push();
    let cache = s.shared("cache");
    ok(s.pull(&cache, &s.path("warm.raw"), &[]).finish());
    let lock = cache.join("fetch.lock");
    // Best effort, as an attacker would: take a read lock on the whole file if it can.
    let holder = attacker::spawn(|| {
        if let Ok(f) = std::fs::File::open(&lock) {
            let whole = libc::flock {
                l_type: libc::F_RDLCK as i16,
                l_whence: libc::SEEK_SET as i16,
                l_start: 0,
                l_len: 0,
                l_pid: 0,
            };
            nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_OFD_SETLK(&whole))
                .map_err(|e| failed("lock", &lock, e))?;
            // Held by the open file description, which this child keeps until released.
            std::mem::forget(f);
        }
        Ok(())
    });
    let started = Instant::now();
    let f = s
        .pull(&cache, &s.path("out.raw"), &["--cold-cache"])
        .finish_within(Duration::from_secs(40));
    ok(f);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the pull waited {:?}",
        started.elapsed()
    );
    holder.finish();
    attacker::as_nobody(|| match std::fs::File::open(&lock) {
        Ok(_) => Err(format!("nobody opened {}", lock.display())),
        Err(_) => Ok(()),
    });
}

/// Finding 3: a FIFO where a chunk should be hung a root pull forever (the open blocked).
#[test]
fn a_fifo_planted_at_a_chunk_name_cannot_hang_a_pull() {
    let Some(s) = Scene::new("attacker-fifo") else {
        return;
    };
    s.push();
    let cache = s.shared("cache");
    let names = s.chunk_names();
    attacker::as_nobody(|| {
        mkdir(&cache, 0o777)?;
        mkdir(&cache.join("chunks"), 0o777)?;
        for hex in &names {
            let fan_out = cache.join("chunks").join(&hex[..2]);
            if !fan_out.exists() {
                mkdir(&fan_out, 0o777)?;
            }
            mkfifo(&fan_out.join(hex))?;
        }
        Ok(())
    });
    let f = s
        .pull(&cache, &s.path("out.raw"), &[])
        .finish_within(Duration::from_secs(30));
    refused_because_another_user_owns(&f);
}

/// Finding 4: `migrate local` used `$TMPDIR/uffdkit-migrate-<pid>` and accepted an
/// existing one: a planted `key` link made root overwrite a file of root's with the key.
#[test]
fn migrate_local_never_uses_a_directory_another_user_planted() {
    let Some(s) = Scene::new("attacker-migrate") else {
        return;
    };
    let gate = s.path("gate");
    let tmp = s.path("shared");
    let proc = gated(
        &gate,
        &[("TMPDIR", &tmp)],
        &["migrate", "local", "--size", "4M", "--via", "unix"],
    );
    let planted = s.shared(&format!("uffdkit-migrate-{}", proc.pid()));
    let victim = s.victim("file");
    attacker::as_nobody(|| {
        mkdir(&planted, 0o777)?;
        symlink(&victim, &planted.join("key"))
    });
    let before = s.outside();
    open_gate(&gate);
    let f = ok(proc.finish());
    assert!(f.stdout.contains("verified"), "{}", f.text());
    assert_eq!(s.outside(), before, "root changed a file outside its own");
    let left: Vec<_> = std::fs::read_dir(&planted).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "root used the planted directory: {left:?}");
}

/// Finding 4: `restore`'s eager baseline downloaded into
/// `$TMPDIR/uffdkit-download-<pid>/image`, through a link planted there.
#[test]
fn the_download_baseline_never_writes_through_a_planted_link() {
    let Some(s) = Scene::new("attacker-download") else {
        return;
    };
    s.push();
    let gate = s.path("gate");
    let (tmp, url, raw) = (s.path("shared"), s.url(), s.path("raw"));
    let proc = gated(
        &gate,
        &[("TMPDIR", &tmp)],
        &[
            "restore",
            "--image",
            &url,
            "--reference",
            raw.to_str().unwrap(),
            "--strategy",
            "eager",
            "--touch",
            "0.5",
            "--no-cache",
        ],
    );
    let planted = s.shared(&format!("uffdkit-download-{}", proc.pid()));
    let victim = s.victim("file");
    attacker::as_nobody(|| {
        mkdir(&planted, 0o777)?;
        symlink(&victim, &planted.join("image"))
    });
    let before = s.outside();
    open_gate(&gate);
    ok(proc.finish());
    assert_eq!(s.outside(), before, "root changed a file outside its own");
}

/// Finding 4: `snapshot chain` wrote `<work-dir>/uffdkit-snapshot-<pid>-base.raw` with
/// `File::create`, through a link planted at that name in a shared directory.
#[test]
fn snapshot_chain_never_writes_through_a_planted_scratch_name() {
    let Some(s) = Scene::new("attacker-chain") else {
        return;
    };
    let gate = s.path("gate");
    let (work, url) = (s.path("shared"), s.url());
    let proc = gated(
        &gate,
        &[],
        &[
            "snapshot",
            "chain",
            "--size",
            "4M",
            "--layers",
            "1",
            "--interval",
            "0.1",
            "--chunk-kib",
            "64",
            "--url",
            &url,
            "--work-dir",
            work.to_str().unwrap(),
        ],
    );
    let pid = proc.pid();
    let victim = s.victim("file");
    attacker::as_nobody(|| {
        for what in ["base", "full"] {
            symlink(
                &victim,
                &work.join(format!("uffdkit-snapshot-{pid}-{what}.raw")),
            )?;
        }
        Ok(())
    });
    let before: Vec<_> = s
        .outside()
        .into_iter()
        .filter(|(p, _)| !p.starts_with(s.path("store")))
        .collect();
    open_gate(&gate);
    ok(proc.finish());
    let after: Vec<_> = s
        .outside()
        .into_iter()
        .filter(|(p, _)| !p.starts_with(s.path("store")))
        .collect();
    assert_eq!(after, before, "root changed a file outside its own");
}

/// Finding 5: a FIFO given as the memory file hung `fc-handler` before it listened (and
/// `serve` and `restore` the same way).
#[test]
fn fc_handler_refuses_a_fifo_memory_file_at_once() {
    let Some(s) = Scene::new("attacker-fc-fifo") else {
        return;
    };
    let mem = s.shared("mem");
    attacker::as_nobody(|| mkfifo(&mem));
    let mut cmd = uffdkit(["fc-handler"]);
    cmd.arg(s.path("fc.sock")).arg(&mem);
    let f = Proc::start(cmd).finish_within(Duration::from_secs(20));
    assert!(!f.status.success(), "{}", f.text());
    assert!(f.stderr.contains("FIFO"), "{}", f.text());
    // serve's image, restore's image: the same.
    let key = s.path("key");
    write_key(&key, "a-key-of-enough-length");
    let mut serve = uffdkit(["serve", "--image"]);
    serve.arg(&mem).arg("--key-file").arg(&key);
    serve
        .arg("--listen")
        .arg(format!("unix:{}", s.path("serve.sock").display()));
    let mut restore = uffdkit(["restore", "--image"]);
    restore.arg(&mem);
    for cmd in [serve, restore] {
        let f = Proc::start(cmd).finish_within(Duration::from_secs(20));
        assert!(!f.status.success(), "{}", f.text());
        assert!(f.stderr.contains("FIFO"), "{}", f.text());
    }
}

/// Finding 5: a key file others can read is refused unless allowed explicitly, and a
/// device (which would be read until memory runs out) is refused at once.
#[test]
fn a_key_file_others_can_read_or_a_device_is_refused() {
    let Some(s) = Scene::new("attacker-key") else {
        return;
    };
    let key = s.path("key");
    write_key(&key, "a-key-of-enough-length");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    attacker::as_nobody(|| match std::fs::read(&key) {
        Ok(_) => Ok(()), // the premise: others can read this key
        Err(e) => Err(failed("read", &key, e)),
    });
    let serve = |key: &Path, extra: &[&str]| {
        let mut cmd = uffdkit(["serve", "--image"]);
        cmd.arg(s.path("raw"))
            .arg("--key-file")
            .arg(key)
            .arg("--listen")
            .arg(format!("unix:{}", s.path("serve.sock").display()))
            .args(extra);
        Proc::start(cmd)
    };
    let f = serve(&key, &[]).finish_within(Duration::from_secs(20));
    assert!(!f.status.success(), "{}", f.text());
    assert!(
        f.stderr.contains("readable by group or others"),
        "{}",
        f.text()
    );
    let f = serve(Path::new("/dev/zero"), &[]).finish_within(Duration::from_secs(20));
    assert!(!f.status.success(), "{}", f.text());
    assert!(f.stderr.contains("character device"), "{}", f.text());
    // TLS files the same: /dev/zero as a private key is refused, not read forever.
    let mut tls = uffdkit(["serve", "--image"]);
    tls.arg(s.path("raw"))
        .args([
            "--tls-cert",
            "/dev/zero",
            "--tls-key",
            "/dev/zero",
            "--tls-ca",
            "/dev/zero",
        ])
        .arg("--listen")
        .arg(format!("unix:{}", s.path("tls.sock").display()));
    let f = Proc::start(tls).finish_within(Duration::from_secs(20));
    assert!(!f.status.success(), "{}", f.text());
    assert!(f.stderr.contains("character device"), "{}", f.text());
    // Allowed explicitly, the same key serves.
    let mut server = serve(&key, &["--allow-readable-keys"]);
    common::wait_listening(&s.path("serve.sock"), &mut server);
}

/// Finding 5: a store is not trusted either. A 77-byte manifest declaring 1 PiB in 2^24
/// chunks cost every reader 1.6–2.4 GB, and `restore` aborted allocating 2 TiB of
/// per-page tables; a sparse 8 TiB file costs nothing to make and did the same. Each is
/// now refused from what it declares, before anything is sized for it.
#[test]
fn an_image_declaring_a_petabyte_is_refused_before_anything_is_allocated() {
    let dir = temp("attacker-bomb");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("store")).expect("store");
    let (page, chunk, len): (u32, u32, u64) = (4096, 64 << 20, 1 << 50);
    let count = len / u64::from(chunk);
    let mut m = chunked::manifest::MAGIC.to_vec();
    m.extend_from_slice(&chunked::manifest::VERSION.to_le_bytes());
    m.extend_from_slice(&[chunked::HashAlgorithm::Blake3.id(), 0]);
    m.extend_from_slice(&page.to_le_bytes());
    m.extend_from_slice(&chunk.to_le_bytes());
    m.extend_from_slice(&len.to_le_bytes());
    m.extend_from_slice(&count.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.push(0); // one zero run of every chunk
    m.extend_from_slice(&(count as u32).to_le_bytes());
    let trailer = chunked::Digest::of(&m);
    m.extend_from_slice(&trailer.0);
    assert_eq!(m.len(), 77);
    std::fs::write(dir.join("store/bomb"), &m).expect("manifest");
    let url = format!("file://{}/bomb", dir.join("store").display());
    let sparse = dir.join("sparse.raw");
    std::fs::File::create(&sparse)
        .and_then(|f| f.set_len(8 << 40)) // what ext4 and tmpfs allow
        .expect("sparse file");
    let out = dir.join("out.raw");
    let runs: Vec<Vec<&std::ffi::OsStr>> = vec![
        vec!["image".as_ref(), "inspect".as_ref(), url.as_ref()],
        vec![
            "image".as_ref(),
            "pull".as_ref(),
            url.as_ref(),
            out.as_os_str(),
            "--no-cache".as_ref(),
        ],
        vec![
            "restore".as_ref(),
            "--image".as_ref(),
            url.as_ref(),
            "--no-cache".as_ref(),
        ],
        vec!["restore".as_ref(), "--image".as_ref(), sparse.as_os_str()],
    ];
    for args in runs {
        let started = Instant::now();
        let f = Proc::start(uffdkit(&args)).finish_within(Duration::from_secs(30));
        assert!(!f.status.success(), "{args:?}: {}", f.text());
        assert!(
            f.stderr.contains("--max-image"),
            "{args:?} not refused for its size: {}",
            f.text()
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{args:?}");
    }
    assert!(
        !out.exists(),
        "a pull of a refused image created its output"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Finding 5: `serve` and `migrate dest` left their Unix socket files behind after
/// SIGTERM. Now each removes it and dies of the signal's status.
#[test]
fn serve_and_migrate_dest_remove_their_socket_files_on_sigterm() {
    let dir = temp("attacker-sockets");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (key, image) = (dir.join("key"), dir.join("image"));
    write_key(&key, "a-key-of-enough-length");
    common::image(&image, 1 << 20);
    for name in ["serve", "dest"] {
        let sock = dir.join(format!("{name}.sock"));
        let mut cmd = match name {
            "serve" => uffdkit(["serve".as_ref(), "--image".as_ref(), image.as_os_str()]),
            _ => uffdkit(["migrate", "dest"]),
        };
        cmd.arg("--key-file").arg(&key);
        cmd.arg("--listen").arg(format!("unix:{}", sock.display()));
        let mut proc = Proc::start(cmd);
        common::wait_listening(&sock, &mut proc);
        proc.signal(nix::sys::signal::Signal::SIGTERM);
        let f = proc.finish_within(Duration::from_secs(20));
        assert_eq!(f.code(), Some(143), "{name}: {}", f.text());
        assert!(!sock.exists(), "{name} left {}", sock.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Finding 5, TLS: a private key others can read lets them pose as this host; it is
/// refused unless allowed explicitly.
#[test]
fn a_tls_key_others_can_read_is_refused() {
    let Some(s) = Scene::new("attacker-tls-key") else {
        return;
    };
    if Command::new("openssl").arg("version").output().is_err() {
        testkit::skip(
            "a_tls_key_others_can_read_is_refused",
            "openssl is not installed (scripts/test installs it)",
        );
        return;
    }
    let pki = s.path("pki");
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/tls-certs"))
        .arg(&pki)
        .arg("localhost")
        .output()
        .expect("run scripts/tls-certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = pki.join("localhost.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let serve = |extra: &[&str]| {
        let mut cmd = uffdkit(["serve", "--image"]);
        cmd.arg(s.path("raw"))
            .arg("--tls-cert")
            .arg(pki.join("localhost.pem"))
            .arg("--tls-key")
            .arg(&key)
            .arg("--tls-ca")
            .arg(pki.join("ca.pem"))
            .arg("--listen")
            .arg(format!("unix:{}", s.path("tls.sock").display()))
            .args(extra);
        Proc::start(cmd)
    };
    let f = serve(&[]).finish_within(Duration::from_secs(20));
    assert!(!f.status.success(), "{}", f.text());
    assert!(
        f.stderr.contains("readable by group or others"),
        "{}",
        f.text()
    );
    let mut server = serve(&["--allow-readable-keys"]);
    common::wait_listening(&s.path("tls.sock"), &mut server);
}
