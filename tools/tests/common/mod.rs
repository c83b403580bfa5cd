//! Running the `uffdkit` binary in tests: every child has a deadline, its output is
//! drained while it runs, and it is killed if a test fails first.

#![allow(dead_code)] // each test file uses its own part

use std::ffi::OsStr;
use std::io::{BufRead, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Generous: the machine is a loaded 2-vCPU VM shared with other builds.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A path in the temporary directory unique to this test process.
pub fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("uffdkit-t{}-{name}", std::process::id()))
}

/// Writes a key file readable by its owner only (`--key-file` refuses one others can
/// read).
pub fn write_key(path: &Path, key: impl AsRef<[u8]>) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(key.as_ref()))
        .expect("write the key");
}

/// A `uffdkit` command line.
pub fn uffdkit<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uffdkit"));
    cmd.args(args);
    cmd
}

/// What a finished child left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The exit code (`None` if a signal ended it).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The signal that ended it.
    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }

    /// Both streams, for assertion messages.
    pub fn text(&self) -> String {
        format!(
            "[{}]\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// A running child whose stdout and stderr are drained by threads (so a full pipe never
/// blocks it); killed on drop unless it was waited for.
pub struct Proc {
    child: Option<Child>,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
}

fn drain(stream: Option<impl Read + Send + 'static>) -> Option<JoinHandle<String>> {
    stream.map(|mut s| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = s.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    })
}

impl Proc {
    /// Starts `cmd` with piped stdout and stderr (unless the command set them).
    pub fn start(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null());
        Self::start_with(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))
    }

    /// Starts `cmd` and reads its first stdout line (`LISTEN <addr>` for the commands
    /// that listen); the rest of its output is drained as usual.
    pub fn start_reading_first_line(mut cmd: Command) -> (Proc, String) {
        let (proc, line, _) = Self::start_first_line(cmd.stdin(Stdio::null()));
        (proc, line)
    }

    /// Starts `cmd` (an `fc-client --hold`) with its stdin piped and reads its first
    /// stdout line; closing the returned stdin lets it exit.
    pub fn start_holding(mut cmd: Command) -> (Proc, String, std::process::ChildStdin) {
        let (proc, line, stdin) = Self::start_first_line(cmd.stdin(Stdio::piped()));
        (proc, line, stdin.expect("piped stdin"))
    }

    fn start_first_line(cmd: &mut Command) -> (Proc, String, Option<std::process::ChildStdin>) {
        let mut child = (cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))
            .spawn()
            .expect("spawn uffdkit");
        let stdin = child.stdin.take();
        let mut out = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut out, &mut line);
        let err = drain(child.stderr.take());
        let proc = Proc {
            child: Some(child),
            out: drain(Some(out)),
            err,
        };
        (proc, line, stdin)
    }

    /// Starts `cmd` like [`Proc::start`], each line of its stderr also sent on the
    /// returned channel as it comes (the channel closes with the child's stderr).
    pub fn start_watching_stderr(mut cmd: Command) -> (Proc, Receiver<String>) {
        cmd.stdin(Stdio::null());
        let mut child = (cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))
            .spawn()
            .expect("spawn uffdkit");
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().map(|s| {
            std::thread::spawn(move || {
                let mut all = String::new();
                for line in std::io::BufReader::new(s).lines().map_while(Result::ok) {
                    all.push_str(&line);
                    all.push('\n');
                    let _ = tx.send(line);
                }
                all
            })
        });
        let out = drain(child.stdout.take());
        (
            Proc {
                child: Some(child),
                out,
                err,
            },
            rx,
        )
    }

    /// Starts `cmd` as configured.
    pub fn start_with(cmd: &mut Command) -> Proc {
        let mut child = cmd.spawn().expect("spawn uffdkit");
        let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
        Proc {
            child: Some(child),
            out,
            err,
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Whether it has exited (without reaping what the waiters need).
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).expect("kill");
    }

    /// Waits up to `deadline` for the child to exit; kills it and panics past that.
    pub fn finish_within(mut self, deadline: Duration) -> Finished {
        let mut child = self.child.take().expect("not yet waited for");
        let until = Instant::now() + deadline;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = self.err.take().map(|h| h.join().unwrap_or_default());
                panic!("uffdkit did not exit within {deadline:?}; stderr: {stderr:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let join = |h: Option<JoinHandle<String>>| h.map(|h| h.join().unwrap_or_default());
        Finished {
            status,
            stdout: join(self.out.take()).unwrap_or_default(),
            stderr: join(self.err.take()).unwrap_or_default(),
        }
    }

    /// [`Proc::finish_within`] the default deadline.
    pub fn finish(self) -> Finished {
        self.finish_within(DEADLINE)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `cmd` to completion within the default deadline.
pub fn run(cmd: Command) -> Finished {
    Proc::start(cmd).finish()
}

/// Waits until something accepts connections on `path` (each probe is a connection
/// closed without a word), failing if `proc` exits first or the deadline passes.
pub fn wait_listening(path: &Path, proc: &mut Proc) {
    let until = Instant::now() + DEADLINE;
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(!proc.exited(), "exited before listening on {path:?}");
        assert!(Instant::now() < until, "nothing listened on {path:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a line containing `needle` on `lines` (from
/// [`Proc::start_watching_stderr`]): false if the stream ends or the deadline passes first.
pub fn wait_for_line(lines: &Receiver<String>, needle: &str) -> bool {
    let until = Instant::now() + DEADLINE;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

/// Writes `bytes` of a recognisable image (every 4 KiB page distinct).
pub fn image(path: &Path, bytes: usize) {
    let data: Vec<u8> = (0..bytes)
        .map(|i| ((i >> 12) as u8) ^ (i as u8).rotate_left(3))
        .collect();
    std::fs::write(path, data).expect("write image");
}

/// The chunks a command overtook from a stalled peer, from its `overtaken` count (the
/// restore's JSON detail) or the pull's summary line.
pub fn overtaken(f: &Finished) -> u64 {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&f.stdout) {
        return v["results"][0]["detail"]["overtaken"]
            .as_u64()
            .unwrap_or_else(|| panic!("no overtaken count: {}", f.text()));
    }
    let (before, _) = f
        .stdout
        .split_once(" overtaken from a stalled peer")
        .unwrap_or_else(|| panic!("no overtaken count: {}", f.text()));
    let count = before.rsplit(' ').next().unwrap_or_default();
    count
        .parse()
        .unwrap_or_else(|_| panic!("overtaken count {count:?}: {}", f.text()))
}
