//! `uffdkit image` and `restore --image URL` end to end, against a real S3-compatible
//! server (`s3s-fs`) reached with credentials from the environment, as a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use testkit::s3::S3Server;

const BUCKET: &str = "images";

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("uffdkit-image-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn uffdkit(server: &S3Server, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uffdkit"));
    cmd.args(args).envs(server.env());
    cmd
}

fn success(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `pages` pages of a per-page pattern, every 5th page zero.
fn write_image(path: &Path, pages: usize) {
    let mut out = vec![0u8; pages * 4096];
    for (i, page) in out.chunks_exact_mut(4096).enumerate() {
        if i % 5 != 4 {
            page.fill((i % 251) as u8 + 1);
            page[..8].copy_from_slice(&(i as u64).to_le_bytes());
        }
    }
    std::fs::write(path, out).unwrap();
}

#[test]
#[ignore = "needs s3s-fs: scripts/test installs it and runs the ignored tests"]
fn push_prints_the_dedupe_ratio_and_inspect_reads_the_manifest() {
    let Some(server) = S3Server::start("image_push_inspect", BUCKET) else {
        return;
    };
    let dir = TempDir::new("push");
    let raw = dir.0.join("mem.raw");
    write_image(&raw, 2048);
    let raw_s = raw.to_str().unwrap();
    let url = "s3://images/snap/one";
    let first = success(
        &uffdkit(&server, &["image", "push", raw_s, url])
            .output()
            .unwrap(),
    );
    assert!(first.contains("16 new"), "{first}");
    // The same content under another name stores nothing new.
    let again = uffdkit(
        &server,
        &["image", "push", "--json", raw_s, "s3://images/snap/two"],
    )
    .output()
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&success(&again)).unwrap();
    assert_eq!(v["new_chunks"], 0);
    assert_eq!(v["existing_chunks"], 16);
    let inspect = uffdkit(&server, &["image", "inspect", "--json", url])
        .output()
        .unwrap();
    let m: serde_json::Value = serde_json::from_str(&success(&inspect)).unwrap();
    assert_eq!(m["length"], 2048 * 4096);
    assert_eq!(m["chunk_size"], 512 * 1024);
    assert_eq!(m["hash"], "blake3");
    assert_eq!(m["data_chunks"], 16);
}

#[test]
#[ignore = "needs s3s-fs: scripts/test installs it and runs the ignored tests"]
fn two_restores_at_once_share_the_host_cache() {
    let Some(server) = S3Server::start("two_restores_share_the_cache", BUCKET) else {
        return;
    };
    let dir = TempDir::new("share");
    let raw = dir.0.join("mem.raw");
    let pages = 8192; // 32 MiB
    write_image(&raw, pages);
    let raw_s = raw.to_str().unwrap();
    let url = "s3://images/snap/shared";
    success(
        &uffdkit(&server, &["image", "push", raw_s, url])
            .output()
            .unwrap(),
    );
    let cache = dir.0.join("cache");
    let restore = || {
        uffdkit(
            &server,
            &[
                "restore",
                "--image",
                url,
                "--reference",
                raw_s,
                "--cache",
                cache.to_str().unwrap(),
                "--mode",
                "thread",
                "--touch",
                "1",
                "--writes",
                "0.3",
                // A bound against hanging only: two restores and the store starved of CPU
                // (pinned beside busy loops) took over 60 s to answer some reads.
                "--retry-secs",
                "600",
                "--json",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (a, b) = (restore(), restore());
    let outs = [a, b].map(|c| c.wait_with_output().unwrap());
    // 32 MiB in 512 KiB chunks, none all zero.
    let data_chunks = 64u64;
    let (mut fetched, mut overtaken) = (0u64, 0u64);
    for out in &outs {
        let v: serde_json::Value = serde_json::from_str(&success(out)).unwrap();
        assert_eq!(v["verified"], true);
        let d = &v["results"][0]["detail"];
        let count = |k: &str| d[k].as_u64().unwrap_or_else(|| panic!("{k} in {d}"));
        assert_eq!(
            count("chunks_fetched") + count("cache_hits"),
            data_chunks,
            "each restore took every chunk once, from the store or the cache: {d}"
        );
        fetched += count("chunks_fetched");
        overtaken += count("overtaken");
    }
    // Fetched once per host, whatever the interleaving: the one process holding a chunk's
    // fetch lock fetches it and the other takes it from the cache (so, with the counts
    // above, the cache served every chunk fetched once to the other restore); only a
    // process that overtook a peer (one that published nothing for the patience: starved
    // of CPU, say) fetches a chunk the peer fetches too.
    assert!(
        (data_chunks..=data_chunks + overtaken).contains(&fetched),
        "two restores fetched {fetched} chunks of a {data_chunks}-chunk image from the store, \
         {overtaken} of them overtaken from the other"
    );
}

/// `fc-handler --image URL` serves a Firecracker-like client (`uffdkit fc-client`, which
/// registers its memory, hands over the uffd and verifies every page against the file
/// the image was pushed from) from an image in the object store.
#[test]
#[ignore = "needs s3s-fs: scripts/test installs it and runs the ignored tests"]
fn fc_handler_restores_a_vm_from_an_image_in_the_object_store() {
    let Some(server) = S3Server::start("image_fc_handler", BUCKET) else {
        return;
    };
    let dir = TempDir::new("fc");
    let raw = dir.0.join("mem.raw");
    write_image(&raw, 2048); // 8 MiB
    let (raw_s, url) = (raw.to_str().unwrap(), "s3://images/vm/fc");
    success(
        &uffdkit(&server, &["image", "push", raw_s, url])
            .output()
            .unwrap(),
    );
    let sock = dir.0.join("fc.sock");
    let cache = dir.0.join("cache");
    let mut handler = uffdkit(
        &server,
        &[
            "fc-handler",
            sock.to_str().unwrap(),
            "--image",
            url,
            "--cache",
            cache.to_str().unwrap(),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if std::time::Instant::now() > deadline || handler.try_wait().unwrap().is_some() {
            let _ = handler.kill();
            panic!(
                "{}",
                String::from_utf8_lossy(&handler.wait_with_output().unwrap().stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let client = Command::new(env!("CARGO_BIN_EXE_uffdkit"))
        .args([
            "fc-client",
            "--socket",
            sock.to_str().unwrap(),
            "--mem-file",
            raw_s,
        ])
        .args(["--regions", "2"])
        .output()
        .unwrap();
    let out = handler.wait_with_output().unwrap();
    let handler_text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        success(&client).contains("touched and verified"),
        "handler: {handler_text}"
    );
    assert!(out.status.success(), "{handler_text}");
    assert!(
        handler_text.contains("from the object store"),
        "{handler_text}"
    );
}
