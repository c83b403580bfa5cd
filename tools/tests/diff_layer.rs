//! A Firecracker diff snapshot pushed as a chunked layer, as a user does it: refused until
//! told what its holes mean; told they inherit, the layer restores a VM (fc-handler
//! `--image`, the Firecracker-like client verifying every page) to the merged memory.

use crate::common;

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;

use common::{run, temp, uffdkit, wait_listening, Proc};

struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const PS: usize = 4096;

#[test]
fn a_diff_pushed_as_a_layer_is_refused_unless_its_holes_inherit_and_then_restores() {
    let dir = Dir(temp("diff-layer"));
    std::fs::create_dir_all(&dir.0).expect("dir");
    let (base, diff, merged) = (
        dir.0.join("base.mem"),
        dir.0.join("diff.mem"),
        dir.0.join("merged.mem"),
    );
    common::image(&base, 4 << 20);
    let mut memory = std::fs::read(&base).expect("read");
    let file = std::fs::File::create(&diff).expect("create");
    file.set_len(memory.len() as u64).expect("all hole");
    for page in [0, 1, 2, 77, 300, 301, 1023] {
        let bytes = vec![0xD1 ^ page as u8; PS];
        file.write_all_at(&bytes, (page * PS) as u64)
            .expect("write");
        memory[page * PS..(page + 1) * PS].copy_from_slice(&bytes);
    }
    std::fs::write(&merged, &memory).expect("merged");
    let store = format!("file://{}/store", dir.0.display());
    let (base_url, layer_url) = (format!("{store}/base"), format!("{store}/layer"));

    let mut push = uffdkit(["image", "push"]);
    push.arg(&base).arg(&base_url);
    let out = run(push);
    assert!(out.status.success(), "{}", out.text());
    let layer = |extra: &[&str]| {
        let mut push = uffdkit(["image", "push"]);
        push.arg(&diff)
            .args([&layer_url, "--parent", "base"])
            .args(extra);
        run(push)
    };
    let refused = layer(&[]);
    assert_eq!(refused.code(), Some(1), "{}", refused.text());
    assert!(
        refused.stderr.contains("has holes") && refused.stderr.contains("Firecracker diff"),
        "{}",
        refused.text()
    );
    let pushed = layer(&["--holes", "inherit"]);
    assert!(pushed.status.success(), "{}", pushed.text());

    let sock = dir.0.join("fc.sock");
    let cache = dir.0.join("cache");
    let mut handler = uffdkit([OsStr::new("fc-handler"), sock.as_os_str()]);
    handler
        .args(["--image", &layer_url])
        .arg("--cache")
        .arg(&cache);
    let mut handler = Proc::start(handler);
    wait_listening(&sock, &mut handler);
    let mut client = uffdkit(["fc-client", "--socket"]);
    client.arg(&sock).arg("--mem-file").arg(&merged);
    let client = run(client);
    let handler = handler.finish();
    assert!(
        client.status.success() && client.stdout.contains("touched and verified"),
        "client: {}\nhandler: {}",
        client.text(),
        handler.text()
    );
    assert!(handler.status.success(), "{}", handler.text());
}
