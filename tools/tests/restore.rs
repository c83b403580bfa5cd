//! `uffdkit restore` run as a user runs it: a chunked image's URL with the default
//! options, against the file it was pushed from.

use crate::common;

use common::{run, temp, uffdkit};

/// A directory removed when the test ends, however it ends.
struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A raw image pushed to a `file://` store; returns the file and the image's URL.
fn pushed(dir: &Dir, bytes: usize) -> (std::path::PathBuf, String) {
    std::fs::create_dir_all(&dir.0).expect("dir");
    let raw = dir.0.join("mem.raw");
    common::image(&raw, bytes);
    let url = format!("file://{}/store/img", dir.0.display());
    let mut push = uffdkit(["image", "push"]);
    push.arg(&raw).arg(&url);
    let push = run(push);
    assert!(push.status.success(), "{}", push.text());
    (raw, url)
}

#[test]
fn restore_of_an_image_url_works_with_the_default_options() {
    let dir = Dir(temp("restore-url"));
    let (raw, url) = pushed(&dir, 8 << 20);
    let mut cmd = uffdkit(["restore", "--json", "--image", &url, "--reference"]);
    cmd.arg(&raw);
    let out = run(cmd);
    assert!(out.status.success(), "{}", out.text());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(v["verified"], true, "{}", out.text());
    let detail = &v["results"][0]["detail"];
    assert_eq!(
        detail["mode"],
        "percpu",
        "a handler mode chosen: {}",
        out.text()
    );
}

#[test]
fn sigbus_asked_for_a_chunked_source_is_a_usage_error_naming_the_option() {
    let dir = Dir(temp("restore-sigbus"));
    let (_raw, url) = pushed(&dir, 1 << 20);
    let out = run(uffdkit(["restore", "--image", &url, "--mode", "sigbus"]));
    assert_eq!(out.code(), Some(2), "{}", out.text());
    assert!(
        out.stderr
            .contains("--mode sigbus cannot serve a chunked source"),
        "{}",
        out.text()
    );
}
