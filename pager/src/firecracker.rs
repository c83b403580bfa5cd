//! Firecracker's external page-fault handler protocol, as a library: a VMM or a sidecar
//! embeds [`accept`] + [`serve`] and gets the same handler `uffdkit fc-handler` runs.
//!
//! Firecracker restores a snapshot with `"mem_backend": {"backend_type": "Uffd",
//! "backend_path": SOCK}`. During `PUT /snapshot/load` it connects to SOCK and sends, in
//! one `sendmsg`, a JSON array of guest memory regions with the userfaultfd attached
//! (already through `UFFDIO_API` with `EVENT_REMOVE`, non-blocking, every region
//! registered MISSING). It never writes again; from 1.12 it keeps the socket open, before
//! 1.12 it closed it right after sending — so its exit is watched through a pidfd, never
//! taken from the socket's end (see [`serve`]). It touches guest memory during the load
//! call, so serving starts the
//! moment the fd arrives. Balloon inflation and free-page reporting raise REMOVE events:
//! those pages then read as zeros, never as snapshot data. Before 1.11 the balloon of a
//! UFFD-restored VM mapped fresh memory over its pages instead, which no event reports:
//! they are left to Firecracker ([`PagerBuilder::silent_unmaps`](crate::PagerBuilder::silent_unmaps)).
//!
//! Firecracker keeps its own copy of the userfaultfd, so once it has sent it, a handler
//! that gives up leaves its vCPUs hanging on their next fault and its API dead inside
//! `PUT /snapshot/load`. [`HandshakeError::leaves_vmm_waiting`] says when that is the
//! case, and [`kill_peer`] ends such a VMM, as Firecracker's example handlers do. A peer
//! that sends nothing, or no userfaultfd, is not a VMM (a probe, a stranger) and is
//! refused without harm; one that stays silent is refused after [`HANDSHAKE_DEADLINE`].

use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt::PeerPidfd};
use serde::Deserialize;
use uffd_core::{peer_credentials, recv_fds, MemoryKind, PeerCredentials, Received, Uffd};

pub use crate::error::HandshakeError;
use crate::prefetch::Prefetch;
use crate::{DeliveryMode, Pager, RegionSpec, Source, StatsSnapshot};

/// Largest handshake accepted (Firecracker's is well under 1 KiB per region).
const MAX_HANDSHAKE: usize = 1 << 20;

/// One guest memory region as Firecracker describes it. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GuestRegion {
    /// Start of the region in Firecracker's address space.
    pub base_host_virt_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the region in the snapshot memory file.
    pub offset: u64,
    /// Page size in bytes (4096, or 2097152 for a 2 MiB hugetlbfs restore).
    #[serde(default)]
    pub page_size: Option<u64>,
    /// Deprecated duplicate of `page_size` (also in bytes, despite the name).
    #[serde(default)]
    pub page_size_kib: Option<u64>,
    /// Sent by Firecracker's secret-freedom builds (branch `feature/secret-hiding`, in no
    /// release up to 1.16): true when guest memory is a `guest_memfd`, which comes as a
    /// second fd and is registered MINOR as well, and whose vCPU faults arrive as requests
    /// on the socket that wait for replies. Not served here: refused
    /// ([`HandshakeError::GuestMemfd`]).
    #[serde(default)]
    pub is_guest_memfd: bool,
}

impl GuestRegion {
    /// The region's page size: `page_size` (Firecracker 1.12 on), else `page_size_kib`
    /// (1.7 to 1.11, in bytes despite its name), else 4 KiB (before 1.7, which sent
    /// neither and had no huge pages); 4 KiB or 2 MiB.
    pub fn page_size(&self) -> Result<usize, HandshakeError> {
        match self.page_size.or(self.page_size_kib).unwrap_or(4096) {
            4096 => Ok(4096),
            2097152 => Ok(2 << 20),
            size => Err(HandshakeError::PageSize {
                base: self.base_host_virt_addr,
                size,
            }),
        }
    }

    /// The pager region for this guest region.
    pub fn spec(&self) -> Result<RegionSpec, HandshakeError> {
        if self.is_guest_memfd {
            return Err(HandshakeError::GuestMemfd {
                base: self.base_host_virt_addr,
            });
        }
        let page = self.page_size()?;
        let kind = if page == 4096 {
            MemoryKind::Anon
        } else {
            MemoryKind::HugetlbPrivate
        };
        let (base, len) = (
            usize::try_from(self.base_host_virt_addr),
            usize::try_from(self.size),
        );
        let ends = |(base, len): (usize, usize)| base.checked_add(len).map(|_| (base, len));
        let Some((base, len)) = base.ok().zip(len.ok()).and_then(ends) else {
            // Beyond this process's addresses, or ending past the top of them.
            return Err(HandshakeError::AddressSpace {
                base: self.base_host_virt_addr,
                size: self.size,
            });
        };
        let mut spec = RegionSpec::new(base, len, kind, self.offset);
        spec.page_size = page;
        Ok(spec)
    }
}

impl HandshakeError {
    /// Whether the peer had sent its userfaultfd before the handshake failed: it is a VMM
    /// whose guest will hang on its first fault now that nobody serves it, so it should
    /// be killed ([`kill_peer`]) rather than left waiting. False for a peer that sent
    /// nothing, or bytes without a userfaultfd (not a VMM), and for socket errors.
    pub fn leaves_vmm_waiting(&self) -> bool {
        match self {
            Self::Io(_) | Self::Empty | Self::NoUffd(_) | Self::OwnProcess => false,
            Self::Silent { received, .. } => *received > 0,
            Self::Truncated(_)
            | Self::Json(_)
            | Self::TooLarge(_)
            | Self::NoRegions
            | Self::PageSize { .. }
            | Self::GuestMemfd { .. }
            | Self::AddressSpace { .. } => true,
        }
    }
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// How long [`handshake`] waits for a complete region table. Firecracker sends it the
/// moment it connects; a peer that stays silent longer is not a VMM, and must not hold
/// the listener (a VMM queued behind it is already touching its memory).
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(3);

/// A completed handshake: the connection (Firecracker before 1.12 closes its end at once;
/// later ones keep it open until they exit), the VMM's userfaultfd, its regions, and who
/// it is.
#[derive(Debug)]
pub struct Handshake {
    /// The connection.
    pub stream: UnixStream,
    /// The VMM's userfaultfd. Private: `serve` places pages through it, which is sound
    /// only for the uffd the handshake checked is not this process's (read it with
    /// [`Handshake::uffd`]).
    uffd: Uffd,
    /// The guest memory regions.
    pub regions: Vec<GuestRegion>,
    /// The VMM process (`SO_PEERCRED`).
    pub peer: Option<PeerCredentials>,
    /// A pidfd of the VMM process (`SO_PEERPIDFD`, Linux 6.5; before, `pidfd_open(2)` of
    /// the `SO_PEERCRED` pid, Linux 5.3), taken as the connection was accepted: it names
    /// that process for good, where its PID may be reused once it exits. [`kill_pidfd`]
    /// signals through it, [`serve`] watches it for the VMM's exit.
    pub peer_pidfd: Option<OwnedFd>,
}

impl Handshake {
    /// The VMM's userfaultfd.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }
}

/// Accepts one connection on `listener` and completes the handshake: reads until the
/// JSON region table is complete (it may arrive in several reads, within
/// [`HANDSHAKE_DEADLINE`]), takes the userfaultfd among the fds that came with its first
/// bytes (closing any others), and validates the regions.
pub fn accept(listener: &UnixListener) -> Result<Handshake, HandshakeError> {
    let (stream, _) = listener.accept()?;
    handshake(stream)
}

/// The handshake on an accepted connection; see [`accept`].
pub fn handshake(stream: UnixStream) -> Result<Handshake, HandshakeError> {
    handshake_within(stream, HANDSHAKE_DEADLINE)
}

/// The handshake on an accepted connection, waiting at most `deadline` for the table.
pub fn handshake_within(
    stream: UnixStream,
    deadline: Duration,
) -> Result<Handshake, HandshakeError> {
    let peer = peer_credentials(&stream).ok();
    let peer_pidfd = peer_pidfd(&stream, peer);
    let (regions, uffd) = receive_table(&stream, deadline)?;
    stream.set_read_timeout(None)?;
    if regions.is_empty() {
        return Err(HandshakeError::NoRegions);
    }
    for r in &regions {
        r.spec()?;
    }
    if peer.is_some_and(|p| p.pid as u32 == std::process::id()) {
        // A userfaultfd of this process would have the pager write into this process's
        // memory at addresses the peer named: `serve` relies on this refusal.
        return Err(HandshakeError::OwnProcess);
    }
    Ok(Handshake {
        stream,
        uffd,
        regions,
        peer,
        peer_pidfd,
    })
}

/// Reads the JSON region table and the userfaultfd that comes with its first bytes.
fn receive_table(
    stream: &UnixStream,
    deadline: Duration,
) -> Result<(Vec<GuestRegion>, Uffd), HandshakeError> {
    let until = Instant::now() + deadline;
    let mut buf = vec![0u8; 64 << 10];
    let first = receive_before(stream, &mut buf, until, deadline, 0)?;
    if first.bytes == 0 {
        return Err(HandshakeError::Empty);
    }
    // A VMM attaches its userfaultfd to the table's first bytes; bytes without one are
    // not from a VMM, whatever follows. Any other fds are closed on drop.
    let count = first.fds.len();
    let uffd = first
        .fds
        .into_iter()
        .find_map(|fd| Uffd::from_fd(fd).ok())
        .ok_or(HandshakeError::NoUffd(count))?;
    let mut data = buf[..first.bytes].to_vec();
    loop {
        match serde_json::from_slice(&data) {
            Ok(regions) => return Ok((regions, uffd)),
            Err(e) if e.is_eof() => {} // the rest is still on its way
            Err(e) => return Err(HandshakeError::Json(e)),
        }
        let more = receive_before(stream, &mut buf, until, deadline, data.len())?;
        if more.bytes == 0 {
            return Err(HandshakeError::Truncated(data.len()));
        }
        data.extend_from_slice(&buf[..more.bytes]);
        if data.len() > MAX_HANDSHAKE {
            return Err(HandshakeError::TooLarge(MAX_HANDSHAKE));
        }
    }
}

/// One `recvmsg` that must complete before `until` (`received`: bytes so far, for the
/// error).
fn receive_before(
    stream: &UnixStream,
    buf: &mut [u8],
    until: Instant,
    deadline: Duration,
    received: usize,
) -> Result<Received, HandshakeError> {
    let silent = HandshakeError::Silent { deadline, received };
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(silent);
    }
    stream.set_read_timeout(Some(left))?;
    match recv_fds(stream, buf, 8) {
        Ok(got) => Ok(got),
        // SO_RCVTIMEO expired.
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Err(silent),
        Err(e) => Err(e.into()),
    }
}

/// Sends SIGKILL through `pidfd` (`pidfd_send_signal(2)`, Linux 5.1), as Firecracker's
/// example handlers do on a fatal error: a VMM whose faults nobody serves hangs forever,
/// its API dead. The pidfd names the process for good ([`Handshake::peer_pidfd`]): a
/// VMM that already exited is reported (ESRCH), and no other process that reused its PID
/// is ever signalled.
pub fn kill_pidfd(pidfd: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with a pidfd we borrow, a null siginfo and no flags;
    // nix does not wrap it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends SIGKILL to the peer of a handshake by PID (`SO_PEERCRED`). **Racy**: once the
/// VMM has exited, its PID may name another process; prefer [`kill_pidfd`] with
/// [`Handshake::peer_pidfd`], which [`serve`] uses when the kernel gave one. Refuses pids
/// that cannot name a VMM peer (≤ 0, or this process).
pub fn kill_peer(peer: &PeerCredentials) -> std::io::Result<()> {
    if peer.pid <= 0 || peer.pid as u32 == std::process::id() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!("pid {} is not a VMM peer", peer.pid),
        ));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(peer.pid),
        nix::sys::signal::SIGKILL,
    )?;
    Ok(())
}

/// How [`serve`] runs the pager.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Delivery mode (SIGBUS is not possible: the memory is Firecracker's).
    pub mode: DeliveryMode,
    /// Background prefetch, started once the first fault has been served.
    pub prefetch: Prefetch,
    /// Record the first-fault order to this file.
    pub record: Option<PathBuf>,
    /// Kill the VMM ([`kill_peer`]) if serving fails, so it does not hang forever on
    /// faults nobody will serve.
    pub kill_peer_on_error: bool,
    /// Pages placed after each faulting page ([`PagerBuilder::fault_around`](crate::PagerBuilder::fault_around)).
    pub fault_around: usize,
    /// Sequential readahead ([`PagerBuilder::readahead`](crate::PagerBuilder::readahead)).
    pub readahead: bool,
    /// Poison the pages not yet placed on a fatal error
    /// ([`PagerBuilder::poison_on_fatal`](crate::PagerBuilder::poison_on_fatal)). An
    /// embedder that kills the VMM instead turns it off: the VMM's faults then stay
    /// blocked (its userfaultfd is held) until it is killed, so it ends by the kill, never
    /// by a SIGBUS racing it.
    pub poison_on_fatal: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            mode: DeliveryMode::PerCpu,
            prefetch: Prefetch::Sequential,
            record: None,
            kill_peer_on_error: false,
            fault_around: 0,
            readahead: true,
            poison_on_fatal: true,
        }
    }
}

/// Serves the handshake's regions from `source` until the VMM's process exits (see
/// `wait_for_exit`: not when it closes the connection, which Firecracker before 1.12 does
/// right after the handshake). Returns the final counters.
pub fn serve(
    hs: Handshake,
    source: Arc<dyn Source>,
    options: &ServeOptions,
) -> crate::Result<StatsSnapshot> {
    let peer = hs.peer;
    let pidfd = hs.peer_pidfd.as_ref().and_then(|fd| fd.try_clone().ok());
    // Held until the VMM is dealt with: closing the last descriptor of its userfaultfd
    // would release its blocked faults before it is killed.
    let hold = hs.uffd.as_fd().try_clone_to_owned().ok();
    let result = serve_inner(hs, source, options);
    if result.is_err() && options.kill_peer_on_error {
        // Best effort: the error being returned is the one that matters.
        let killed = match (&pidfd, &peer) {
            (Some(fd), _) => kill_pidfd(fd.as_fd()),
            (None, Some(peer)) => kill_peer(peer),
            (None, None) => Ok(()),
        };
        if let Err(e) = killed {
            log::warn!("cannot kill the VMM after a fatal error: {e}");
        }
    }
    drop(hold);
    result
}

fn serve_inner(
    hs: Handshake,
    source: Arc<dyn Source>,
    options: &ServeOptions,
) -> crate::Result<StatsSnapshot> {
    let specs = hs
        .regions
        .iter()
        .map(|r| r.spec())
        .collect::<Result<Vec<_>, _>>()
        .map_err(crate::Error::Handshake)?;
    let builder = Pager::builder(hs.uffd, source);
    // SAFETY: the regions are the peer's, in the address space its userfaultfd serves,
    // which is not this process's (`handshake_within` refuses a peer that is this
    // process); the pager writes nothing through an alias (copy regions only).
    let builder = unsafe { builder.regions(specs) };
    let mut builder = builder
        .register(false)
        .mode(options.mode)
        .prefetch(options.prefetch.clone())
        .prefetch_after_first_fault(true)
        .fault_around(options.fault_around)
        .readahead(options.readahead)
        .poison_on_fatal(options.poison_on_fatal)
        // Firecracker 1.1 to 1.10 maps fresh memory over a balloon's pages after a UFFD
        // restore (`remove_range` with `restored`), and its uffd has no UNMAP event: those
        // pages are its own from then on, never a reason to fail (and kill it).
        .silent_unmaps(true);
    if let Some(path) = &options.record {
        builder = builder.record(path);
    }
    let pager = builder.start()?;
    wait_for_exit(&hs.stream, hs.peer_pidfd.as_ref(), &pager);
    pager.stop()
}

/// Blocks until the VMM's process exits or the pager stops by itself.
///
/// Not until the connection closes: Firecracker before 1.12 drops its end of the socket
/// right after sending the handshake (`send_uffd_handshake` returned with the socket a
/// local; 1.12 keeps it open), while it goes on running on the userfaultfd it keeps.
/// The process is watched through its pidfd ([`Handshake::peer_pidfd`]), readable once
/// it exits. Only without one (a kernel before 5.3) does the connection's end stand for
/// the process's.
fn wait_for_exit(stream: &UnixStream, pidfd: Option<&OwnedFd>, pager: &Pager) {
    let mut sink = [0u8; 256];
    let mut open = true;
    loop {
        let mut fds = Vec::with_capacity(2);
        if let Some(fd) = pidfd {
            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
        }
        if open {
            fds.push(PollFd::new(stream.as_fd(), PollFlags::POLLIN));
        }
        let n = poll(&mut fds, PollTimeout::from(50u8)).unwrap_or(0);
        let exited = pidfd.is_some() && fds[0].any().unwrap_or(false);
        let readable = open && fds.last().and_then(|f| f.any()).unwrap_or(false);
        drop(fds);
        if pager.has_stopped() || exited {
            return;
        }
        if n > 0 && readable {
            // Firecracker never writes after the handshake: data is ignored.
            if let Ok(0) | Err(_) = (&*stream).read(&mut sink) {
                if pidfd.is_none() {
                    return;
                }
                log::debug!("the VMM closed its end of the socket; serving until it exits");
                open = false;
            }
        }
    }
}

/// A pidfd of the process at the other end of `stream` (whose credentials are `peer`):
/// `SO_PEERPIDFD` (Linux 6.5), else `pidfd_open(2)` of its pid — taken while the peer is
/// connected and waits for an answer, so the pid is still its own. `None` without either.
pub fn peer_pidfd(stream: &UnixStream, peer: Option<PeerCredentials>) -> Option<OwnedFd> {
    getsockopt(stream, PeerPidfd)
        .ok()
        .or_else(|| peer.and_then(|p| pidfd_open(p.pid).ok()))
}

/// `pidfd_open(2)` (Linux 5.3): a descriptor for process `pid`, readable once it exits.
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with a pid and no flags; nix does not wrap it. A non-negative
    // result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above: ours, open, not owned elsewhere.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}
