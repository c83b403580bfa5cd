//! Helpers shared by chunked's integration tests.
#![allow(dead_code)] // each test file uses its own part

use std::path::PathBuf;

/// A scratch directory (a store root, for `file://` URLs), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh, empty directory unique to this test process.
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("chunked-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create a scratch directory");
        TempDir(p)
    }

    /// The `file://` URL of image `name` in this directory.
    pub fn url(&self, name: &str) -> String {
        format!("file://{}/{name}", self.0.display())
    }

    /// A path in this directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An error and its causes, as one line of text.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        text += &format!(": {c}");
        cause = c.source();
    }
    text
}
