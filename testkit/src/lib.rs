//! Test support shared by the workspace's integration tests.

pub mod attacker;
pub mod hugepages;
pub mod proxy;
pub mod s3;
pub mod sigbus;

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

/// Runs the calling test's body in a process of its own, with a watchdog: for tests that
/// fork, install process-wide state, or could hang. Call it first thing in the test:
///
/// ```no_run
/// #[test]
/// fn forks_in_a_loop() {
///     if !testkit::isolated("forks_in_a_loop", std::time::Duration::from_secs(120)) {
///         return; // the body ran (and passed) in its own process
///     }
///     // ... the body, running in the child process ...
/// }
/// ```
///
/// In the test process it re-runs this test binary on just `test` (`--exact`), with an
/// environment marker, waits at most `timeout`, and returns `false` once that passed — or
/// panics with the child's output if it failed, or with the kernel stacks of its threads
/// (`/proc/PID/task/*/stack`, as root) if it hung, then kills it. In the child it returns
/// `true`: run the body. A hang therefore fails one test; it never stalls the suite.
pub fn isolated(test: &str, timeout: std::time::Duration) -> bool {
    match isolated_outcome(test, timeout) {
        None => true,
        Some((status, out)) => {
            assert!(
                status.success(),
                "{test} failed in its own process ({status}):\n{out}"
            );
            assert!(
                out.contains("test result: ok. 1 passed"),
                "{test} did not run in its own process (nothing passed):\n{out}"
            );
            false
        }
    }
}

/// Like [`isolated`], for a test whose child is expected to fail: in the test process it
/// returns the child's exit status and output (a hang still panics); in the child, `None`.
pub fn isolated_outcome(
    test: &str,
    timeout: std::time::Duration,
) -> Option<(std::process::ExitStatus, String)> {
    const MARK: &str = "UFFDKIT_ISOLATED_TEST";
    if std::env::var(MARK).is_ok_and(|t| t == test) {
        return None;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = std::process::Command::new(exe)
        .args([
            &full_test_name(test),
            "--exact",
            // A test marked `#[ignore = "needs …"]` runs when the suite asks for ignored
            // ones: its child must run it too, not report 0 run as a success.
            "--include-ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(MARK, test)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the isolated test");
    let output = collect_output(&mut child);
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for the isolated test") {
            return Some((status, output.join().unwrap_or_default()));
        }
        if started.elapsed() > timeout {
            let stacks = thread_stacks(child.id());
            let _ = child.kill();
            let _ = child.wait();
            let out = output.join().unwrap_or_default();
            panic!("{test} hung: no result after {timeout:?}; killed.\nthreads:\n{stacks}\noutput:\n{out}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The full name this test binary knows `test` by: `module::test` once a crate's tests
/// share one binary (`tests/main.rs`, a module per file), for re-running it alone with
/// `--exact`. The one listed test whose name is `test` or ends in `::test`; panics if
/// none is, or several are (give the module then: `fork::forks_in_a_loop`).
pub fn full_test_name(test: &str) -> String {
    let exe = std::env::current_exe().expect("the test binary's path");
    let list = std::process::Command::new(exe)
        .args(["--list", "--format", "terse"])
        .output()
        .expect("list the tests of this binary");
    let list = String::from_utf8_lossy(&list.stdout);
    let suffix = format!("::{test}");
    let names: Vec<&str> = list
        .lines()
        .filter_map(|line| line.strip_suffix(": test"))
        .filter(|name| *name == test || name.ends_with(&suffix))
        .collect();
    match names.as_slice() {
        [name] => name.to_string(),
        [] => panic!("no test named {test} in this binary"),
        several => panic!("{test} names several tests here: {several:?}"),
    }
}

/// Reads a child's stdout and stderr to the end on threads of their own (so a chatty
/// child never blocks on a full pipe), joined into one text.
fn collect_output(child: &mut std::process::Child) -> std::thread::JoinHandle<String> {
    use std::io::Read;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        let e = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s + &e.join().unwrap_or_default()
    })
}

/// The name, state and kernel stack of every thread of `pid` (stacks need root).
fn thread_stacks(pid: u32) -> String {
    let mut text = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return text;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let read = |f: &str| std::fs::read_to_string(path.join(f)).unwrap_or_default();
        let state = read("stat");
        let state = state
            .split(") ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .unwrap_or("?");
        text += &format!(
            "{} {} [{}]\n{}\n",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            state,
            read("stack")
        );
    }
    text
}
