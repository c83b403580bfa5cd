//! Sources: where pages come from.
//!
//! [`Source`] is the embedding surface: one object-safe trait. A *local* source answers
//! [`Source::fetch`] at once with the bytes ([`Fetched::Data`]) or "known zero"
//! ([`Fetched::Zero`]). A *remote* source sends a request and answers
//! [`Fetched::Pending`]; the page arrives later on the source's own thread, which places
//! it through the [`Placer`] handed to [`Source::attach`]. The fault loop
//! never blocks on a remote round trip.

use std::fs::File;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::unistd::{lseek, Whence};

use crate::error::SourceError;
use crate::{Placer, SignalSafe};

/// A source's answer for one fetch, which may span several pages (fault-around,
/// readahead, prefetch batches): it covers the whole `scratch` range asked for.
#[derive(Debug)]
pub enum Fetched<'a> {
    /// The bytes of the whole range (exactly the requested length).
    Data(&'a [u8]),
    /// Every byte of the whole range is zero: zero pages are placed, nothing transferred.
    /// (A range only partly zero must be answered with `Data`.)
    Zero,
    /// Asked; every page of the range will arrive through the [`Placer`].
    Pending,
}

/// How a forked child is served: see [`Source::child`].
#[derive(Clone)]
pub enum ChildSource {
    /// From the parent's source, which answers every fetch at once (a local source); it
    /// is not attached again.
    Shared,
    /// From a source of the child's own, which the child's engine attaches to its placer.
    Own(Arc<dyn Source>),
    /// Not served: the child is refused — logged with this reason, counted in
    /// [`StatsSnapshot::forks_refused`](crate::StatsSnapshot), its missing pages poisoned
    /// (a touch raises SIGBUS) and its uffd closed.
    Refuse(&'static str),
}

impl std::fmt::Debug for ChildSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChildSource::Shared => f.write_str("Shared"),
            ChildSource::Own(_) => f.write_str("Own(..)"),
            ChildSource::Refuse(why) => f.debug_tuple("Refuse").field(why).finish(),
        }
    }
}

/// Where pages come from. Object safe; see the module docs for local vs remote.
///
/// `fetch` may be asked for several pages at once (`scratch.len()` is a multiple of the
/// page size: fault-around, readahead, prefetch batches), so content is computed per page
/// of the range, never from `offset` alone:
///
/// ```
/// use std::sync::Arc;
/// use pager::{Fetched, Mapping, MemoryKind, Pager, Source, SourceError, Uffd};
///
/// /// Every page filled with its page number's low byte.
/// struct Counting { len: u64 }
///
/// impl Source for Counting {
///     fn len(&self) -> u64 { self.len }
///     fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
///         for (i, page) in scratch.chunks_mut(4096).enumerate() {
///             page.fill((offset / 4096 + i as u64) as u8);
///         }
///         Ok(Fetched::Data(scratch))
///     }
/// }
///
/// // Served with fault-around: each fault fetches up to 9 pages in one call.
/// let memory = Arc::new(Mapping::new(MemoryKind::Anon, 64 * 4096)?);
/// let uffd = Uffd::builder().non_blocking(true).open()?;
/// let pager = Pager::builder(uffd, Arc::new(Counting { len: 64 * 4096 }))
///     .mapping(memory.clone(), 0)
///     .fault_around(8)
///     .start()?;
/// for page in 0..64 {
///     // SAFETY (example): the mapping is served by the pager.
///     let byte = unsafe { std::ptr::read_volatile(memory.as_ptr().add(page * 4096 + 100)) };
///     assert_eq!(byte, page as u8);
/// }
/// assert!(pager.stop()?.placed_prefetch > 0, "fault-around placed pages");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Source: Send + Sync {
    /// Image length in bytes; regions must lie within it.
    fn len(&self) -> u64;

    /// Whether the image is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `scratch.len()` bytes at image offset `offset` (page aligned; the length is
    /// one page or several, see the trait docs). May fill `scratch` and return it, or
    /// return borrowed bytes of its own. Bytes beyond the end of the image read as zero.
    /// [`Fetched::Zero`] and [`Fetched::Pending`] answer for the whole range.
    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError>;

    /// Image ranges known to be zero (holes): the pager marks their pages Zero up front,
    /// so faults there get zero pages locally and nothing is ever fetched.
    fn zero_ranges(&self) -> Vec<Range<u64>> {
        Vec::new()
    }

    /// Hands a remote source the placement handle for its arrivals. Called once, before
    /// any fetch.
    fn attach(&self, _placer: Placer) {}

    /// A thread now waits on the page at `offset`, which was asked for earlier (answered
    /// `Pending`, perhaps for a background run): a remote source moves it to the front.
    /// Called on the fault path: must not block, allocate, or take a lock another thread
    /// could hold across `fork()`. Local sources ignore it.
    fn prioritize(&self, _offset: u64) {}

    /// How a forked child's copy of the regions is served (with `EVENT_FORK`), asked
    /// once per child. The default, [`ChildSource::Shared`], is right for a local source
    /// (every fetch answered at once). A remote source must override it: its arrivals go
    /// to the parent's placer, so it gives the child a source of its own
    /// ([`ChildSource::Own`]) or refuses it ([`ChildSource::Refuse`]). A shared source
    /// that answers `Pending` in a child is a fatal error of the child's engine
    /// ([`Error::ChildSourcePending`](crate::Error::ChildSourcePending)): the child's
    /// missing pages are poisoned, never left blocked.
    fn child(&self) -> ChildSource {
        ChildSource::Shared
    }

    /// The source's promise that [`Source::fetch`] and [`Source::prioritize`] are
    /// async-signal-safe, or `None` (the default): required by the SIGBUS delivery mode,
    /// which calls them inside a signal handler. Made with `unsafe`
    /// ([`SignalSafe::promise`]), since a source that breaks it is not a wrong answer
    /// the pager could catch but undefined behaviour (see [`SignalSafe`]).
    fn signal_safe(&self) -> Option<SignalSafe> {
        None
    }
}

/// `bytes[offset..offset + scratch.len()]`, zero-padded past the end.
fn slice_or_pad<'a>(bytes: &'a [u8], offset: u64, scratch: &'a mut [u8]) -> &'a [u8] {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let end = start.saturating_add(scratch.len());
    if end <= bytes.len() {
        return &bytes[start..end];
    }
    let have = bytes.len() - start;
    scratch[..have].copy_from_slice(&bytes[start..]);
    scratch[have..].fill(0);
    scratch
}

/// An image held in memory.
#[derive(Debug, Clone)]
pub struct MemorySource {
    bytes: Arc<[u8]>,
    zero: Vec<Range<u64>>,
}

impl MemorySource {
    /// Serves `bytes`.
    pub fn new(bytes: impl Into<Arc<[u8]>>) -> Self {
        Self {
            bytes: bytes.into(),
            zero: Vec::new(),
        }
    }

    /// Scans for all-zero pages of `page_size` and reports them as known zero.
    pub fn with_zero_scan(mut self, page_size: usize) -> Self {
        self.zero = zero_pages(&self.bytes, page_size);
        self
    }
}

/// Runs of all-zero `page_size` pages in `bytes`, as image ranges.
fn zero_pages(bytes: &[u8], page_size: usize) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for (i, page) in bytes.chunks(page_size).enumerate() {
        if page.iter().all(|&b| b == 0) {
            let start = (i * page_size) as u64;
            let end = start + page.len() as u64;
            match ranges.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => ranges.push(start..end),
            }
        }
    }
    ranges
}

impl Source for MemorySource {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        Ok(Fetched::Data(slice_or_pad(&self.bytes, offset, scratch)))
    }

    fn zero_ranges(&self) -> Vec<Range<u64>> {
        self.zero.clone()
    }

    fn signal_safe(&self) -> Option<SignalSafe> {
        // SAFETY: `fetch` copies out of the bytes it owns: no allocation, no lock.
        Some(unsafe { SignalSafe::promise() })
    }
}

/// How a [`FileSource`] reads.
#[derive(Debug)]
enum Access {
    /// `pread(2)` into the fault loop's scratch buffer.
    Pread,
    /// A read-only private mapping of the file; bytes are copied straight from it. (The
    /// address as an integer: the mapping is plain shared-readable memory, so the source
    /// stays `Send + Sync` without an `unsafe impl` that would hide a future raw pointer.)
    Mmap { addr: usize, len: usize },
}

/// An image file: read with `pread(2)` or through an `mmap`, optionally with its holes
/// (`SEEK_HOLE`) known as zero.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
    access: Access,
    holes: Vec<Range<u64>>,
}

fn io_err(what: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> SourceError {
    move |source| SourceError {
        what,
        offset,
        source,
    }
}

impl FileSource {
    fn open(path: &Path) -> Result<(File, u64), SourceError> {
        let file = File::open(path).map_err(io_err("open image", 0))?;
        let len = file.metadata().map_err(io_err("stat image", 0))?.len();
        Ok((file, len))
    }

    /// Reads pages with `pread(2)`. A file that shrinks while served fails the fetches of
    /// what it lost (a fatal error: those pages are poisoned, never read as zeros).
    pub fn pread(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        let (file, len) = Self::open(path.as_ref())?;
        Ok(Self {
            file,
            len,
            access: Access::Pread,
            holes: Vec::new(),
        })
    }

    /// Maps the file read-only and copies pages from the mapping (no syscall per page
    /// beyond the placement itself; the page cache is read on first touch). A file
    /// truncated while served: the pager's placement of a page past its new end fails
    /// with EFAULT (`UFFDIO_COPY`, or its copy into a MINOR region's page cache: a fatal
    /// error, the rest poisoned), but whoever else reads the fetched bytes (a checksum, a
    /// comparison) gets SIGBUS, which ends the process; there, use [`FileSource::pread`].
    pub fn mmap(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        let (file, len) = Self::open(path.as_ref())?;
        let map_len = usize::try_from(len).map_err(|_| SourceError {
            what: "map image",
            offset: 0,
            source: std::io::Error::from(std::io::ErrorKind::FileTooLarge),
        })?;
        let access = if map_len == 0 {
            Access::Pread
        } else {
            let size = NonZeroUsize::new(map_len).expect("non-zero, checked above");
            // SAFETY: a fresh read-only private mapping of a file we hold open; nothing
            // else refers to its address range.
            let addr = unsafe {
                mmap(
                    None,
                    size,
                    ProtFlags::PROT_READ,
                    MapFlags::MAP_PRIVATE,
                    &file,
                    0,
                )
            }
            .map_err(|e| io_err("map image", 0)(e.into()))?;
            Access::Mmap {
                addr: addr.as_ptr() as usize,
                len: map_len,
            }
        };
        Ok(Self {
            file,
            len,
            access,
            holes: Vec::new(),
        })
    }

    /// Reads with `pread(2)` and learns the file's holes (`SEEK_DATA` / `SEEK_HOLE`):
    /// their pages are known zero and never read.
    pub fn sparse(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        let mut source = Self::pread(path)?;
        source.holes = holes(&source.file, source.len)?;
        Ok(source)
    }

    /// The holes found (empty unless opened with [`FileSource::sparse`]).
    pub fn holes(&self) -> &[Range<u64>] {
        &self.holes
    }

    fn in_hole(&self, offset: u64, len: u64) -> bool {
        let i = self.holes.partition_point(|h| h.end <= offset);
        self.holes
            .get(i)
            .is_some_and(|h| h.start <= offset && offset + len <= h.end)
    }
}

/// The holes of `file` up to `len`, by walking `SEEK_DATA` / `SEEK_HOLE` (`lseek(2)`).
fn holes(file: &File, len: u64) -> Result<Vec<Range<u64>>, SourceError> {
    let mut holes = Vec::new();
    let mut pos: u64 = 0;
    let seek = |pos: u64, whence| lseek(file.as_fd(), pos as libc::off_t, whence);
    while pos < len {
        let data = match seek(pos, Whence::SeekData) {
            Ok(data) => data as u64,
            Err(Errno::ENXIO) => len, // no data after pos: the rest is a hole
            Err(e) => return Err(io_err("SEEK_DATA", pos)(e.into())),
        };
        if data > pos {
            holes.push(pos..data.min(len));
        }
        if data >= len {
            break;
        }
        pos = seek(data, Whence::SeekHole).map_err(|e| io_err("SEEK_HOLE", data)(e.into()))? as u64;
    }
    Ok(holes)
}

impl Drop for FileSource {
    fn drop(&mut self) {
        if let Access::Mmap { addr, len } = self.access {
            if let Some(addr) = NonNull::new(addr as *mut libc::c_void) {
                // SAFETY: our own mapping; the borrows `fetch` handed out ended with `self`.
                let _ = unsafe { munmap(addr, len) };
            }
        }
    }
}

impl Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        if self.in_hole(offset, scratch.len() as u64) {
            return Ok(Fetched::Zero);
        }
        match self.access {
            Access::Mmap { addr, len } => {
                // SAFETY: the mapping covers `len` readable bytes while `self` lives, and
                // nothing in this process writes it (read-only, private). The image file
                // must not be truncated while served (a read of the bytes past its new end
                // raises SIGBUS; the kernel's copy gets EFAULT).
                let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                Ok(Fetched::Data(slice_or_pad(bytes, offset, scratch)))
            }
            Access::Pread => {
                let mut done = 0;
                while done < scratch.len() {
                    let n = self
                        .file
                        .read_at(&mut scratch[done..], offset + done as u64)
                        .map_err(io_err("read image", offset))?;
                    if n == 0 {
                        if offset + (done as u64) < self.len {
                            // The file ends before the length it had when opened: it was
                            // truncated while served. What it lost is not zero in the
                            // image: a failure (poison), never zeros.
                            return Err(SourceError {
                                what: "read image (the file shrank while served)",
                                offset,
                                source: std::io::ErrorKind::UnexpectedEof.into(),
                            });
                        }
                        scratch[done..].fill(0); // past the end of the image
                        break;
                    }
                    done += n;
                }
                Ok(Fetched::Data(scratch))
            }
        }
    }

    fn zero_ranges(&self) -> Vec<Range<u64>> {
        self.holes.clone()
    }

    fn signal_safe(&self) -> Option<SignalSafe> {
        let mapped = matches!(self.access, Access::Mmap { .. }) && self.holes.is_empty();
        // SAFETY: a mapped `fetch` without holes copies out of the file mapping (page-cache
        // faults, no allocation, no lock of ours).
        mapped.then(|| unsafe { SignalSafe::promise() })
    }
}

/// An all-zero image of `len` bytes: every page is placed with ZEROPAGE.
#[derive(Debug, Clone, Copy)]
pub struct ZeroSource {
    len: u64,
}

impl ZeroSource {
    /// `len` bytes of zeros.
    pub fn new(len: u64) -> Self {
        Self { len }
    }
}

impl Source for ZeroSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn fetch<'a>(
        &'a self,
        _offset: u64,
        _scratch: &'a mut [u8],
    ) -> Result<Fetched<'a>, SourceError> {
        Ok(Fetched::Zero)
    }

    fn zero_ranges(&self) -> Vec<Range<u64>> {
        // One range: the whole image.
        #[allow(clippy::single_range_in_vec_init)]
        let all = vec![0..self.len];
        all
    }

    fn signal_safe(&self) -> Option<SignalSafe> {
        // SAFETY: `fetch` answers Zero and does nothing else.
        Some(unsafe { SignalSafe::promise() })
    }
}

/// Whether `bytes` are all zero: 64 bytes at a time (the OR of a block vectorises), so a
/// page of data usually stops in its first block. For sources that answer
/// [`Fetched::Zero`] for pages they read, and senders that leave zero pages out.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    blocks
        .by_ref()
        .all(|b| b.iter().fold(0, |acc, &x| acc | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn is_zero_finds_a_single_set_byte_anywhere() {
        let mut page = vec![0u8; 4096 + 17];
        assert!(is_zero(&page));
        for at in [0, 63, 64, 4095, 4096, 4096 + 16] {
            page[at] = 1;
            assert!(!is_zero(&page), "byte {at}");
            page[at] = 0;
        }
        assert!(is_zero(&[]));
    }
}
