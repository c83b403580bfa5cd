//! A real S3-compatible server for tests: `s3s-fs` (installed by `scripts/test` with
//! `cargo install --locked s3s-fs --features binary`), one per test, on a free loopback
//! port, storing objects in a fresh temporary directory. Dropping the handle kills the
//! server and removes the directory; the server also dies with the thread that started it
//! (`PR_SET_PDEATHSIG`), so a test that panics leaves nothing running.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The credentials the test server accepts.
pub const ACCESS_KEY: &str = "uffdkit-test";
/// The secret of [`ACCESS_KEY`].
pub const SECRET_KEY: &str = "uffdkit-test-secret";

/// A running `s3s-fs`.
pub struct S3Server {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

/// Where `s3s-fs` is: `$UFFDKIT_S3S_FS`, `~/.cargo/bin/s3s-fs`, or on `PATH`.
fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("UFFDKIT_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(p) = home.map(|h| h.join("bin/s3s-fs")).filter(|p| p.exists()) {
        return Some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.exists())
    })
}

impl S3Server {
    /// Starts a server with one bucket, `bucket`; `None` (after a loud skip of `test`)
    /// when `s3s-fs` is not installed.
    pub fn start(test: &str, bucket: &str) -> Option<S3Server> {
        let Some(bin) = binary() else {
            crate::skip(
                test,
                "s3s-fs not found (scripts/test installs it: cargo install --locked s3s-fs --features binary)",
            );
            return None;
        };
        let dir = std::env::temp_dir().join(format!(
            "uffdkit-s3-{}-{}-{}",
            test.replace(['/', ':'], "_"),
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(bucket)).expect("create the server's directory");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port();
        let mut server = S3Server {
            bin,
            dir,
            port,
            child: None,
        };
        server.resume();
        Some(server)
    }

    /// Starts the server again (same port, same objects) after [`S3Server::stop`].
    pub fn resume(&mut self) {
        if self.child.is_some() {
            return;
        }
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches only the child's own settings.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start s3s-fs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (objects stay on disk); connections to it are refused until
    /// [`S3Server::resume`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Settings for an `object_store` S3 client of this server (as key/value pairs).
    pub fn config(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", self.endpoint()),
            ("aws_access_key_id", ACCESS_KEY.into()),
            ("aws_secret_access_key", SECRET_KEY.into()),
            ("aws_region", "us-east-1".into()),
            ("aws_allow_http", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The same settings as environment variables, for a child process.
    pub fn env(&self) -> Vec<(String, String)> {
        self.config()
            .into_iter()
            .map(|(k, v)| {
                let k = if k == "aws_endpoint" {
                    "aws_endpoint_url".to_owned()
                } else {
                    k
                };
                (k.to_ascii_uppercase(), v)
            })
            .collect()
    }

    /// The directory holding the objects (a bucket is a subdirectory).
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
