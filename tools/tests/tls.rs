//! TLS from the command line, as an operator runs it: certificates for two hosts made by
//! the README's recipe (`scripts/tls-certs`, openssl) secure a migration between
//! `migrate source` and `migrate dest` (each checking the other's name) and a restore by
//! `fc-handler --source` from `uffdkit serve`; a plaintext peer of a TLS server, and a
//! peer certified by another CA, are refused each with its own words; `migrate local
//! --tls` runs with certificates it makes itself; `--help` says a pre-shared key leaves
//! pages unencrypted.

use crate::common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{temp, uffdkit, wait_listening, write_key, Finished, Proc};

/// A test's directory, removed when it ends however it ends.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = temp(name);
        std::fs::create_dir_all(&dir).expect("make the test's directory");
        Dir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the README's recipe: a CA in `pki` and a certificate for each of `hosts`
/// (`NAME[,NAME…]`). False (after saying so loudly) where openssl is missing.
fn certificates(test: &str, pki: &Path, hosts: &[&str]) -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/tls-certs");
    if Command::new("openssl").arg("version").output().is_err() {
        testkit::skip(test, "openssl is not installed (scripts/test installs it)");
        return false;
    }
    let out = Command::new(script)
        .arg(pki)
        .args(hosts)
        .output()
        .expect("run scripts/tls-certs");
    assert!(
        out.status.success(),
        "scripts/tls-certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// `--tls-cert`, `--tls-key`, `--tls-ca` of `host`'s files in `pki`.
fn tls_args(pki: &Path, host: &str) -> Vec<PathBuf> {
    vec![
        "--tls-cert".into(),
        pki.join(format!("{host}.pem")),
        "--tls-key".into(),
        pki.join(format!("{host}.key")),
        "--tls-ca".into(),
        pki.join("ca.pem"),
    ]
}

/// Starts a command that prints `LISTEN <addr>` first; returns it and the address.
fn listening(cmd: Command) -> (Proc, String) {
    let (proc, line) = Proc::start_reading_first_line(cmd);
    match line.trim().strip_prefix("LISTEN ") {
        Some(addr) => {
            let addr = addr.to_string();
            (proc, addr)
        }
        None => panic!(
            "no LISTEN line: {}",
            proc.finish_within(Duration::from_secs(5)).text()
        ),
    }
}

fn report(f: &Finished, who: &str) -> serde_json::Value {
    assert!(f.status.success(), "{who}: {}", f.text());
    let last = f.stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{who} report: {e}: {}", f.text()))
}

/// Certificates for `dst.test` (dialled at 127.0.0.1) and `src.test` in `pki`, then a
/// `migrate dest` requiring `peer_name` and a `migrate source` of `size` to it, both with
/// `extra` options; both finished.
fn migration(
    test: &str,
    pki: &Dir,
    peer_name: &str,
    size: &str,
    extra: &[&str],
) -> Option<(Finished, Finished)> {
    if !certificates(test, &pki.0, &["dst.test,127.0.0.1", "src.test"]) {
        return None;
    }
    let mut d = uffdkit(["migrate", "dest", "--listen", "127.0.0.1:0", "--json"]);
    d.args(["--progress", "lines", "--mode", "thread"])
        .args(extra)
        .args(tls_args(&pki.0, "dst.test"))
        .args(["--tls-peer-name", peer_name]);
    let (d, addr) = listening(d);
    let mut s = uffdkit(["migrate", "source", "--json", "--connect", &addr]);
    s.args(["--progress", "lines", "--size", size])
        .args(extra)
        .args(tls_args(&pki.0, "src.test"));
    let s = Proc::start(s).finish_within(Duration::from_secs(120));
    Some((s, d.finish_within(Duration::from_secs(60))))
}

#[test]
fn a_migration_between_two_hosts_certified_by_the_readme_recipe_checks_both_names() {
    let test = "a_migration_between_two_hosts_certified_by_the_readme_recipe";
    let pki = Dir::new("mig-pki");
    // The destination is dialled at 127.0.0.1; the source is known by its name only.
    let Some((s, d)) = migration(test, &pki, "src.test", "32M", &[]) else {
        return;
    };
    let (src, dst) = (report(&s, "source"), report(&d, "destination"));
    assert_eq!(src["pages"], 8192, "{}", s.text());
    assert_eq!(src["verified"], src["pages"], "every page: {}", s.text());
    assert_eq!(dst["reconnects"], 0, "{}", d.text());
}

#[test]
fn a_destination_requiring_another_peer_name_refuses_the_source_saying_so() {
    let test = "a_destination_requiring_another_peer_name";
    let pki = Dir::new("name-pki");
    let Some((s, d)) = migration(test, &pki, "other-source.test", "4M", &["--give-up", "5"]) else {
        return;
    };
    for (who, f) in [("source", &s), ("destination", &d)] {
        assert_eq!(f.code(), Some(1), "{who} gives up: {}", f.text());
    }
    assert!(
        s.stderr.contains("refused this side's certificate"),
        "the source is told its certificate was refused: {}",
        s.text()
    );
    assert!(
        d.stderr
            .contains("not valid for the name other-source.test"),
        "the destination names the name it wanted: {}",
        d.text()
    );
}

/// `uffdkit serve` of `mem` on loopback TCP with `security` options.
fn serve(mem: &Path, security: &[PathBuf]) -> (Proc, String) {
    let mut cmd = uffdkit(["serve", "--listen", "127.0.0.1:0", "--image"]);
    cmd.arg(mem).args(security);
    listening(cmd)
}

/// `fc-handler SOCK --source ADDR SECURITY…` and a verifying `fc-client`; both finished.
fn restore(sock: &Path, mem: &Path, addr: &str, security: &[PathBuf]) -> (Finished, Finished) {
    let mut h = uffdkit([OsStr::new("fc-handler"), sock.as_os_str()]);
    h.args(["--source", addr, "--give-up", "5", "--mode", "thread"])
        .args(security);
    let mut h = Proc::start(h);
    wait_listening(sock, &mut h);
    let mut c = uffdkit(["fc-client", "--socket"]);
    c.arg(sock).arg("--mem-file").arg(mem);
    let c = Proc::start(c).finish_within(Duration::from_secs(90));
    (h.finish(), c)
}

/// `fc-handler SOCK --source ADDR SECURITY…` refused by the page server: it connects
/// before it listens, so it exits without a socket; finished.
fn refused(sock: &Path, addr: &str, security: &[PathBuf]) -> Finished {
    let mut h = uffdkit([OsStr::new("fc-handler"), sock.as_os_str()]);
    h.args(["--source", addr, "--give-up", "5"]).args(security);
    let h = Proc::start(h).finish();
    assert_eq!(h.code(), Some(1), "{}", h.text());
    assert!(!sock.exists(), "no socket left: {}", h.text());
    h
}

#[test]
fn fc_handler_restores_from_a_tls_page_server_and_plaintext_or_a_stranger_ca_is_refused() {
    let test = "fc_handler_restores_from_a_tls_page_server";
    let (dir, other) = (Dir::new("fc-tls"), Dir::new("fc-tls-other"));
    if !certificates(test, &dir.0, &["server.test,127.0.0.1", "vmm.test"])
        || !certificates(test, &other.0, &["intruder.test"])
    {
        return;
    }
    let (sock, mem, key) = (dir.join("fc.sock"), dir.join("mem"), dir.join("psk"));
    common::image(&mem, 16 << 20);
    write_key(&key, "a-key-of-enough-length");
    let (server, addr) = serve(&mem, &tls_args(&dir.0, "server.test"));

    let (h, c) = restore(&sock, &mem, &addr, &tls_args(&dir.0, "vmm.test"));
    assert!(
        c.status.success(),
        "client: {}\nhandler: {}",
        c.text(),
        h.text()
    );
    assert!(c.stdout.contains("touched and verified"), "{}", c.text());
    assert!(h.status.success(), "{}", h.text());

    // A plaintext handler: both ends say which security each spoke.
    let h = refused(&sock, &addr, &["--key-file".into(), key.clone()]);
    assert!(
        h.stderr.contains("TLS") && h.stderr.contains("pre-shared key"),
        "the mismatch is named: {}",
        h.text()
    );
    // A handler trusting another CA: it does not know the server's issuer.
    let h = refused(&sock, &addr, &tls_args(&other.0, "intruder.test"));
    assert!(
        h.stderr
            .contains("the peer's certificate is not issued by a trusted CA"),
        "{}",
        h.text()
    );
    // A handler certified by another CA: the server does not know its issuer, and says so.
    let mut intruder = tls_args(&other.0, "intruder.test");
    intruder[5] = dir.join("ca.pem");
    let h = refused(&sock, &addr, &intruder);
    assert!(
        h.stderr
            .contains("refused this side's certificate (TLS alert UnknownCA)"),
        "{}",
        h.text()
    );
    drop(server); // killed: `serve` runs until stopped
}

#[test]
fn migrate_local_tls_auto_moves_and_verifies_a_region_over_tls() {
    let f = common::run(uffdkit([
        "migrate",
        "local",
        "--size",
        "16M",
        "--precopy-rounds",
        "1",
        "--tls",
    ]));
    assert!(f.status.success(), "{}", f.text());
    assert!(
        f.stdout.contains("TLS 1.3"),
        "the link is named: {}",
        f.text()
    );
    assert!(
        f.stdout.contains("4096 of 4096 pages verified"),
        "{}",
        f.text()
    );
}

#[test]
fn help_says_a_pre_shared_key_leaves_pages_unencrypted() {
    for cmd in [
        &["serve", "--help"][..],
        &["migrate", "source", "--help"],
        &["migrate", "dest", "--help"],
        &["fc-handler", "--help"],
    ] {
        let f = common::run(uffdkit(cmd));
        assert!(f.status.success(), "{cmd:?}: {}", f.text());
        for flag in ["--tls-cert", "--tls-key", "--tls-ca", "--key-file"] {
            assert!(
                f.stdout.contains(flag),
                "{cmd:?} offers {flag}: {}",
                f.stdout
            );
        }
        let text = f.stdout.to_lowercase();
        assert!(
            text.contains("unencrypted") && text.contains("trusted links"),
            "{cmd:?} says what a key alone leaves open: {}",
            f.stdout
        );
    }
}

#[test]
fn netbench_tls_reports_tls_against_plaintext_and_raw_tcp_from_one_run() {
    let f = common::run(uffdkit([
        "migrate",
        "netbench",
        "--tls",
        "--json",
        "--size",
        "8M",
        "--idle-size",
        "4M",
        "--touches",
        "50",
        "--repeat",
        "1",
    ]));
    assert!(f.status.success(), "{}", f.text());
    let v: serde_json::Value = serde_json::from_str(f.stdout.trim()).expect("JSON");
    let tls = &v["tls"];
    let positive = |x: &serde_json::Value| x.as_f64().is_some_and(|x| x > 0.0);
    for (what, x) in [
        ("TLS stream", &tls["stream_mib_s"]),
        ("TLS vs raw TCP", &tls["stream_vs_raw_same_cpu"]),
        ("TLS vs plaintext", &tls["stream_vs_plaintext"]),
        ("TLS idle p50", &tls["requested_idle_us"]["p50"]),
        ("TLS idle p99", &tls["requested_idle_us"]["p99"]),
        ("TLS loaded p50", &tls["requested_loaded_us"]["p50"]),
        ("plaintext stream", &v["stream_mib_s"]),
        ("raw TCP", &v["raw_tcp_same_cpu_mib_s"]),
        ("round trip, pinned same CPU", &v["rtt_same_cpu_us"]["p50"]),
        (
            "raw TCP CPU per GiB",
            &v["cpu_ms_per_gib"]["raw_tcp_same_cpu"],
        ),
        ("stream CPU per GiB", &v["cpu_ms_per_gib"]["stream"]),
        ("TLS stream CPU per GiB", &tls["stream_cpu_ms_per_gib"]),
        (
            "round trip, pinned across CPUs",
            &v["rtt_cross_cpu_us"]["p50"],
        ),
    ] {
        assert!(positive(x), "{what}: {x} in {v}");
    }
    assert_eq!(
        tls["requested_idle_us"]["count"], 50,
        "every touch faulted: {v}"
    );
    assert_eq!(v["huge_pages"], false, "the destination's default: {v}");
}
