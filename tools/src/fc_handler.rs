//! `uffdkit fc-handler`: a drop-in external page-fault handler for Firecracker snapshot
//! restore (`"mem_backend": {"backend_type": "Uffd", "backend_path": SOCKET}`), run as
//! Firecracker's example handlers are (`uffdkit fc-handler SOCKET MEMFILE`) or with flags.
//!
//! What it promises the VMM: everything that can be checked is checked before the socket
//! exists, so a bad option never reaches Firecracker; a path another handler listens on
//! is refused (taking it over would orphan that one), a stale socket file replaced, and
//! ours removed on exit and on SIGINT/SIGTERM/SIGHUP; once Firecracker has handed over its
//! userfaultfd, any fatal error kills it (SIGKILL, the `SO_PEERCRED` pid), as Firecracker's
//! example handlers do, rather than leave it hanging in `PUT /snapshot/load` with its API
//! dead — unless `--no-kill-peer`.

use std::io::{ErrorKind, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use log::{debug, info, warn};
use pager::firecracker::{self, GuestRegion, Handshake, HandshakeError, ServeOptions};
use pager::{FileSource, Source, StatsSnapshot};
use uffd_core::{peer_credentials, PeerCredentials};

use crate::cli_args::{HandlerMode, PrefetchArgs};
use crate::units;
use postcopy::socket_file::{self, SocketFile};

const AFTER_HELP: &str = "\
Drop-in for Firecracker's example handlers: `uffdkit fc-handler SOCKET MEMFILE` is the \
same command line, and so is `--socket SOCKET --mem-file MEMFILE`.

Before the socket exists, the handler checks its options, the memory file (readable, not \
empty), the replay file and the record path, and refuses a SOCKET where another listener \
answers; a stale socket file is replaced. Once Firecracker has sent its userfaultfd, any \
fatal error (a memory file shorter than the guest, a refused region table, a failing \
source, SIGINT/SIGTERM/SIGHUP) SIGKILLs the Firecracker process (SO_PEERCRED), which \
would otherwise hang on faults nobody serves; --no-kill-peer leaves it running. The \
socket is removed on every exit. Exit status: 0 when Firecracker closed the connection \
(it exited) after a clean restore; 1 on failure; 2 on a usage error; 128+N on signal N.";

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
    /// (host:port or unix:/path; 4 KiB regions; the server streams every page itself, so
    /// --prefetch does not apply). Secured by TLS (--tls-cert, --tls-key, --tls-ca) or,
    /// on a trusted link only, a pre-shared key (--key-file: pages travel unencrypted).
    #[arg(long, requires = "source_security", value_parser = parse_addr)]
    source: Option<postcopy::net::Addr>,
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
    /// Delivery mode: handler threads, which can serve Firecracker's memory.
    #[arg(long, value_enum, default_value_t = HandlerMode::Percpu)]
    mode: HandlerMode,
    /// On a fatal error after Firecracker connected, leave it running instead of
    /// SIGKILLing it (its guest then hangs on its next fault until someone kills it).
    #[arg(long)]
    no_kill_peer: bool,
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
    /// The page server's client, for its reconnection count.
    client: Option<Arc<postcopy::client::RemoteSource>>,
}

/// What a signal or an error must clean up: our socket, and the VMM once it connected.
#[derive(Default)]
struct Session {
    socket: Mutex<Option<SocketFile>>,
    peer: Mutex<Option<PeerCredentials>>,
}

impl Session {
    fn set_socket(&self, file: SocketFile) {
        *self.socket.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
    }

    fn set_peer(&self, peer: Option<PeerCredentials>) {
        *self.peer.lock().unwrap_or_else(|p| p.into_inner()) = peer;
    }

    /// On SIGINT/SIGTERM/SIGHUP: the restore cannot complete, so the VMM goes first (if
    /// told to), then our socket.
    fn terminate(&self, signal: nix::sys::signal::Signal, kill: bool) {
        warn!("{signal}: stopping");
        if let Some(peer) = *self.peer.lock().unwrap_or_else(|p| p.into_inner()) {
            end_peer(&peer, kill, &format!("the handler got {signal}"));
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
    let claimed = socket_file::claim(socket)?;
    session.set_socket(claimed.file.clone());
    info!("listening on {} for Firecracker", socket.display());

    let hs = accept_vmm(&claimed.listener, kill)?;
    session.set_peer(hs.peer);
    let peer = hs.peer;
    let who = vmm_name(peer);
    let geometry = Geometry::of(&hs.regions);
    info!("{who} connected: {}", geometry.describe());
    refuse_others(&claimed.listener, who.clone())?;

    // Held until the VMM is dealt with: closing the last descriptor of its userfaultfd
    // would release its blocked faults onto zero pages before it is killed.
    let hold_uffd = hs
        .uffd
        .as_fd()
        .try_clone_to_owned()
        .context("duplicate the VMM's userfaultfd")?;
    let started = Instant::now();
    let result = serve(args, &memory, &geometry, hs);
    if let (Err(_), Some(peer)) = (&result, peer) {
        end_peer(&peer, kill, "the restore failed (the error follows)");
    }
    drop(hold_uffd);
    let stats = result?;
    let mut out = std::io::stdout().lock();
    for line in summary(&who, started.elapsed(), &geometry, &memory, args, &stats) {
        // The restore is done: a closed stdout loses the summary, not the result.
        let _ = writeln!(out, "{line}");
    }
    Ok(())
}

/// Opens the memory file (readable, not empty) or connects to the page server.
fn open_memory(args: &Args) -> Result<Memory> {
    if let Some(path) = args.mem_file_arg.as_ref().or(args.mem_file.as_ref()) {
        let len = std::fs::File::open(path)
            .and_then(|f| f.metadata())
            .with_context(|| format!("memory file {}", path.display()))?
            .len();
        if len == 0 {
            bail!("memory file {} is empty", path.display());
        }
        let source: Arc<dyn Source> = if args.diff.is_empty() {
            Arc::new(
                FileSource::mmap(path)
                    .with_context(|| format!("memory file {}", path.display()))?,
            )
        } else {
            crate::snapshot::diff_chain_source(path, &args.diff)?
        };
        return Ok(Memory {
            source,
            file: Some(path.clone()),
            remote: "",
            client: None,
        });
    }
    if let Some(url) = &args.image {
        return Ok(Memory {
            source: crate::image::fc_source(Some(url), &args.image_source)?,
            file: None,
            remote: "the object store",
            client: None,
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
    let timing = postcopy::link::Timing {
        silence,
        heartbeat: silence / 6,
        give_up_after: seconds("give-up", args.give_up)?,
        ..postcopy::link::Timing::default()
    };
    let remote = postcopy::client::RemoteSource::connect_with(addr, security, timing)
        .with_context(|| format!("connect to the page server at {addr}"))?;
    let remote = Arc::new(remote);
    Ok(Memory {
        source: remote.clone(),
        file: None,
        remote: "the page server",
        client: Some(remote),
    })
}

/// `--source`: host:port or unix:/path.
fn parse_addr(text: &str) -> Result<postcopy::net::Addr, String> {
    text.parse()
        .map_err(|_| format!("not an address (host:port or unix:/path): {text}"))
}

/// Waits for Firecracker: a connection that sends nothing, or no userfaultfd, is not a
/// VMM (a probe, a stranger) and is let go; a VMM whose handshake fails is killed (unless
/// told not to) and ends the run.
fn accept_vmm(listener: &UnixListener, kill: bool) -> Result<Handshake> {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if transient(&e) => {
                warn!("accept: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e).context("accept a connection"),
        };
        let peer = peer_credentials(&stream).ok();
        match firecracker::handshake(stream) {
            Ok(hs) => return Ok(hs),
            Err(HandshakeError::Empty) => debug!(
                "a connection from {} closed without a word (a probe of the socket?); still waiting",
                peer_name(peer)
            ),
            Err(e) if !e.leaves_vmm_waiting() => warn!(
                "ignoring a connection from {}: {e}; still waiting for Firecracker",
                peer_name(peer)
            ),
            Err(e) => {
                if let Some(peer) = peer {
                    end_peer(&peer, kill, "its region table was refused");
                }
                return Err(e).with_context(|| format!("handshake with {}", vmm_name(peer)));
            }
        }
    }
}

/// After the handshake the listener stays bound (the path is ours until we exit, so a
/// second handler is refused); connections to it are closed at once, not left queued.
fn refuse_others(listener: &UnixListener, serving: String) -> Result<()> {
    let listener = listener.try_clone().context("clone the listener")?;
    std::thread::Builder::new()
        .name("refuse".into())
        .spawn(move || {
            let mut refused = 0u64;
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let who = peer_name(peer_credentials(&stream).ok());
                        refused += 1;
                        if refused == 1 {
                            warn!("refused a connection from {who}: this handler serves {serving} only (further refusals at debug level)");
                        } else {
                            debug!("refused connection {refused} from {who}");
                        }
                    }
                    Err(e) if transient(&e) => std::thread::sleep(Duration::from_millis(100)),
                    Err(_) => return,
                }
            }
        })
        .context("start the refusing thread")?;
    Ok(())
}

/// Errors `accept(2)` recovers from: an aborted connection, or fds and memory running
/// out (a flood of connections) for a moment.
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// A connection's peer before it proved to be a VMM.
fn peer_name(peer: Option<PeerCredentials>) -> String {
    match peer {
        Some(p) => format!("pid {}", p.pid),
        None => "an unknown peer".into(),
    }
}

/// The VMM that completed the handshake.
fn vmm_name(peer: Option<PeerCredentials>) -> String {
    match peer {
        Some(p) => format!("Firecracker (pid {})", p.pid),
        None => "Firecracker (pid unknown)".into(),
    }
}

/// Kills the VMM after a fatal error (or says why it is left running).
fn end_peer(peer: &PeerCredentials, kill: bool, why: &str) {
    let who = vmm_name(Some(*peer));
    if !kill {
        warn!("leaving {who} running (--no-kill-peer): {why}; its guest hangs on its next fault");
        return;
    }
    match firecracker::kill_peer(peer) {
        Ok(()) => {
            warn!("killed {who} with SIGKILL, as it would hang on faults nobody serves: {why}")
        }
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => debug!("{who} is already gone"),
        Err(e) => warn!("could not kill {who}: {e}"),
    }
}

/// The guest memory Firecracker described.
struct Geometry {
    regions: usize,
    pages: u64,
    bytes: u64,
    /// The page size, if every region has the same.
    page_size: Option<u64>,
    /// Bytes of the memory file the regions need (the furthest `offset + size`).
    extent: u64,
}

impl Geometry {
    /// Of a handshake's regions (validated by the handshake: page sizes are known).
    fn of(regions: &[GuestRegion]) -> Geometry {
        let sizes: Vec<u64> = regions
            .iter()
            .map(|r| r.page_size().map_or(4096, |s| s as u64))
            .collect();
        Geometry {
            regions: regions.len(),
            pages: regions.iter().zip(&sizes).map(|(r, s)| r.size / s).sum(),
            bytes: regions.iter().map(|r| r.size).sum(),
            page_size: sizes
                .iter()
                .all(|s| Some(s) == sizes.first())
                .then(|| sizes[0]),
            extent: regions
                .iter()
                .map(|r| r.offset.saturating_add(r.size))
                .max()
                .unwrap_or(0),
        }
    }

    fn describe(&self) -> String {
        let pages = match self.page_size {
            Some(size) => format!("{} pages of {}", self.pages, units::bytes(size)),
            None => format!("{} pages of mixed sizes", self.pages),
        };
        format!(
            "{} region(s), {pages} ({} of guest memory)",
            self.regions,
            units::bytes(self.bytes)
        )
    }
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
        None if geometry.page_size != Some(4096) => {
            bail!("--source serves 4 KiB pages; this restore has other page sizes")
        }
        _ => {}
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
        fault_around: args.prefetch.fault_around,
        readahead: !args.prefetch.no_readahead,
    };
    firecracker::serve(hs, memory.source.clone(), &options).context("serving guest memory")
}

/// The exit summary: what was served, in pages and bytes, naming only what was used.
fn summary(
    who: &str,
    elapsed: Duration,
    geometry: &Geometry,
    memory: &Memory,
    args: &Args,
    stats: &StatsSnapshot,
) -> Vec<String> {
    let of = |pages: u64| match geometry.page_size {
        Some(size) => units::bytes(pages * size),
        None => "mixed page sizes".into(),
    };
    let mut lines = vec![format!(
        "fc-handler: {who} closed the connection after {:.2} s; it had {}.",
        elapsed.as_secs_f64(),
        geometry.describe()
    )];
    let faults = stats.faults();
    if memory.file.is_some() {
        lines.push(format!(
            "  on fault:   {} pages ({}) for {faults} faults",
            stats.placed_fault,
            of(stats.placed_fault)
        ));
        if args.prefetch.prefetch != "none" || args.prefetch.replay.is_some() {
            lines.push(format!(
                "  prefetched: {} pages ({})",
                stats.placed_prefetch,
                of(stats.placed_prefetch)
            ));
        }
    } else {
        let reconnects = match &memory.client {
            Some(client) => format!("; {} reconnections", client.reconnects()),
            None => String::new(),
        };
        lines.push(format!(
            "  from {}: {} pages ({}), requested on fault or streamed; {faults} faults{}",
            memory.remote,
            stats.placed_arrival,
            of(stats.placed_arrival),
            reconnects
        ));
    }
    if faults != stats.placed_fault {
        let remote_answer = format!("by {} (a request, or the stream)", memory.remote);
        let answered = if memory.file.is_some() {
            "with a zero page"
        } else {
            remote_answer.as_str()
        };
        lines.push(format!(
            "  (faults are touches the kernel reported, not pages: a fault may be answered \
             {answered}, or find its page already on its way ({}) or already placed ({}) and \
             need only a wake)",
            stats.faults_duplicate, stats.faults_wake_only
        ));
    }
    if stats.placed_zero > 0 || stats.events_remove > 0 {
        lines.push(format!(
            "  zero pages: {} (placed with UFFDIO_ZEROPAGE, never read), {} REMOVE event(s) (balloon or free-page reporting dropped pages)",
            stats.placed_zero, stats.events_remove
        ));
    }
    if let Some(path) = &args.prefetch.record {
        lines.push(format!("  working set recorded to {}", path.display()));
    }
    lines
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
