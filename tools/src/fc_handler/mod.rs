//! `uffdkit fc-handler`: a drop-in external page-fault handler for Firecracker snapshot
//! restore (`"mem_backend": {"backend_type": "Uffd", "backend_path": SOCKET}`), run as
//! Firecracker's example handlers are (`uffdkit fc-handler SOCKET MEMFILE`) or with flags.
//!
//! What it promises the VMM: everything that can be checked is checked before the socket
//! exists, so a bad option never reaches Firecracker; a path another handler listens on
//! is refused (taking it over would orphan that one), a stale socket file replaced, and
//! ours removed on exit and on SIGINT/SIGTERM/SIGHUP; once Firecracker has handed over its
//! userfaultfd, any fatal error kills it (SIGKILL through the pidfd its connection gave,
//! `SO_PEERPIDFD`; by pid only on kernels older than 6.5), as Firecracker's
//! example handlers do, rather than leave it hanging in `PUT /snapshot/load` with its API
//! dead — unless `--no-kill-peer`. A second VMM that connects while one is served has
//! handed over its userfaultfd too, and nobody would serve it: the same policy applies.
//! The socket is 0600 whatever the umask (handed to `--peer-uid` if named), and a
//! connection from any user but ours, root and `--peer-uid` is closed unread.

use std::io::{ErrorKind, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use log::{debug, info, warn};
use pager::firecracker::{self, GuestRegion, Handshake, HandshakeError, ServeOptions};
use pager::{FileSource, Source, StatsSnapshot};

use crate::cli_args::{HandlerMode, PrefetchArgs};
use crate::units;
use crate::zero_pages::ZeroChecked;
use transport::socket_file::{self, SocketFile};

mod summary;
mod vmm;
use summary::{summary, Geometry};
use vmm::{accept_vmm, end_peer, refuse_others, vmm_name, Intruders, Peer};

const AFTER_HELP: &str = "\
Drop-in for Firecracker's example handlers: `uffdkit fc-handler SOCKET MEMFILE` is the \
same command line, and so is `--socket SOCKET --mem-file MEMFILE`.

Before the socket exists, the handler checks its options, the memory file (readable, not \
empty), the replay file and the record path, and refuses a SOCKET where another listener \
answers; a stale socket file is replaced. Once Firecracker has sent its userfaultfd, any \
fatal error (a memory file shorter than the guest, a refused region table, a failing \
source, SIGINT/SIGTERM/SIGHUP) SIGKILLs the Firecracker process (through its pidfd), which \
would otherwise hang on faults nobody serves; so is a second Firecracker that connects \
while one is served; --no-kill-peer leaves them running. The \
socket is removed on every exit. Exit status: 0 when Firecracker exited after a clean \
restore (its process, watched through a pidfd: Firecracker before 1.12 closes the socket \
right after the handshake and goes on running); 1 on failure; 2 on a usage error; \
128+N on signal N.";

/// Options of `uffdkit fc-handler`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = AFTER_HELP,
    group = clap::ArgGroup::new("socket_path").required(true).args(["socket_arg", "socket"]),
    group = clap::ArgGroup::new("memory").required(true).args(["mem_file_arg", "mem_file", "source", "image"]),
    group = clap::ArgGroup::new("source_security").args(["key_file", "tls_cert"]).requires("source"),
)]
pub struct Args {
    /// The Unix socket to listen on: Firecracker's `backend_path` (or --socket).
    #[arg(value_name = "SOCKET")]
    socket_arg: Option<PathBuf>,
    /// The snapshot memory file (or --mem-file).
    #[arg(value_name = "MEMFILE")]
    mem_file_arg: Option<PathBuf>,
    /// The Unix socket to listen on (SOCKET as a flag).
    #[arg(long, value_name = "SOCKET")]
    socket: Option<PathBuf>,
    /// The snapshot memory file: Firecracker's regions at their `offset`s (MEMFILE as a
    /// flag).
    #[arg(long, value_name = "MEMFILE")]
    mem_file: Option<PathBuf>,
    /// A Firecracker diff snapshot's memory file over MEMFILE, oldest first (repeat for
    /// a chain): the chain is served directly, newest layer first, without rebase-snap.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["source", "image"])]
    diff: Vec<PathBuf>,
    /// Serve pages from a `uffdkit serve` page server at this address instead of a file
    /// (host:port or unix:/path; its --page-size must be the guest's; the server streams
    /// every page itself, so --prefetch does not apply). Secured by TLS (--tls-cert, --tls-key, --tls-ca) or,
    /// on a trusted link only, a pre-shared key (--key-file: pages travel unencrypted).
    #[arg(long, requires = "source_security", value_parser = parse_addr)]
    source: Option<transport::Addr>,
    /// Serve a chunked image from an object store (s3://…, gs://…, file:///…) instead of
    /// a file (see `uffdkit image`).
    #[arg(long, conflicts_with_all = ["mem_file", "mem_file_arg", "source"])]
    image: Option<String>,
    /// Fetching and caching of `--image`.
    #[command(flatten)]
    image_source: crate::image::SourceArgs,
    /// With --source: TLS certificates (the page server's must carry the address dialled,
    /// or --tls-peer-name), or a pre-shared key (trusted links only).
    #[command(flatten)]
    security: crate::link_args::SecurityArgs,
    /// With --source: give up on the page server after this many seconds without a
    /// working connection (at the start, or after a break), failing the restore (and so
    /// killing the VMM, unless --no-kill-peer). Breaks shorter than this are survived.
    #[arg(long, requires = "source", default_value_t = 60.0)]
    give_up: f64,
    /// With --source: a page server connection that brings nothing for this many seconds
    /// is broken (heartbeats are sent every sixth of it); the client reconnects.
    #[arg(long, requires = "source", default_value_t = 3.0)]
    silence: f64,
    /// Prefetch (started once the first fault is served) and recording.
    #[command(flatten)]
    prefetch: PrefetchArgs,
    /// Copy the memory file's zero pages as data, as Firecracker's example handlers do
    /// (by default its holes and its all-zero pages are placed with UFFDIO_ZEROPAGE:
    /// nothing copied, no host memory allocated).
    #[arg(long, conflicts_with_all = ["source", "image"])]
    no_zero_detection: bool,
    /// Delivery mode: handler threads, which can serve Firecracker's memory.
    #[arg(long, value_enum, default_value_t = HandlerMode::Percpu)]
    mode: HandlerMode,
    /// On a fatal error after Firecracker connected, leave it running instead of
    /// SIGKILLing it (its guest then hangs on its next fault until someone kills it).
    #[arg(long)]
    no_kill_peer: bool,
    /// The user the VMM runs as, when it is not ours (a jailed Firecracker, `--uid` of
    /// its jailer): the socket is handed to it (owned by it, 0600; needs root) and its
    /// connections are served. Without it only our own user (and root) can connect. A
    /// connection from any other user is closed unread, whatever the socket's mode.
    #[arg(long, value_name = "UID")]
    peer_uid: Option<u32>,
    /// Accepted for old command lines: killing the peer on error is now the default.
    #[arg(long, hide = true, conflicts_with = "no_kill_peer")]
    kill_peer_on_error: bool,
}

/// Where the pages come from, opened and checked before the socket exists.
struct Memory {
    source: Arc<dyn Source>,
    /// The memory file, or `None` for a remote source.
    file: Option<PathBuf>,
    /// What a remote source is called in the summary.
    remote: &'static str,
    /// For a remote source: the page size it serves (the guest's must be the same).
    serves: Option<Serves>,
    /// The page server's client, for its reconnection count.
    client: Option<Arc<postcopy::client::RemoteSource>>,
    /// The memory file's zero-page detection, for its counts (unless turned off).
    zero: Option<Arc<ZeroChecked>>,
}

/// The page size a remote source serves, and what to say when it is not the guest's.
#[derive(Debug, Clone, Copy)]
struct Serves {
    /// The option that named the source.
    option: &'static str,
    page_size: u64,
    /// How to get a source of another page size.
    remedy: &'static str,
}

/// What a signal or an error must clean up: our socket, and the VMM once it connected.
#[derive(Default)]
struct Session {
    socket: Mutex<Option<SocketFile>>,
    peer: Mutex<Option<Peer>>,
}

impl Session {
    /// Claims the socket path, holding the lock the termination handler takes: a signal
    /// that comes while the file appears waits for it to be recorded, then removes it.
    fn claim_socket(&self, path: &Path, peer_uid: Option<u32>) -> Result<socket_file::Claimed> {
        let mut slot = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        let claimed = socket_file::claim_for(path, peer_uid)?;
        *slot = Some(claimed.file.clone());
        Ok(claimed)
    }

    fn set_peer(&self, peer: Option<Peer>) {
        *self.peer.lock().unwrap_or_else(|p| p.into_inner()) = peer;
    }

    /// On SIGINT/SIGTERM/SIGHUP: the restore cannot complete, so the VMM goes first (if
    /// told to), then our socket.
    fn terminate(&self, signal: nix::sys::signal::Signal, kill: bool) {
        warn!("{signal}: stopping");
        if let Some(peer) = &*self.peer.lock().unwrap_or_else(|p| p.into_inner()) {
            end_peer(peer, kill, &format!("the handler got {signal}"));
        }
        if let Some(file) = &*self.socket.lock().unwrap_or_else(|p| p.into_inner()) {
            file.remove();
        }
    }
}

/// Runs `uffdkit fc-handler`: one restore, then exits 0 when Firecracker exits.
pub fn run(args: &Args) -> Result<()> {
    let kill = !args.no_kill_peer;
    let session = Arc::new(Session::default());
    let on_signal = session.clone();
    // First: every thread started after this inherits the blocked signals.
    crate::signals::on_termination(move |signal| on_signal.terminate(signal, kill))?;

    let socket = socket_of(args).context("no socket path")?;
    if args.source.is_some() && args.prefetch.replay.is_some() {
        return Err(crate::exit::usage(
            "--replay needs a memory file: a page server streams every page itself",
        ));
    }
    args.prefetch.check()?;
    let memory = open_memory(args)?;
    let claimed = session.claim_socket(socket, args.peer_uid)?;
    info!("listening on {} for Firecracker", socket.display());

    let (hs, peer) = accept_vmm(&claimed.listener, kill, args.peer_uid)?;
    session.set_peer(peer.clone());
    let who = vmm_name(hs.peer);
    let geometry = Geometry::of(&hs.regions);
    info!("{who} connected: {}", geometry.describe());
    let intruders = refuse_others(&claimed.listener, who.clone(), kill, args.peer_uid)?;

    // Held until the VMM is dealt with: closing the last descriptor of its userfaultfd
    // would release its blocked faults onto zero pages before it is killed.
    let hold_uffd = hs
        .uffd()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicate the VMM's userfaultfd")?;
    let started = Instant::now();
    let result = serve(args, &memory, &geometry, hs);
    if let (Err(_), Some(peer)) = (&result, &peer) {
        end_peer(peer, kill, "the restore failed (the error follows)");
    }
    drop(hold_uffd);
    let stats = result?;
    let mut out = std::io::stdout().lock();
    let mut lines = summary(&who, started.elapsed(), &geometry, &memory, args, &stats);
    lines.extend(intruders_line(&intruders, kill));
    for line in lines {
        // The restore is done: a closed stdout loses the summary, not the result.
        let _ = writeln!(out, "{line}");
    }
    Ok(())
}

/// The summary's line on second VMMs, if any came.
fn intruders_line(intruders: &Intruders, kill: bool) -> Option<String> {
    let vmms = intruders.vmms.load(Ordering::Relaxed);
    (vmms > 0).then(|| {
        let fate = if kill {
            "killed (SIGKILL)"
        } else {
            "left running (--no-kill-peer)"
        };
        format!("  second VMMs: {vmms} connected while this one was served, {fate}")
    })
}

/// Opens the memory file (readable, not empty) or connects to the page server.
fn open_memory(args: &Args) -> Result<Memory> {
    if let Some(path) = args.mem_file_arg.as_ref().or(args.mem_file.as_ref()) {
        let len = uffd_core::private_fs::open_regular(path, false)
            .map_err(anyhow::Error::from)
            .and_then(|f| Ok(f.metadata()?))
            .with_context(|| format!("memory file {}", path.display()))?
            .len();
        if len == 0 {
            bail!("memory file {} is empty", path.display());
        }
        let context = || format!("memory file {}", path.display());
        let (source, zero): (Arc<dyn Source>, _) = if args.no_zero_detection {
            let source: Arc<dyn Source> = if args.diff.is_empty() {
                Arc::new(FileSource::mmap(path).with_context(context)?)
            } else {
                crate::snapshot::diff_chain_source(path, &args.diff)?
            };
            (source, None)
        } else {
            let checked = Arc::new(if args.diff.is_empty() {
                ZeroChecked::file(path).with_context(context)?
            } else {
                ZeroChecked::over(crate::snapshot::diff_chain_source(path, &args.diff)?)
            });
            (checked.clone(), Some(checked))
        };
        return Ok(Memory {
            source,
            file: Some(path.clone()),
            remote: "",
            serves: None,
            client: None,
            zero,
        });
    }
    if let Some(url) = &args.image {
        // Its own background plan (sequential from each fault) stands in for the
        // pager's prefetch.
        let image =
            crate::image::open_source(url, &args.image_source, chunked::Background::Sequential)?;
        let page_size = u64::from(image.geometry().page_size);
        return Ok(Memory {
            source: image,
            file: None,
            remote: "the object store",
            serves: Some(Serves {
                option: "--image",
                page_size,
                remedy: "push the image with --page-size equal to the guest's",
            }),
            client: None,
            zero: None,
        });
    }
    let Some(addr) = &args.source else {
        return Err(crate::exit::usage(
            "give SOCKET MEMFILE, --mem-file, or --source with TLS files or --key-file",
        ));
    };
    let security = args.security.security()?;
    let seconds = |what: &str, v: f64| {
        Duration::try_from_secs_f64(v)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                crate::exit::usage(format!("--{what} must be a positive number of seconds"))
            })
    };
    let silence = seconds("silence", args.silence)?;
    let timing = postcopy::Timing {
        silence,
        heartbeat: silence / 6,
        give_up_after: seconds("give-up", args.give_up)?,
        ..postcopy::Timing::default()
    };
    let remote = postcopy::client::RemoteSource::connect_with(addr, security, timing)
        .with_context(|| format!("connect to the page server at {addr}"))?;
    let remote = Arc::new(remote);
    let page_size = remote.page_size() as u64;
    Ok(Memory {
        source: remote.clone(),
        file: None,
        remote: "the page server",
        serves: Some(Serves {
            option: "--source",
            page_size,
            remedy: "start uffdkit serve with --page-size equal to the guest's",
        }),
        client: Some(remote),
        zero: None,
    })
}

/// `--source`: host:port or unix:/path.
fn parse_addr(text: &str) -> Result<transport::Addr, String> {
    text.parse()
        .map_err(|_| format!("not an address (host:port or unix:/path): {text}"))
}

/// Serves the handshake's regions until Firecracker exits.
fn serve(
    args: &Args,
    memory: &Memory,
    geometry: &Geometry,
    hs: Handshake,
) -> Result<StatsSnapshot> {
    let have = memory.source.len();
    match &memory.file {
        Some(path) if geometry.extent > have => bail!(
            "memory file {} is shorter than the guest: {} ({have} bytes), Firecracker's regions need {} ({} bytes); is it this snapshot's memory file?",
            path.display(),
            units::bytes(have),
            units::bytes(geometry.extent),
            geometry.extent
        ),
        _ => {}
    }
    if let Some(serves) = memory.serves {
        if geometry.page_size != Some(serves.page_size) {
            let guest = match geometry.page_size {
                Some(size) => format!("pages of {}", units::bytes(size)),
                None => "mixed page sizes".into(),
            };
            bail!(
                "{} serves pages of {}; this guest's regions have {guest}: {}",
                serves.option,
                units::bytes(serves.page_size),
                serves.remedy
            );
        }
    }
    let options = ServeOptions {
        mode: args.mode.into(),
        // A page server streams every page itself; the pager's prefetcher would only
        // duplicate that on the urgent channel.
        prefetch: if memory.file.is_some() {
            args.prefetch.plan(geometry.pages as usize)?
        } else {
            pager::Prefetch::None
        },
        record: args.prefetch.record.clone(),
        // `run` kills on every fatal error, this one included.
        kill_peer_on_error: false,
        // Killed (the default), the VMM ends by the kill: its faults wait on the held uffd
        // until then. Left running (--no-kill-peer), what was never placed is poisoned.
        poison_on_fatal: args.no_kill_peer,
        fault_around: args.prefetch.fault_around,
        readahead: !args.prefetch.no_readahead,
    };
    firecracker::serve(hs, memory.source.clone(), &options).context("serving guest memory")
}

/// The socket path given, positional or flag.
fn socket_of(args: &Args) -> Option<&Path> {
    args.socket_arg.as_deref().or(args.socket.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(std::iter::once("fc-handler").chain(argv.iter().copied()))
            .map(|c| c.args)
    }

    #[test]
    fn the_positional_form_and_the_flags_are_the_same_command() {
        let a = parse(&["/run/fc.sock", "snap.mem"]).expect("positional");
        let b = parse(&["--socket", "/run/fc.sock", "--mem-file", "snap.mem"]).expect("flags");
        assert_eq!(socket_of(&a), socket_of(&b));
        assert_eq!(
            a.mem_file_arg.as_deref(),
            b.mem_file.as_deref(),
            "same memory file"
        );
    }

    #[test]
    fn usage_mistakes_are_refused_by_the_parser() {
        for argv in [
            &["/run/fc.sock"][..],                                  // no memory
            &["snap.mem", "--socket", "/run/fc.sock"],              // both sockets
            &["/s", "m", "--mode", "sigbus"],                       // not a handler mode
            &["/s", "m", "--no-kill-peer", "--kill-peer-on-error"], // contradiction
            &["/s", "--source", "127.0.0.1:1"],                     // no key
            &["/s", "--source", "nohost", "--key-file", "k"],       // not an address
            &["/s", "m", "--source", "127.0.0.1:1", "--key-file", "k"],
        ] {
            assert!(parse(argv).is_err(), "{argv:?} must be refused");
        }
        parse(&["/s", "m", "--kill-peer-on-error"]).expect("the old flag is still accepted");
    }
}
