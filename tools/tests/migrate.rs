//! `uffdkit migrate` and `uffdkit serve` end to end, as separate processes over real
//! sockets — and through testkit's fault-injecting proxy, which resets and silently
//! freezes their connections: both ends pause, say why, resume once per cut and verify
//! every page; when the network never heals, both give up within their bound and exit 1;
//! a restore through `fc-handler --source` survives the same cuts, or, cut off for good,
//! kills the VMM (`fc-client`) rather than leave it hanging.

use crate::common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{temp, uffdkit, wait_listening, write_key, Finished, Proc};
use postcopy::wire::Channel;
use testkit::proxy::{CutMode, Direction, Proxy, ProxyOptions, Target};

/// The stdout of `uffdkit ARGS`, which must succeed.
fn success_text(args: &[&str]) -> String {
    let f = common::run(uffdkit(args));
    assert!(f.status.success(), "{}", f.text());
    f.stdout
}

/// A test's files, removed when it ends however it ends.
struct Files(Vec<std::path::PathBuf>);

impl Drop for Files {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Tags a postcopy connection `main` or `urgent` from its HELLO.
fn channel_of(first: &[u8]) -> Option<&'static str> {
    postcopy::wire::peek_channel(first).map(|c| c.map_or("other", Channel::name))
}

/// A proxy to `addr` (`host:port`) counting page bytes on `main` going `direction`.
fn proxy(addr: &str, direction: Direction) -> Proxy {
    let opts = ProxyOptions {
        classify: channel_of,
        counted: "main",
        direction,
        settle: 4096,
    };
    Proxy::start(addr.parse().expect("an address"), opts).expect("start the proxy")
}

/// Starts a command that prints `LISTEN <addr>` first on stdout; returns it (its output
/// drained from then on) and the address.
fn listening(cmd: Command) -> (Proc, String) {
    let (proc, line) = Proc::start_reading_first_line(cmd);
    let addr = line.trim().strip_prefix("LISTEN ").map(str::to_string);
    let Some(addr) = addr else {
        let f = proc.finish_within(Duration::from_secs(5));
        panic!("no LISTEN line: {}", f.text());
    };
    (proc, addr)
}

fn key_file(name: &str) -> std::path::PathBuf {
    let key = temp(name);
    write_key(&key, b"a-key-of-enough-length");
    key
}

/// `migrate dest` on loopback with `args`.
fn dest(key: &Path, args: &[&str]) -> (Proc, String) {
    let mut cmd = uffdkit(["migrate", "dest", "--listen", "127.0.0.1:0", "--json"]);
    cmd.args(["--progress", "lines", "--mode", "thread"])
        .args(args)
        .arg("--key-file")
        .arg(key);
    listening(cmd)
}

/// `migrate source` to `addr` with `args`.
fn source(key: &Path, addr: &str, args: &[&str]) -> Proc {
    let mut cmd = uffdkit(["migrate", "source", "--json", "--connect", addr]);
    cmd.args(["--progress", "lines"])
        .args(args)
        .arg("--key-file")
        .arg(key);
    Proc::start(cmd)
}

fn report(f: &Finished, who: &str) -> serde_json::Value {
    assert!(f.status.success(), "{who}: {}", f.text());
    let last = f.stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{who} report: {e}: {}", f.text()))
}

#[test]
fn migrate_local_moves_a_written_region_between_two_processes_and_verifies_it() {
    let text = success_text(&[
        "migrate",
        "local",
        "--size",
        "32M",
        "--precopy-rounds",
        "2",
        "--workload",
        "hot",
    ]);
    assert!(text.contains("8192 of 8192 pages verified"), "{text}");
    assert!(text.contains("downtime"), "{text}");
    assert!(text.contains("requested pages"), "{text}");
    assert!(text.contains("reconnects 0"), "{text}");
}

#[test]
fn migrate_local_reports_when_the_destination_resumed_within_the_downtime() {
    let text = success_text(&["migrate", "local", "--size", "16M", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let downtime = v["source"]["downtime_ms"].as_f64().expect("downtime_ms");
    let resumed = v["stop_to_resume_ms"].as_f64().expect("stop_to_resume_ms");
    // The destination resumes before it acknowledges RUN, which ends the downtime the
    // source measures from the same stop.
    assert!(
        resumed > 0.0 && resumed <= downtime,
        "stop → resume {resumed} ms, downtime {downtime} ms"
    );
    assert_eq!(v["source"]["verified"], 4096);
}

#[test]
fn the_source_region_is_thp_backed_unless_asked_for_base_pages() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.is_empty() || thp.contains("[never]") {
        let why = format!("transparent huge pages are off here ({})", thp.trim());
        testkit::skip(
            "the_source_region_is_thp_backed_unless_asked_for_base_pages",
            &why,
        );
        return;
    }
    let huge = |memory: &str| {
        // 1 MiB/s of sequential writes: over a run of a second or two they split (a
        // write to a protected huge page splits it) one or two of the eight 2 MiB pages.
        let text = success_text(&[
            "migrate",
            "local",
            "--size",
            "16M",
            "--workload",
            "seq",
            "--dirty-rate",
            "1",
            "--source-memory",
            memory,
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(v["source"]["source_memory"], memory);
        assert_eq!(v["source"]["verified"], 4096);
        v["source"]["huge_mapped_at_stop"]
            .as_u64()
            .expect("huge_mapped_at_stop")
    };
    let thp = huge("thp");
    assert!(
        thp >= 8 << 20,
        "{thp} bytes of 16 MiB mapped huge at the stop"
    );
    assert_eq!(huge("4k"), 0);
}

#[test]
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn migrate_local_json_with_2mib_pages_over_unix() {
    if !testkit::hugepages::available("migrate_local_json_with_2mib_pages_over_unix", 16) {
        return;
    }
    let text = success_text(&[
        "migrate",
        "local",
        "--size",
        "16M",
        "--page-size",
        "2m",
        "--via",
        "unix",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["source"]["pages"], 8);
    assert_eq!(v["source"]["verified"], 8);
    assert_eq!(v["dest"]["page_size"], 2 << 20);
}

#[test]
fn a_dying_destination_leaves_the_source_paused_then_failing_cleanly() {
    let key = key_file("die.key");
    let _files = Files(vec![key.clone()]);
    let (d, addr) = dest(&key, &["--die-after-pages", "200"]);
    let s = source(
        &key,
        &addr,
        &["--size", "64M", "--precopy-rounds", "0", "--give-up", "2"],
    )
    .finish();
    let d = d.finish();
    assert_eq!(
        d.signal(),
        Some(9),
        "the destination killed itself: {}",
        d.text()
    );
    assert_eq!(
        s.code(),
        Some(1),
        "a clean failure, not a crash: {}",
        s.text()
    );
    assert!(s.stderr.contains("gave up"), "{}", s.text());
    assert!(
        s.stderr.contains("Paused (Postcopy)"),
        "progress showed the pause: {}",
        s.text()
    );
}

#[test]
fn a_migration_through_a_cutting_proxy_pauses_says_why_and_resumes_once_per_cut() {
    let key = key_file("cut.key");
    let _files = Files(vec![key.clone()]);
    let liveness = ["--silence", "2", "--give-up", "60"];
    let (d, addr) = dest(&key, &liveness);
    let proxy = proxy(&addr, Direction::ToListener);
    proxy.plan(vec![
        testkit::proxy::Cut {
            mode: CutMode::Freeze,
            target: Target::All,
            after: 8 << 20,
        },
        testkit::proxy::Cut {
            mode: CutMode::Reset,
            target: Target::Tag("main"),
            after: 8 << 20,
        },
    ]);
    let via = proxy.addr().to_string();
    let mut args = vec!["--size", "64M", "--precopy-rounds", "0"];
    args.extend(liveness);
    let s = source(&key, &via, &args).finish_within(Duration::from_secs(120));
    let d = d.finish_within(Duration::from_secs(60));
    let (src, dst) = (report(&s, "source"), report(&d, "destination"));
    assert_eq!(proxy.cuts(), 2, "both cuts landed");
    assert_eq!(src["reconnects"], 2, "{}", s.text());
    assert_eq!(dst["reconnects"], 2, "{}", d.text());
    assert_eq!(
        src["verified"],
        src["pages"],
        "every page verified: {}",
        s.text()
    );
    for f in [&s, &d] {
        // A pause this short lasts less than the progress sampling; the log says it.
        assert!(
            f.stderr.contains("paused in "),
            "the pause is told: {}",
            f.text()
        );
        assert!(f.stderr.contains("resumed after"), "{}", f.text());
    }
    assert!(
        s.stderr.contains("silent for") || d.stderr.contains("silent for"),
        "the freeze is named as silence: {}\n{}",
        s.text(),
        d.text()
    );
}

#[test]
fn both_ends_give_up_and_exit_1_when_the_network_never_heals() {
    let key = key_file("heal.key");
    let _files = Files(vec![key.clone()]);
    // The destination's bound is also how long it waits for its first source, which
    // fills 64 MiB before it dials: 4-5 s of wall beside busy loops on one CPU (0.4 s of
    // CPU), when a 3 s bound there had both ends give up before any connection.
    let (mut d, addr) = dest(&key, &["--silence", "1", "--give-up", "10"]);
    let proxy = proxy(&addr, Direction::ToListener);
    let via = proxy.addr().to_string();
    let args = ["--size", "64M", "--precopy-rounds", "2"];
    let started = Instant::now();
    let mut s = source(
        &key,
        &via,
        &[&args[..], &["--silence", "1", "--give-up", "3"]].concat(),
    );
    // In precopy (the first round is 64 MiB), the network goes and never comes back.
    while proxy.connections() < 2 {
        // Bounded: an end that exits before its pair is up is a failure, never a hang.
        if s.exited() || d.exited() || started.elapsed() > common::DEADLINE {
            let (s, d) = (s.finish(), d.finish());
            panic!("no pair: source {}\ndestination {}", s.text(), d.text());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    proxy.partition(true);
    let (s, d) = (s.finish(), d.finish());
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "bounded: {:?}",
        started.elapsed()
    );
    for (who, f) in [("source", &s), ("destination", &d)] {
        assert_eq!(f.code(), Some(1), "{who} exits 1: {}", f.text());
        assert!(f.stderr.contains("gave up"), "{who}: {}", f.text());
    }
}

/// `uffdkit serve` of `mem` on loopback TCP.
fn serve(mem: &Path, key: &Path) -> (Proc, String) {
    let mut cmd = uffdkit(["serve", "--listen", "127.0.0.1:0", "--image"]);
    cmd.arg(mem).arg("--key-file").arg(key);
    listening(cmd)
}

/// `fc-handler SOCK --source ADDR --key-file KEY EXTRA…`, listening.
fn remote_handler(sock: &Path, addr: &str, key: &Path, extra: &[&str]) -> Proc {
    let mut cmd = uffdkit([OsStr::new("fc-handler"), sock.as_os_str()]);
    cmd.args(["--source", addr, "--key-file"])
        .arg(key)
        .args(extra);
    let mut h = Proc::start(cmd);
    wait_listening(sock, &mut h);
    h
}

fn fc_client(sock: &Path, mem: &Path) -> Proc {
    let mut cmd = uffdkit(["fc-client", "--socket"]);
    cmd.arg(sock).arg("--mem-file").arg(mem);
    Proc::start(cmd)
}

#[test]
fn fc_handler_restores_through_resets_and_freezes_of_its_page_server_link() {
    let (sock, mem, key) = (
        temp("cut-fc.sock"),
        temp("cut-fc.mem"),
        key_file("cut-fc.key"),
    );
    let _files = Files(vec![sock.clone(), mem.clone(), key.clone()]);
    common::image(&mem, 128 << 20);
    let (_server, addr) = serve(&mem, &key);
    let proxy = proxy(&addr, Direction::ToOpener);
    let mut cuts = proxy.plan_random(7, 3, 48 << 20, CutMode::Reset, Target::All);
    // Freezes hit both channels: with one alone, the client's faults could complete the
    // restore through the other before the silence is noticed.
    let kinds = [
        (CutMode::Reset, Target::Tag("urgent")),
        (CutMode::Freeze, Target::All),
        (CutMode::Reset, Target::Tag("main")),
    ];
    for (cut, (mode, target)) in cuts.iter_mut().zip(kinds) {
        (cut.mode, cut.target) = (mode, target);
    }
    proxy.plan(cuts);
    let via = proxy.addr().to_string();
    let h = remote_handler(&sock, &via, &key, &["--silence", "2", "--mode", "thread"]);
    let c = fc_client(&sock, &mem).finish_within(Duration::from_secs(120));
    let h = h.finish();
    assert!(
        c.status.success(),
        "every page verified: {}\n{}",
        c.text(),
        h.text()
    );
    assert!(c.stdout.contains("touched and verified"), "{}", c.text());
    assert!(h.status.success(), "{}", h.text());
    assert_eq!(proxy.cuts(), 3, "every cut landed: {}", h.text());
    assert!(
        h.stdout.contains("; 3 reconnections"),
        "one reconnection per cut: {}",
        h.text()
    );
}

#[test]
fn fc_handler_cut_off_from_its_page_server_gives_up_and_kills_the_vmm() {
    let (sock, mem, key) = (
        temp("off-fc.sock"),
        temp("off-fc.mem"),
        key_file("off-fc.key"),
    );
    let _files = Files(vec![sock.clone(), mem.clone(), key.clone()]);
    common::image(&mem, 64 << 20);
    let (_server, addr) = serve(&mem, &key);
    let proxy = proxy(&addr, Direction::ToOpener);
    // The partition comes after the first 8 MiB of the stream, and stays.
    proxy.plan(vec![testkit::proxy::Cut {
        mode: CutMode::Freeze,
        target: Target::All,
        after: 8 << 20,
    }]);
    let via = proxy.addr().to_string();
    let liveness = ["--silence", "1", "--give-up", "3", "--mode", "thread"];
    let h = remote_handler(&sock, &via, &key, &liveness);
    let c = fc_client(&sock, &mem);
    let started = Instant::now();
    while proxy.cuts() == 0 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
    proxy.partition(true);
    let (h, c) = (h.finish(), c.finish());
    assert_eq!(
        c.signal(),
        Some(9),
        "the VMM was killed: {}\n{}",
        c.text(),
        h.text()
    );
    assert_eq!(h.code(), Some(1), "{}", h.text());
    assert!(h.stderr.contains("gave up"), "{}", h.text());
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "bounded: {:?}",
        started.elapsed()
    );
}

/// `uffdkit serve` of an image file truncated under it: the pages the file lost are not
/// the image's any more, and reading them from a mapping raised SIGBUS in the server (it
/// died; its client, cut off, gave up only at its bound). Now the server tells each client
/// why (a SHUT naming the cause, so the client fails at once rather than reconnect) and
/// exits 1 saying so.
#[test]
fn serve_of_an_image_truncated_under_it_tells_its_clients_and_exits_1() {
    let (sock, mem, served, key) = (
        temp("trunc-fc.sock"),
        temp("trunc-fc.mem"),
        temp("trunc-fc.image"),
        key_file("trunc-fc.key"),
    );
    let _files = Files(vec![sock.clone(), mem.clone(), served.clone(), key.clone()]);
    common::image(&mem, 64 << 20);
    std::fs::copy(&mem, &served).expect("copy the image");
    let (server, addr) = serve(&served, &key);
    // Truncated once the server has the file open (and mapped, before): a quarter stays.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&served)
        .and_then(|f| f.set_len(16 << 20))
        .expect("truncate the served image");
    let started = Instant::now();
    // The client's bound on a silent or absent server is far beyond the test's.
    let liveness = ["--silence", "2", "--give-up", "60", "--mode", "thread"];
    let h = remote_handler(&sock, &addr, &key, &liveness);
    let c = fc_client(&sock, &mem);
    let s = server.finish_within(Duration::from_secs(40));
    assert_eq!(
        (s.code(), s.signal()),
        (Some(1), None),
        "the server exits 1 (signal 7: SIGBUS): {}",
        s.text()
    );
    assert!(
        s.stderr.contains("shrank"),
        "the server says why: {}",
        s.text()
    );
    let (h, c) = (
        h.finish_within(Duration::from_secs(40)),
        c.finish_within(Duration::from_secs(40)),
    );
    let all = format!(
        "server: {}\nhandler: {}\nclient: {}",
        s.text(),
        h.text(),
        c.text()
    );
    assert_eq!(h.code(), Some(1), "the restore fails\n{all}");
    assert!(
        h.stderr.contains("shrank"),
        "the handler was told why\n{all}"
    );
    assert_eq!(c.signal(), Some(9), "the VMM was killed\n{all}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "told at once, not at the client's bound: {:?}\n{all}",
        started.elapsed()
    );
}

/// The processes whose command line names `needle`.
fn naming(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// SIGTERM to `migrate local` takes its processes and its key with it: they were left
/// running (re-parented, migrating on) and the key stayed on disk. (Its destination is
/// stopped as soon as it exists, so the run stalls wherever it got to — before or after
/// the source started — and the signal always comes mid-run.) And a source that fails says
/// why on the terminal, and the destination is not waited out.
#[test]
fn migrate_local_ends_its_processes_and_removes_its_key_when_terminated() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let scratch = temp("mlocal-term");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch");
    let mut cmd = uffdkit(["migrate", "local", "--size", "64M"]);
    cmd.env("TMPDIR", &scratch);
    let mut run = Proc::start(cmd);
    let needle = scratch.display().to_string();
    let until = Instant::now() + Duration::from_secs(30);
    let dest = loop {
        let dest = naming(&needle)
            .into_iter()
            .find(|&pid| cmdline(pid).contains("migrate\0dest"));
        if let Some(pid) = dest {
            break pid;
        }
        assert!(
            !run.exited(),
            "migrate local ended before its destination ran"
        );
        assert!(Instant::now() < until, "its destination never ran");
        std::thread::sleep(Duration::from_millis(1));
    };
    kill(Pid::from_raw(dest), Signal::SIGSTOP).expect("stop the destination");
    run.signal(Signal::SIGTERM);
    let until = Instant::now() + Duration::from_secs(20);
    while !run.exited() {
        assert!(
            Instant::now() < until,
            "migrate local did not end on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let until = Instant::now() + Duration::from_secs(10);
    while !naming(&needle).is_empty() {
        if Instant::now() > until {
            let left = naming(&needle);
            for &pid in &left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL); // not to hang the test
            }
            panic!("left running: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let f = run.finish_within(Duration::from_secs(20));
    assert_eq!(f.code(), Some(143), "{}", f.text());
    let left: Vec<_> = std::fs::read_dir(&scratch).expect("scratch").collect();
    assert!(left.is_empty(), "left on disk: {left:?}");
    let _ = std::fs::remove_dir_all(&scratch);

    let t = Instant::now();
    let f = Proc::start(uffdkit([
        "migrate",
        "local",
        "--size",
        "100000G",
        "--give-up",
        "60",
    ]))
    .finish_within(Duration::from_secs(60));
    assert_eq!(f.code(), Some(1), "{}", f.text());
    assert!(
        f.stderr.contains("map the region"),
        "the source's words: {}",
        f.text()
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "waited out: {:?}",
        t.elapsed()
    );
}

/// Process `pid`'s command line (its arguments NUL-separated).
fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .unwrap_or_default()
}
