//! Test support shared by the workspace's integration tests.

use std::io::Write;

/// Reports a skipped case loudly: on stderr and in `target/uffdkit-skips.log`, which
/// `scripts/test` (and so `.ci/run`) prints at the end of the run. A test that cannot run
/// here calls this and returns; it never passes silently.
pub fn skip(test: &str, reason: &str) {
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("\n*** {line} ***\n");
    let log = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/uffdkit-skips.log");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(f, "{line}");
    }
}

pub mod s3;
