//! Firecracker's external page-fault handler protocol, as a library: a VMM or a sidecar
//! embeds [`accept`] + [`serve`] and gets the same handler `uffdkit fc-handler` runs.
//!
//! Firecracker restores a snapshot with `"mem_backend": {"backend_type": "Uffd",
//! "backend_path": SOCK}`. During `PUT /snapshot/load` it connects to SOCK and sends, in
//! one `sendmsg`, a JSON array of guest memory regions with the userfaultfd attached
//! (already through `UFFDIO_API` with `EVENT_REMOVE`, non-blocking, every region
//! registered MISSING). It then keeps the socket open and never writes again: EOF means
//! it has exited. It touches guest memory during the load call, so serving starts the
//! moment the fd arrives. Balloon inflation and free-page reporting raise REMOVE events:
//! those pages then read as zeros, never as snapshot data.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use uffd_core::{peer_credentials, recv_fds, MemoryKind, PeerCredentials, Uffd};

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
}

impl GuestRegion {
    /// The region's page size: `page_size`, else `page_size_kib`; 4 KiB or 2 MiB.
    pub fn page_size(&self) -> Result<usize, HandshakeError> {
        match self.page_size.or(self.page_size_kib) {
            Some(4096) => Ok(4096),
            Some(2097152) => Ok(2 << 20),
            Some(other) => Err(HandshakeError::Invalid(format!(
                "region at {:#x}: unsupported page size {other}",
                self.base_host_virt_addr
            ))),
            None => Err(HandshakeError::Invalid(format!(
                "region at {:#x}: no page_size or page_size_kib",
                self.base_host_virt_addr
            ))),
        }
    }

    /// The pager region for this guest region.
    pub fn spec(&self) -> Result<RegionSpec, HandshakeError> {
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
        let (Ok(base), Ok(len)) = (base, len) else {
            return Err(HandshakeError::Invalid(
                "region beyond the address space".into(),
            ));
        };
        let mut spec = RegionSpec::new(base, len, kind, self.offset);
        spec.page_size = page;
        Ok(spec)
    }
}

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed.
    #[error("handshake socket: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed before a complete region table arrived.
    #[error("the peer closed the connection before a complete region table ({0} bytes received)")]
    Truncated(usize),
    /// Not the JSON Firecracker sends.
    #[error("malformed region table: {0}")]
    Json(serde_json::Error),
    /// JSON, but not usable.
    #[error("invalid region table: {0}")]
    Invalid(String),
    /// No userfaultfd came with the message.
    #[error("no userfaultfd came with the region table ({0} fd(s) received, none a userfaultfd)")]
    NoUffd(usize),
}

/// A completed handshake: the connection (kept open: EOF means the VMM exited), the
/// VMM's userfaultfd, its regions, and who it is.
#[derive(Debug)]
pub struct Handshake {
    /// The connection.
    pub stream: UnixStream,
    /// The VMM's userfaultfd.
    pub uffd: Uffd,
    /// The guest memory regions.
    pub regions: Vec<GuestRegion>,
    /// The VMM process (`SO_PEERCRED`).
    pub peer: Option<PeerCredentials>,
}

/// Accepts one connection on `listener` and completes the handshake: reads until the
/// JSON region table is complete (it may arrive in several reads), takes the userfaultfd
/// among the fds that came with it (closing any others), and validates the regions.
pub fn accept(listener: &UnixListener) -> Result<Handshake, HandshakeError> {
    let (stream, _) = listener.accept()?;
    handshake(stream)
}

/// The handshake on an accepted connection; see [`accept`].
pub fn handshake(stream: UnixStream) -> Result<Handshake, HandshakeError> {
    let peer = peer_credentials(&stream).ok();
    let mut data = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let regions: Vec<GuestRegion> = loop {
        let got = recv_fds(&stream, &mut buf, 8)?;
        fds.extend(got.fds);
        if got.bytes == 0 {
            return Err(HandshakeError::Truncated(data.len()));
        }
        data.extend_from_slice(&buf[..got.bytes]);
        if data.len() > MAX_HANDSHAKE {
            return Err(HandshakeError::Invalid(format!(
                "more than {MAX_HANDSHAKE} bytes without a complete region table"
            )));
        }
        match serde_json::from_slice(&data) {
            Ok(regions) => break regions,
            Err(e) if e.is_eof() => continue, // the rest is still on its way
            Err(e) => return Err(HandshakeError::Json(e)),
        }
    };
    if regions.is_empty() {
        return Err(HandshakeError::Invalid("no regions".into()));
    }
    for r in &regions {
        r.spec()?;
    }
    let count = fds.len();
    let uffd = fds
        .into_iter()
        .find_map(|fd| Uffd::from_fd(fd).ok())
        .ok_or(HandshakeError::NoUffd(count))?;
    Ok(Handshake {
        stream,
        uffd,
        regions,
        peer,
    })
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
    /// Kill the VMM (SIGKILL, by `SO_PEERCRED` pid) if serving fails, so it does not
    /// hang forever on faults nobody will serve.
    pub kill_peer_on_error: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            mode: DeliveryMode::PerCpu,
            prefetch: Prefetch::Sequential,
            record: None,
            kill_peer_on_error: false,
        }
    }
}

/// Serves the handshake's regions from `source` until the VMM closes the connection
/// (exits) or its process is gone. Returns the final counters.
pub fn serve(
    hs: Handshake,
    source: Arc<dyn Source>,
    options: &ServeOptions,
) -> crate::Result<StatsSnapshot> {
    let peer = hs.peer;
    let result = serve_inner(hs, source, options);
    if result.is_err() && options.kill_peer_on_error {
        if let Some(peer) = peer.filter(|p| p.pid > 0) {
            // SAFETY: kill(2) of the VMM process that connected to us.
            unsafe { libc::kill(peer.pid, libc::SIGKILL) };
        }
    }
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
        .map_err(|e| crate::Error::Handshake(e.to_string()))?;
    let mut builder = Pager::builder(hs.uffd, source)
        .regions(specs)
        .register(false)
        .mode(options.mode)
        .prefetch(options.prefetch.clone())
        .prefetch_after_first_fault(true);
    if let Some(path) = &options.record {
        builder = builder.record(path);
    }
    let pager = builder.start()?;
    wait_for_eof(&hs.stream, &pager);
    pager.stop()
}

/// Blocks until the peer closes the connection or the pager stops by itself.
fn wait_for_eof(stream: &UnixStream, pager: &Pager) {
    let mut sink = [0u8; 256];
    loop {
        let mut pfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 50) };
        if pager.has_stopped() {
            return;
        }
        if n > 0 {
            // Firecracker never writes after the handshake: data is ignored, EOF ends.
            match (&*stream).read(&mut sink) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}
