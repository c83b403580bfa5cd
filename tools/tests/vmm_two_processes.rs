//! Live migration of the running guest between two `uffdkit-vmm` processes: `migrate-in`
//! listens, `migrate-out` boots a guest and migrates it while it rewrites its memory; the
//! vCPU state travels in the protocol's RUN (no shared directory); the destination resumes
//! the guest at RUN, where it goes on rewriting its memory during postcopy, and checks its
//! checksum against the source's model and its own commands.

use crate::vmm_common as common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_available, SnapshotDir};

/// Waits (bounded) for `child`; kills it if the bound passes.
fn wait(mut child: Child, what: &str) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut out = String::new();
            if let Some(mut stdout) = child.stdout.take() {
                stdout.read_to_string(&mut out).expect("read stdout");
            }
            return (status, out);
        }
        if Instant::now() > deadline {
            child.kill().expect("kill");
            panic!("{what} did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes key file `name` (0600) in `dir`.
fn write_key(dir: &std::path::Path, name: &str, key: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, key))
        .expect("write a key");
    path
}

/// Starts `uffdkit-vmm migrate-in` with `key` on a 16 MiB guest; returns it, the rest of
/// its stdout, and the address it listens on.
fn migrate_in(key: &std::path::Path) -> (Child, BufReader<std::process::ChildStdout>, String) {
    let mut dest = Command::new(env!("CARGO_BIN_EXE_uffdkit-vmm"))
        .arg("migrate-in")
        .arg("--key-file")
        .arg(key)
        .args(["--mib", "16"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start migrate-in");
    let mut lines = BufReader::new(dest.stdout.take().expect("its stdout"));
    let mut first = String::new();
    lines.read_line(&mut first).expect("its address");
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("migrate-in said {first:?}"))
        .to_owned();
    (dest, lines, addr)
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn migration_between_two_vmm_processes_matches_checksum() {
    let test = "migration_between_two_vmm_processes_matches_checksum";
    if !kvm_available(test) {
        return;
    }
    let dir = SnapshotDir::new(test);
    let key = write_key(dir.path(), "key", b"uffdkit-vmm-two-processes-key");
    let (dest, mut lines, addr) = migrate_in(&key);

    let mut source = Command::new(env!("CARGO_BIN_EXE_uffdkit-vmm"));
    source
        .arg("migrate-out")
        .args(["--to", &addr, "--mib", "16"]);
    source.arg("--key-file").arg(&key);
    let source = source
        .stdout(Stdio::piped())
        .spawn()
        .expect("start migrate-out");
    let (src_status, src_out) = wait(source, "migrate-out");
    let mut rest = String::new();
    lines
        .read_to_string(&mut rest)
        .expect("migrate-in's output");
    let (dst_status, _) = wait(dest, "migrate-in");
    eprintln!("source: {src_out}destination: {rest}");
    assert!(src_status.success(), "migrate-out: {src_status}\n{src_out}");
    assert!(dst_status.success(), "migrate-in: {dst_status}\n{rest}");
    assert!(rest.contains("matches the source's model"), "{rest}");
}

/// A migration that fails before the switch (here the destination refuses the source's
/// key) ends `migrate-out` with the error; it used to wait forever for a guest nobody
/// told to stop, printing nothing.
#[test]
#[ignore = "needs /dev/kvm: scripts/test runs the ignored tests and says SKIPPED where it is missing"]
fn migrate_out_refused_before_the_switch_ends_with_the_error() {
    let test = "migrate_out_refused_before_the_switch_ends_with_the_error";
    if !kvm_available(test) {
        return;
    }
    let dir = SnapshotDir::new(test);
    let theirs = write_key(dir.path(), "theirs", b"uffdkit-vmm-the-destinations-key");
    let ours = write_key(dir.path(), "ours", b"uffdkit-vmm-another-key-entirely");
    let (mut dest, _lines, addr) = migrate_in(&theirs);
    let errors = dir.path().join("stderr");
    let source = Command::new(env!("CARGO_BIN_EXE_uffdkit-vmm"))
        .arg("migrate-out")
        .args(["--to", &addr, "--mib", "16"])
        .arg("--key-file")
        .arg(&ours)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&errors).expect("a file for its stderr"))
        .spawn()
        .expect("start migrate-out");
    let (status, _) = wait(source, "migrate-out");
    let _ = dest.kill();
    let _ = dest.wait();
    let said = std::fs::read_to_string(&errors).expect("its stderr");
    assert!(!status.success(), "migrate-out: {status}\n{said}");
    assert!(said.contains("key"), "the refusal, said: {said}");
}
