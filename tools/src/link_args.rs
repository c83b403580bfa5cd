//! How `serve`, `migrate` and `fc-handler --source` secure their links: TLS 1.3 with
//! certificates both ways, or a pre-shared key on trusted links only; `--tls auto` for
//! runs that make both ends on this machine; and the listeners' bounds on strangers.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use postcopy::Admission;
use postcopy::Security;
use transport::tls::{Authority, TlsConfig};
use transport::Key;

/// The help text's word on the two ways to secure a link.
pub const SECURITY_HELP: &str = "\
Links are secured one of two ways. TLS 1.3 (--tls-cert, --tls-key, --tls-ca): both ends \
present a certificate signed by the CA the other trusts; the connecting end checks the \
listener's name (the address it dials, or --tls-peer-name), and a listener given \
--tls-peer-name requires that name of every peer. A pre-shared key (--key-file): both ends \
prove the key, but pages then travel UNENCRYPTED, checked by a CRC only: for trusted \
links only (one host, a dedicated migration network). A TLS end refuses a plaintext peer \
and the other way round, each saying so.";

/// `--tls auto`: certificates made for one run by a throwaway CA (both ends on this
/// machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AutoTls {
    /// A throwaway CA and a certificate for each end, deleted after the run.
    Auto,
}

/// TLS or pre-shared-key options of one end of a link.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// TLS: this host's certificate chain (PEM, its own certificate first); with
    /// --tls-key and --tls-ca.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"], conflicts_with = "key_file")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: this host's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// TLS: the certificate(s) of the CA that signs peers (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// TLS: the name (DNS or IP) the peer's certificate must carry. Connecting: instead
    /// of the address dialled. Listening: required of every peer (else any certificate
    /// the CA signed is let in).
    #[arg(long, value_name = "NAME", requires = "tls_cert")]
    pub tls_peer_name: Option<String>,
    /// Plaintext with a pre-shared key (a file of at least 16 bytes): trusted links only,
    /// pages travel unencrypted.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Accept a --key-file or --tls-key that group or others can read (refused otherwise:
    /// whoever reads the key can pull or push pages, or pose as this host).
    #[arg(long)]
    pub allow_readable_keys: bool,
}

impl SecurityArgs {
    /// The security these options ask for (a usage error if they ask for none).
    pub fn security(&self) -> Result<Security> {
        security(
            self.tls_cert.as_deref(),
            (self.tls_key.as_deref(), self.tls_ca.as_deref()),
            self.tls_peer_name.as_deref(),
            self.key_file.as_deref(),
            self.allow_readable_keys,
        )
    }

    /// The same options on a child's command line.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out = Vec::new();
        let mut push = |flag: &str, value: Option<&Path>| {
            if let Some(v) = value {
                out.push(flag.into());
                out.push(v.as_os_str().to_owned());
            }
        };
        push("--tls-cert", self.tls_cert.as_deref());
        push("--tls-key", self.tls_key.as_deref());
        push("--tls-ca", self.tls_ca.as_deref());
        push("--key-file", self.key_file.as_deref());
        if self.allow_readable_keys {
            out.push("--allow-readable-keys".into());
        }
        if let Some(name) = &self.tls_peer_name {
            out.extend(["--tls-peer-name".into(), name.into()]);
        }
        out
    }
}

/// The security of an end given a certificate (with its key and CA) or a key file.
fn security(
    cert: Option<&Path>,
    (key, ca): (Option<&Path>, Option<&Path>),
    peer_name: Option<&str>,
    key_file: Option<&Path>,
    readable_key_ok: bool,
) -> Result<Security> {
    match (cert, key, ca, key_file) {
        (Some(cert), Some(key), Some(ca), None) => {
            let tls = TlsConfig::from_pem_files(cert, key, ca, readable_key_ok).with_context(|| {
                format!(
                    "TLS files --tls-cert {} --tls-key {} --tls-ca {}",
                    cert.display(),
                    key.display(),
                    ca.display()
                )
            })?;
            Ok(match peer_name {
                Some(name) => tls.with_peer_name(name)?,
                None => tls,
            }
            .into())
        }
        (None, None, None, Some(file)) => Ok(Key::from_file(file, readable_key_ok)
            .with_context(|| format!("key file {}", file.display()))?
            .into()),
        _ => Err(crate::exit::usage(
            "give --tls-cert, --tls-key and --tls-ca (TLS), or --key-file (plaintext, trusted links only)",
        )),
    }
}

/// `--tls auto`: a throwaway CA and a certificate for each end (named `localhost` and
/// `127.0.0.1`), written into `dir`; returns the listener's and the opener's options.
pub fn throwaway(dir: &Path) -> Result<(SecurityArgs, SecurityArgs)> {
    let ca = Authority::new("uffdkit --tls auto")?;
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.ca_pem()).context("write the CA certificate")?;
    let end = |name: &str| -> Result<SecurityArgs> {
        let id = ca.issue(&["localhost", "127.0.0.1"])?;
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, &id.cert_pem).context("write a certificate")?;
        write_private(&key, &id.key_pem)?;
        Ok(SecurityArgs {
            tls_cert: Some(cert),
            tls_key: Some(key),
            tls_ca: Some(ca_file.clone()),
            ..SecurityArgs::default()
        })
    };
    Ok((end("listener")?, end("opener")?))
}

/// Writes `text` to a new file only its owner can read.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

/// A listener's bounds on what strangers may hold.
#[derive(clap::Args, Debug, Clone)]
pub struct AdmissionArgs {
    /// A connection that has not completed its handshake within this many seconds is
    /// closed.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    handshake_deadline: f64,
    /// Most connections in their handshake at once; one more closes a silent one, or one
    /// of the busiest address's drawn at random (a flood cannot keep a real client out for good).
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_handshakes: usize,
    /// Most clients served at once; more are told the server is busy and retry.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_sessions: usize,
}

impl AdmissionArgs {
    /// The admission these options ask for.
    pub fn admission(&self) -> Result<Admission> {
        let deadline = Duration::try_from_secs_f64(self.handshake_deadline)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                crate::exit::usage("--handshake-deadline must be a positive number of seconds")
            })?;
        if self.max_handshakes == 0 || self.max_sessions == 0 {
            return Err(crate::exit::usage(
                "--max-handshakes and --max-sessions must be at least 1",
            ));
        }
        Ok(Admission {
            handshake_deadline: deadline,
            max_handshakes: self.max_handshakes,
            max_sessions: self.max_sessions,
        })
    }
}

/// Raises this process's soft limit on open files to its hard limit (a listener holds a
/// descriptor per connection, strangers' included); returns the limit now in force.
pub fn raise_open_files() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        log::debug!("open files: soft limit raised from {soft} to {hard}");
        return hard;
    }
    soft
}
