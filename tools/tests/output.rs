//! What long-running commands print while they run: a live bar when stderr is a
//! terminal (a real pseudo-terminal here), plain lines when it is not, nothing with `-q`,
//! and with `--json` nothing but JSON on stdout either way.

use crate::common;

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{temp, uffdkit, wait_listening, write_key, Proc};

/// A pseudo-terminal: the slave for the child's stderr, the master read by a thread.
struct Terminal {
    slave: Option<OwnedFd>,
    chunks: mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl Terminal {
    /// A new pseudo-terminal, or `None` (reported as a skip) where there are none.
    fn open(test: &str) -> Option<Terminal> {
        let pty = match nix::pty::openpty(None, None) {
            Ok(pty) => pty,
            Err(e) => {
                testkit::skip(test, &format!("no pseudo-terminal: openpty: {e}"));
                return None;
            }
        };
        let (tx, chunks) = mpsc::channel();
        let mut master = std::fs::File::from(pty.master);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once every slave copy is closed.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        Some(Terminal {
            slave: Some(pty.slave),
            chunks,
            seen: Vec::new(),
        })
    }

    /// The slave end, as a child's stderr (our copy is closed).
    fn stderr(&mut self) -> Stdio {
        Stdio::from(self.slave.take().expect("one child per terminal"))
    }

    /// Reads until `done` holds for everything seen, or the deadline passes; returns it.
    fn read_until(&mut self, done: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + common::DEADLINE;
        loop {
            let text = String::from_utf8_lossy(&self.seen).into_owned();
            if done(&text) || Instant::now() > until {
                return text;
            }
            if let Ok(chunk) = self.chunks.recv_timeout(Duration::from_millis(100)) {
                self.seen.extend(chunk);
            }
        }
    }
}

fn serve_cmd(image: &Path, key: &Path, sock: &Path) -> std::process::Command {
    let mut cmd = uffdkit(["serve", "--image"]);
    cmd.arg(image)
        .arg("--key-file")
        .arg(key)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()));
    cmd
}

#[test]
fn serve_draws_a_live_bar_on_a_terminal() {
    let (image, key, sock) = (temp("bar.img"), temp("bar.key"), temp("bar.sock"));
    common::image(&image, 1 << 20);
    write_key(&key, "output-test-key-0123456789");
    let Some(mut term) = Terminal::open("serve_draws_a_live_bar_on_a_terminal") else {
        return;
    };
    let mut cmd = serve_cmd(&image, &key, &sock);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(term.stderr());
    let mut server = Proc::start_with(&mut cmd);
    wait_listening(&sock, &mut server);
    // A bar redraws its line in place: carriage returns or cursor movement, with the
    // status text, and more than once.
    let redraws = |t: &str| t.matches("connection pairs").count();
    let seen = term.read_until(|t| redraws(t) >= 3);
    drop(server);
    for f in [&image, &key, &sock] {
        let _ = std::fs::remove_file(f);
    }
    assert!(redraws(&seen) >= 3, "the bar was redrawn: {seen:?}");
    assert!(
        seen.contains('\r') || seen.contains("\x1b["),
        "drawn in place: {seen:?}"
    );
    assert!(seen.contains("serve"), "labelled: {seen:?}");
}

#[test]
fn serve_prints_plain_lines_when_stderr_is_not_a_terminal() {
    let (image, key, sock) = (temp("lines.img"), temp("lines.key"), temp("lines.sock"));
    common::image(&image, 1 << 20);
    write_key(&key, "output-test-key-0123456789");
    let started = Instant::now();
    let mut server = Proc::start(serve_cmd(&image, &key, &sock));
    wait_listening(&sock, &mut server);
    // The first status line comes at once, then one every 5 s.
    std::thread::sleep(Duration::from_millis(1500));
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let out = server.finish();
    let most = 1 + started.elapsed().as_secs() as usize / 5;
    for f in [&image, &key, &sock] {
        let _ = std::fs::remove_file(f);
    }
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("connection pairs"))
        .collect();
    assert!(
        (1..=most).contains(&lines.len()),
        "at most {most} line(s), not one per 500 ms: {}",
        out.text()
    );
    assert!(lines[0].starts_with("serve:    0."), "{}", out.text());
    assert!(!out.stderr.contains('\r'), "no bar: {}", out.text());
}

/// Runs `restore --json` over a small image with stderr as given; returns stdout.
fn restore_json(stderr: Stdio, quiet: bool) -> (String, String) {
    let image = temp(&format!("restore-{quiet}.img"));
    common::image(&image, 2 << 20);
    let mut cmd = uffdkit(["restore", "--json", "--mode", "thread", "--image"]);
    cmd.arg(&image);
    if quiet {
        cmd.arg("-q");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let out = Proc::start_with(&mut cmd).finish();
    let _ = std::fs::remove_file(&image);
    assert!(out.status.success(), "{}", out.text());
    (out.stdout, out.stderr)
}

#[test]
fn restore_json_stdout_is_only_json_with_or_without_a_terminal() {
    if let Some(mut term) = Terminal::open("restore_json_stdout_is_only_json_with_a_terminal") {
        let (stdout, _) = restore_json(term.stderr(), false);
        let v: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON alone");
        assert_eq!(v["results"][0]["strategy"], "pager");
    }

    let (stdout, stderr) = restore_json(Stdio::piped(), false);
    serde_json::from_str::<serde_json::Value>(&stdout).expect("stdout is JSON alone");
    assert!(
        stderr.contains("restore: ") && stderr.contains("pages in"),
        "a plain progress line on stderr: {stderr}"
    );

    let (stdout, stderr) = restore_json(Stdio::piped(), true);
    serde_json::from_str::<serde_json::Value>(&stdout).expect("stdout is JSON alone");
    assert_eq!(stderr, "", "-q: no progress");
}
