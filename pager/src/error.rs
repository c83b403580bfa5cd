//! Pager errors: the pager's own, a source's, and those of the files and handshakes it
//! reads (working sets, Firecracker's region table), owned here so that every file can
//! name them without importing the files that produce them.

use std::path::PathBuf;
#[cfg(feature = "firecracker")]
use std::time::Duration;

use page_state::PageState;

/// Errors of the pager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A region that cannot be served as described.
    #[error("region {base:#x}+{len:#x}: {reason}")]
    BadRegion {
        /// Its base.
        base: usize,
        /// Its length.
        len: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A region extends beyond the image.
    #[error("region needs image bytes up to {need}, the image has {have}")]
    ImageTooSmall {
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// A seeded page-state map that does not fit the regions.
    #[error("seeded page states: {pages} pages given, the regions hold {want}")]
    StatesSize {
        /// Pages in the map given.
        pages: usize,
        /// Pages the regions hold.
        want: usize,
    },
    /// A seeded page-state map with a page in a state nobody would resolve.
    #[error("seeded page states: page {page} is {state}; a seed holds only missing, received or zero pages")]
    SeededState {
        /// The first such page.
        page: usize,
        /// Its state.
        state: PageState,
    },
    /// The kernel refused an operation.
    #[error(transparent)]
    Uffd(#[from] uffd_core::Error),
    /// The source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// I/O (threads, eventfd, CPU affinity).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A Firecracker handshake that cannot be served.
    #[cfg(feature = "firecracker")]
    #[error("firecracker handshake")]
    Handshake(#[source] HandshakeError),
    /// A working-set file that cannot be used.
    #[error("working-set file {}", path.display())]
    BadRecording {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        problem: RecordingError,
    },
    /// A pager thread panicked (a source's `fetch` that panicked, a broken invariant):
    /// the pager stopped on it.
    #[error("pager thread {thread} panicked: {message}")]
    ThreadPanicked {
        /// The thread's name.
        thread: String,
        /// The panic's message.
        message: String,
    },
    /// `poll(2)` reported the userfaultfd in error (POLLERR: it was made blocking
    /// again, or never negotiated; POLLHUP/POLLNVAL: it is gone): nothing more can be
    /// read from it.
    #[error("the userfaultfd reported {what} (poll revents {revents:#x})")]
    UffdPoll {
        /// Which condition.
        what: &'static str,
        /// The poll revents.
        revents: i16,
    },
    /// A handler thread could not be pinned to its CPU.
    #[error("pin a handler thread to CPU {cpu}")]
    Pin {
        /// The CPU.
        cpu: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A page seeded Received is not present in memory: it would read as zeros forever
    /// ([`PagerBuilder::check_seeded`](crate::PagerBuilder::check_seeded)).
    #[error(
        "seeded page states: page {page} (at {addr:#x}) is marked received but is not in memory"
    )]
    SeededNotPresent {
        /// The first such page.
        page: usize,
        /// Its address.
        addr: usize,
    },
    /// A forked child's engine stopped with its parent's pager: the child's pages not
    /// placed yet are served no more, and poisoned.
    #[error(
        "the parent's pager stopped: a forked child's pages not yet placed are served no more"
    )]
    ParentStopped,
    /// A forked child's engine, serving from its parent's source
    /// ([`ChildSource::Shared`](crate::ChildSource::Shared)), got `Pending`: the
    /// source is remote and must give the child a source of its own or refuse it.
    #[error("a forked child's engine got Pending from its parent's source at image offset {offset:#x}: a remote source must give a child a source of its own or refuse it (Source::child)")]
    ChildSourcePending {
        /// The offset asked for.
        offset: u64,
    },
    /// The requested delivery mode cannot be used here.
    #[error("delivery mode {mode}: {reason}")]
    Mode {
        /// The mode.
        mode: &'static str,
        /// Why not.
        reason: String,
    },
}

/// An error from a [`crate::Source`].
#[derive(Debug, thiserror::Error)]
#[error("{what} at image offset {offset:#x}")]
pub struct SourceError {
    /// What failed.
    pub what: &'static str,
    /// Where.
    pub offset: u64,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// `Result` with the pager's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What is wrong with a working-set file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordingError {
    /// It could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Refused before a byte was read or written: a link, FIFO or device at the path,
    /// another user's file (see [`uffd_core::private_fs`]).
    #[error(transparent)]
    Refused(#[from] uffd_core::private_fs::FsError),
    /// It does not start with the working-set magic.
    #[error("not a uffdkit working-set file (no UFWS0001 header)")]
    NotAWorkingSet,
    /// Its header and body disagree.
    #[error("the header says {count} pages, the body holds {bytes} bytes")]
    Truncated {
        /// Pages the header announces.
        count: u64,
        /// Bytes after the header.
        bytes: usize,
    },
    /// It names a page the pager does not serve.
    #[error("page {page} is beyond the {pages} pages served")]
    PageBeyond {
        /// The page named.
        page: u64,
        /// Pages served.
        pages: usize,
    },
}

/// Why a handshake was refused.
///
/// A VMM sends its userfaultfd with the first bytes of the region table, so every refusal
/// after those first bytes is a refusal of a VMM that now holds a registered userfaultfd
/// and will hang on its first fault: see [`HandshakeError::leaves_vmm_waiting`].
#[cfg(feature = "firecracker")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The socket failed.
    #[error("handshake socket")]
    Io(#[source] std::io::Error),
    /// The peer closed the connection without sending anything (a probe of the socket,
    /// not a VMM).
    #[error("the peer closed the connection without sending anything")]
    Empty,
    /// No complete region table arrived within the deadline.
    #[error("no complete region table within {deadline:?} ({received} bytes received)")]
    Silent {
        /// The deadline.
        deadline: Duration,
        /// Bytes received before it passed.
        received: usize,
    },
    /// The peer closed before a complete region table arrived.
    #[error("the peer closed the connection before a complete region table ({0} bytes received)")]
    Truncated(usize),
    /// Not the JSON Firecracker sends.
    #[error("malformed region table")]
    Json(#[source] serde_json::Error),
    /// More bytes than any region table needs.
    #[error("more than {0} bytes without a complete region table")]
    TooLarge(usize),
    /// A table with no region in it.
    #[error("the region table lists no regions")]
    NoRegions,
    /// A page size the pager cannot serve.
    #[error("region at {base:#x}: unsupported page size {size} (4096 or 2097152 expected)")]
    PageSize {
        /// The region's base address.
        base: u64,
        /// Its page size.
        size: u64,
    },
    /// A region of `guest_memfd` memory (Firecracker's secret freedom), whose faults
    /// come partly as requests on the socket: not served.
    #[error(
        "region at {base:#x}: guest_memfd memory (\"is_guest_memfd\": true, Firecracker's secret freedom) is not supported: its faults come as requests on the socket this handler does not answer"
    )]
    GuestMemfd {
        /// The region's base address.
        base: u64,
    },
    /// A region this process cannot address.
    #[error("region at {base:#x} of {size} bytes lies beyond this process's address space")]
    AddressSpace {
        /// The region's base address.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// The peer is this process: its userfaultfd would serve this process's memory.
    #[error("the peer is this process")]
    OwnProcess,
    /// No userfaultfd came with the first bytes of the table.
    #[error("no userfaultfd came with the region table ({0} fd(s) received, none a userfaultfd)")]
    NoUffd(usize),
}
