//! `uffdkit restore --image URL` when the image cannot be served: a pack removed,
//! corrupted or truncated in the store (a `file://` store, and a real S3-compatible one,
//! `s3s-fs`), the store killed for longer than the retry bound. Each restore must end
//! within its bound, exit 1 and say why once — never hang with its workload blocked, never
//! die of the poisoned pages' SIGBUS.

use crate::common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{run, temp, uffdkit, Finished, Proc};
use testkit::s3::S3Server;

/// A directory removed when the test ends, however it ends.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the restore's last words must say, once.
const STOPPED: &str = "the pager stopped while the workload ran";

/// Pushes an 8 MiB image to `url` (with `env` for the store); returns the raw file.
fn push(dir: &Path, url: &str, env: &[(String, String)]) -> PathBuf {
    std::fs::create_dir_all(dir).expect("dir");
    let raw = dir.join("mem.raw");
    common::image(&raw, 8 << 20);
    let mut cmd = uffdkit(["image", "push"]);
    cmd.arg(&raw).arg(url).envs(env.iter().cloned());
    let out = run(cmd);
    assert!(out.status.success(), "{}", out.text());
    raw
}

/// The pack files of a store rooted at `root` (its `packs` directory, wherever it is).
fn packs(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("read the store").flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.parent().and_then(|p| p.file_name()) == Some("packs".as_ref()) {
                found.push(p);
            }
        }
    }
    assert!(!found.is_empty(), "no pack under {}", root.display());
    found
}

/// How a test breaks the store's packs.
#[derive(Clone, Copy)]
enum Damage {
    Removed,
    Corrupted,
    Truncated,
}

fn damage(root: &Path, how: Damage) {
    for pack in packs(root) {
        match how {
            Damage::Removed => std::fs::remove_file(&pack).expect("remove the pack"),
            Damage::Corrupted => {
                let mut bytes = std::fs::read(&pack).expect("read the pack");
                for b in bytes.iter_mut().step_by(4096) {
                    *b ^= 0x5A;
                }
                std::fs::write(&pack, bytes).expect("corrupt the pack");
            }
            Damage::Truncated => {
                let len = std::fs::metadata(&pack).expect("pack").len();
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&pack)
                    .expect("open the pack");
                f.set_len(len / 3).expect("truncate the pack");
            }
        }
    }
}

/// Restores `url` with a handler `mode`, no cache and a `retry_secs` bound; asserts it
/// ended within `bound`, with exit status 1, the pager's error once, and `cause` in it.
fn restore_fails(
    url: &str,
    env: &[(String, String)],
    mode: &str,
    retry_secs: u64,
    bound: Duration,
    cause: &[&str],
) -> Finished {
    let mut cmd = uffdkit([
        "restore",
        "--no-cache",
        "--touch",
        "1",
        "--mode",
        mode,
        "--retry-secs",
        &retry_secs.to_string(),
        "--image",
        url,
    ]);
    cmd.envs(env.iter().cloned());
    let started = Instant::now();
    let out = Proc::start(cmd).finish_within(bound + Duration::from_secs(30));
    let took = started.elapsed();
    let text = out.text();
    assert!(took < bound, "took {took:?}, bound {bound:?}: {text}");
    assert_eq!(out.code(), Some(1), "exit status: {text}");
    assert_eq!(
        out.stderr.matches(STOPPED).count(),
        1,
        "the pager's error, once: {text}"
    );
    let last: String = out
        .stderr
        .split_once(STOPPED)
        .map(|(_, tail)| tail.to_owned())
        .unwrap_or_default();
    assert!(
        cause.iter().any(|c| last.contains(c)),
        "the cause chain names one of {cause:?}: {text}"
    );
    out
}

const MODES: [&str; 3] = ["thread", "poll", "percpu"];

/// The retry bound given to commands reading a damaged image, and how soon they must
/// fail: a damage is not retried, so they fail far sooner than the bound — within a
/// margin wide enough for a machine starved of CPU, not for retrying until the bound.
const NOT_RETRIED_SECS: u64 = 600;
const NOT_RETRIED: Duration = Duration::from_secs(120);

/// An image pushed to a `file://` store in the test's own directory, its packs damaged as
/// `how`: the directory and the image's URL.
fn file_damaged(test: &str, how: Damage) -> (Dir, String) {
    let dir = Dir(temp(test));
    let url = format!("file://{}/store/img", dir.0.display());
    push(&dir.0, &url, &[]);
    damage(&dir.0.join("store"), how);
    (dir, url)
}

/// Where the S3 tests push their image.
const S3_URL: &str = "s3://images/snap/img";

/// An image pushed to [`S3_URL`] on a fresh `s3s-fs`: the server, the test's own directory
/// and the raw image; `None` (skipped loudly) when `s3s-fs` is not installed.
fn s3_pushed(test: &str) -> Option<(S3Server, Dir, PathBuf)> {
    let server = S3Server::start(test, "images")?;
    let dir = Dir(temp(test));
    let raw = push(&dir.0, S3_URL, &server.env());
    Some((server, dir, raw))
}

/// Where a damaged image is served from.
#[derive(Clone, Copy)]
enum Store {
    /// A `file://` store in the test's own directory.
    File,
    /// A fresh `s3s-fs`.
    S3,
}

/// An image pushed to `store` under `test`'s name, its packs damaged as `how`, restored in
/// each of `modes` (no cache, `--retry-secs` [`NOT_RETRIED_SECS`]): each must exit 1 within
/// [`NOT_RETRIED`], the pager's error naming one of `cause`. Without `s3s-fs`, an S3 case
/// is skipped loudly.
fn damaged_restores_fail(store: Store, test: &str, how: Damage, modes: &[&str], cause: &[&str]) {
    let (_server, _dir, url, env) = match store {
        Store::File => {
            let (dir, url) = file_damaged(test, how);
            (None, dir, url, Vec::new())
        }
        Store::S3 => {
            let Some((server, dir, _raw)) = s3_pushed(test) else {
                return;
            };
            damage(server.data_dir(), how);
            let env = server.env();
            (Some(server), dir, S3_URL.to_owned(), env)
        }
    };
    for mode in modes {
        restore_fails(&url, &env, mode, NOT_RETRIED_SECS, NOT_RETRIED, cause);
    }
}

#[test]
fn restore_from_a_file_store_whose_pack_was_removed_exits_1_in_every_mode() {
    let cause = ["not found", "No such file"];
    damaged_restores_fail(Store::File, "fail-removed", Damage::Removed, &MODES, &cause);
}

#[test]
fn restore_from_a_file_store_whose_pack_is_corrupt_exits_1_naming_the_verification() {
    let cause = ["failed verification"];
    damaged_restores_fail(
        Store::File,
        "fail-corrupt",
        Damage::Corrupted,
        &["percpu"],
        &cause,
    );
}

#[test]
fn restore_from_a_file_store_whose_pack_is_truncated_exits_1() {
    let cause = ["truncated in the store"];
    damaged_restores_fail(
        Store::File,
        "fail-truncated",
        Damage::Truncated,
        &["thread"],
        &cause,
    );
}

#[test]
fn restore_from_s3_whose_pack_was_removed_exits_1_with_the_stores_words() {
    let cause = ["not found", "NotFound", "NoSuchKey", "404"];
    damaged_restores_fail(
        Store::S3,
        "s3_pack_removed",
        Damage::Removed,
        &MODES,
        &cause,
    );
}

#[test]
fn restore_from_s3_whose_pack_is_corrupt_exits_1_naming_the_verification() {
    let cause = ["failed verification"];
    damaged_restores_fail(
        Store::S3,
        "s3_pack_corrupt",
        Damage::Corrupted,
        &["percpu"],
        &cause,
    );
}

#[test]
fn restore_from_s3_whose_pack_is_truncated_exits_1() {
    let cause = ["truncated in the store"];
    damaged_restores_fail(
        Store::S3,
        "s3_pack_truncated",
        Damage::Truncated,
        &["percpu"],
        &cause,
    );
}

/// A store that dies at the first pack request: a TCP relay to `upstream` that forwards
/// everything (the manifest is read) until a request names a pack, then resets every
/// connection and stops listening, so each retry meets a refused connection — a store
/// killed just as the restore's pages are wanted, whatever the timing.
struct DyingStore {
    addr: std::net::SocketAddr,
    killed: Arc<AtomicBool>,
}

/// What the relay does at the first pack request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Resets every connection and stops listening (a killed store).
    Die,
    /// Forwards no pack request, on any connection, and closes nothing (a store that
    /// accepts and never answers).
    Hang,
}

impl DyingStore {
    /// A relay in front of `server`'s endpoint.
    fn in_front_of(server: &S3Server, fate: Fate) -> DyingStore {
        let upstream: std::net::SocketAddr = server
            .endpoint()
            .trim_start_matches("http://")
            .parse()
            .expect("the store's address");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let killed = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let dying = killed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if fate == Fate::Die && dying.load(Ordering::SeqCst) {
                    break; // dropping the listener: connections are refused from now on
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                for s in [&client, &server] {
                    live.lock().unwrap().push(s.try_clone().expect("clone"));
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (kill, all) = (dying.clone(), live.clone());
                std::thread::spawn(move || relay(client, server, Some((kill, all, addr, fate))));
                std::thread::spawn(move || relay(s2, c2, None));
            }
        });
        DyingStore { addr, killed }
    }

    /// Waits until `client` has asked for a pack (the relay has met its fate); fails if it
    /// ends first, or has not asked within the deadline.
    fn wait_for_pack_request(&self, client: &mut Proc) {
        let until = Instant::now() + common::DEADLINE;
        while !self.killed.load(Ordering::SeqCst) {
            assert!(
                !client.exited(),
                "the client ended before asking for a pack"
            );
            assert!(Instant::now() < until, "the client never asked for a pack");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn env(&self, server: &S3Server) -> Vec<(String, String)> {
        server
            .env()
            .into_iter()
            .map(|(k, v)| {
                if k == "AWS_ENDPOINT_URL" {
                    (k, format!("http://{}", self.addr))
                } else {
                    (k, v)
                }
            })
            .collect()
    }
}

type Kill = (
    Arc<AtomicBool>,
    Arc<Mutex<Vec<TcpStream>>>,
    std::net::SocketAddr,
    Fate,
);

/// Copies `from` to `to`; with `kill`, watches for a pack request and kills the store.
fn relay(mut from: TcpStream, mut to: TcpStream, kill: Option<Kill>) {
    let mut buf = [0u8; 16384];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((killed, live, addr, fate)) = &kill {
            tail.extend_from_slice(&buf[..n]);
            if tail.windows(7).any(|w| w == b"/packs/") {
                killed.store(true, Ordering::SeqCst);
                if *fate == Fate::Hang {
                    // The sockets stay open (`live` holds them); nothing is forwarded.
                    return;
                }
                for s in live.lock().unwrap().drain(..) {
                    let _ = s.shutdown(Shutdown::Both);
                }
                // Wake the accept loop so it sees `killed` and stops listening.
                let _ = TcpStream::connect(addr);
                break;
            }
            let keep = tail.len().saturating_sub(6);
            tail.drain(..keep);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Past 29 s on purpose: the retry count capped it there before (`--retry-secs` was not
/// the one bound).
const LONG_RETRY_SECS: u64 = 35;

#[test]
#[ignore = "needs s3s-fs: scripts/test installs it and runs the ignored tests"]
fn restore_from_a_store_killed_past_the_retry_bound_exits_1_at_the_bound() {
    let Some((server, _dir, _raw)) = s3_pushed("s3_store_killed") else {
        return;
    };
    let store = DyingStore::in_front_of(&server, Fate::Die);
    let started = Instant::now();
    let out = restore_fails(
        S3_URL,
        &store.env(&server),
        "percpu",
        LONG_RETRY_SECS,
        Duration::from_secs(LONG_RETRY_SECS + 15),
        &["gave up after"],
    );
    assert!(store.killed.load(Ordering::SeqCst), "{}", out.text());
    assert!(
        started.elapsed() >= Duration::from_secs(LONG_RETRY_SECS),
        "gave up before --retry-secs {LONG_RETRY_SECS}: {}",
        out.text()
    );
}

#[test]
fn image_pull_of_a_damaged_image_exits_1_and_leaves_no_file() {
    for how in [Damage::Removed, Damage::Corrupted, Damage::Truncated] {
        let (dir, url) = file_damaged("pull-damaged", how);
        let out_dir = dir.0.join("out");
        std::fs::create_dir_all(&out_dir).expect("dir");
        let mut cmd = uffdkit(["image", "pull", "--no-cache", "--retry-secs"]);
        cmd.arg(NOT_RETRIED_SECS.to_string())
            .arg(&url)
            .arg(out_dir.join("mem.raw"));
        let started = Instant::now();
        let f = Proc::start(cmd).finish_within(NOT_RETRIED + Duration::from_secs(30));
        assert!(started.elapsed() < NOT_RETRIED, "{}", f.text());
        assert_eq!(f.code(), Some(1), "{}", f.text());
        let left: Vec<_> = std::fs::read_dir(&out_dir)
            .expect("read")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}: {}", f.text());
    }
}

/// A peer frozen with chunks of the image locked in `cache`: an `image pull` through a
/// store that never answers its pack request, then SIGSTOPped — it holds the fetch locks
/// of the chunks it asked for and makes no progress. Returns it (killed when dropped), the
/// raw image, and the test's directory.
fn frozen_peer(test: &str) -> Option<(S3Server, Proc, PathBuf, Dir)> {
    let (server, dir, raw) = s3_pushed(test)?;
    let store = DyingStore::in_front_of(&server, Fate::Hang);
    let mut cmd = uffdkit(["image", "pull", S3_URL]);
    cmd.arg(dir.0.join("peer.raw"))
        .arg("--cache")
        .arg(dir.0.join("cache"))
        .envs(store.env(&server));
    let mut peer = Proc::start(cmd);
    // Its pack request is out: it holds the locks of the chunks it asked for.
    store.wait_for_pack_request(&mut peer);
    peer.signal(nix::sys::signal::Signal::SIGSTOP);
    Some((server, peer, raw, dir))
}

/// Another pull of the same image through the same cache overtakes a frozen peer instead
/// of waiting for its chunks: with `--retry-secs 600` (before: the deadline per chunk;
/// waiting even one would outlast [`FROZEN_PEER_BOUND`]), it ends and is the image.
#[test]
#[ignore = "needs s3s-fs: scripts/test installs it and runs the ignored tests"]
fn a_pull_sharing_the_cache_with_a_frozen_peer_overtakes_it() {
    let Some((server, _peer, raw, dir)) = frozen_peer("s3_frozen_peer_pull") else {
        return;
    };
    let mut cmd = uffdkit(["image", "pull", "--retry-secs", "600", S3_URL]);
    cmd.arg(dir.0.join("mem.raw"))
        .arg("--cache")
        .arg(dir.0.join("cache"))
        .envs(server.env());
    let f = Proc::start(cmd).finish_within(FROZEN_PEER_BOUND);
    assert!(f.status.success(), "{}", f.text());
    assert!(
        common::overtaken(&f) > 0,
        "the frozen peer's chunks: {}",
        f.text()
    );
    assert_eq!(
        std::fs::read(dir.0.join("mem.raw")).expect("the pulled image"),
        std::fs::read(&raw).expect("the pushed image"),
        "the pull is the image"
    );
}

/// How long a command sharing the cache with a frozen peer may take: far past what it
/// takes overtaking the peer (its patience, 1 s, and an 8 MiB fetch, on a starved
/// machine too), far short of waiting the retry deadline for each of the peer's chunks.
const FROZEN_PEER_BOUND: Duration = Duration::from_secs(110);

/// A restore sharing the cache with a frozen peer overtakes it instead of waiting for its
/// chunks: with `--retry-secs 600` (before: the deadline per chunk; waiting even one
/// would outlast [`FROZEN_PEER_BOUND`]), it ends and its memory is the image.
#[test]
#[ignore = "needs s3s-fs: scripts/test installs it and runs the ignored tests"]
fn a_restore_sharing_the_cache_with_a_frozen_peer_overtakes_it() {
    let Some((server, _peer, raw, dir)) = frozen_peer("s3_frozen_peer_restore") else {
        return;
    };
    let mut cmd = uffdkit([
        "restore",
        "--json",
        "--retry-secs",
        "600",
        "--touch",
        "1",
        "--image",
        S3_URL,
    ]);
    cmd.arg("--cache")
        .arg(dir.0.join("cache"))
        .arg("--reference")
        .arg(&raw)
        .envs(server.env());
    let f = Proc::start(cmd).finish_within(FROZEN_PEER_BOUND);
    assert!(f.status.success(), "{}", f.text());
    let v: serde_json::Value = serde_json::from_str(&f.stdout).expect("json");
    assert_eq!(v["verified"], true, "{}", f.text());
    assert!(
        common::overtaken(&f) > 0,
        "the frozen peer's chunks: {}",
        f.text()
    );
}

/// `image pull` terminated while its output is being written (its store hangs on the pack
/// request) removes the output: exit 128 + signal, nothing left in its directory.
#[test]
#[ignore = "needs s3s-fs: scripts/test installs it and runs the ignored tests"]
fn a_terminated_pull_leaves_no_output() {
    let Some((server, dir, _raw)) = s3_pushed("s3_terminated_pull") else {
        return;
    };
    let store = DyingStore::in_front_of(&server, Fate::Hang);
    let out = dir.0.join("out");
    std::fs::create_dir_all(&out).expect("dir");
    let mut cmd = uffdkit(["image", "pull", "--no-cache", S3_URL]);
    cmd.arg(out.join("mem.raw")).envs(store.env(&server));
    let mut pull = Proc::start(cmd);
    store.wait_for_pack_request(&mut pull);
    let left = || -> Vec<_> {
        std::fs::read_dir(&out)
            .expect("read")
            .flatten()
            .map(|e| e.file_name())
            .collect()
    };
    assert_eq!(left().len(), 1, "the partial output is there: {:?}", left());
    pull.signal(nix::sys::signal::Signal::SIGTERM);
    let f = pull.finish_within(Duration::from_secs(20));
    assert_eq!(f.code(), Some(143), "{}", f.text());
    assert!(left().is_empty(), "left behind: {:?}", left());
}

/// A store that accepts the pack request and never answers: the restore gives up at its
/// `--retry-secs`, not after the store client's request timeout (30 s).
#[test]
#[ignore = "needs s3s-fs: scripts/test installs it and runs the ignored tests"]
fn restore_from_a_store_that_never_answers_exits_1_at_the_bound() {
    let Some((server, _dir, _raw)) = s3_pushed("s3_store_hangs") else {
        return;
    };
    let store = DyingStore::in_front_of(&server, Fate::Hang);
    restore_fails(
        S3_URL,
        &store.env(&server),
        "percpu",
        3,
        // Short of the request timeout it must not wait for, with room for a starved machine.
        Duration::from_secs(28),
        &["no answer within the retry bound"],
    );
}
