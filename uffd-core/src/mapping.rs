//! Memory to register: anonymous, shmem (memfd) and hugetlb mappings, owned and unmapped
//! on drop, plus the hugetlb pool controls that tests and tools need.
//!
//! A shmem or hugetlb mapping can be mapped a second time ([`Mapping::alias`]): the alias
//! is not registered, so writing through it fills the page cache without faulting, which
//! is how minor-fault (CONTINUE) pagers stage pages.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::unistd::ftruncate;

/// 2 MiB, the huge page size used for hugetlb mappings here.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// What backs a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// Private anonymous memory.
    Anon,
    /// Shared memory (a memfd), 4 KiB pages.
    Shmem,
    /// Shared hugetlbfs memory (a `MFD_HUGETLB` memfd), 2 MiB pages.
    Hugetlb,
    /// Private anonymous hugetlb memory (`MAP_HUGETLB`), 2 MiB pages: Firecracker's layout.
    HugetlbPrivate,
}

impl MemoryKind {
    /// The page size of this kind of memory.
    pub fn page_size(self) -> usize {
        match self {
            MemoryKind::Anon | MemoryKind::Shmem => crate::page_size(),
            MemoryKind::Hugetlb | MemoryKind::HugetlbPrivate => HUGE_PAGE_SIZE,
        }
    }

    /// A short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            MemoryKind::Anon => "anon",
            MemoryKind::Shmem => "shmem",
            MemoryKind::Hugetlb => "hugetlb",
            MemoryKind::HugetlbPrivate => "hugetlb-private",
        }
    }

    /// Whether the memory is file-backed and shared (aliasable, minor faults possible).
    pub fn is_shared(self) -> bool {
        matches!(self, MemoryKind::Shmem | MemoryKind::Hugetlb)
    }

    /// Whether this kind uses the hugetlb pool.
    pub fn is_hugetlb(self) -> bool {
        matches!(self, MemoryKind::Hugetlb | MemoryKind::HugetlbPrivate)
    }
}

/// An owned memory mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    len: usize,
    kind: MemoryKind,
    file: Option<Arc<OwnedFd>>,
}

// Send and Sync follow from the fields (an address kept as an integer, an fd): a raw
// pointer added later would take them away rather than hide behind an `unsafe impl`.
const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<Mapping>();
};

fn mmap(len: usize, prot: i32, flags: i32, fd: i32) -> io::Result<usize> {
    // SAFETY: a fresh mapping at a kernel-chosen address overlaps nothing we own.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(ptr as usize)
}

/// A memfd of `len` bytes (`memfd_create(2)` and `ftruncate(2)`, through nix's safe
/// wrappers), close-on-exec.
fn memfd(name: &CStr, flags: MFdFlags, len: usize) -> io::Result<OwnedFd> {
    let fd = memfd_create(name, flags | MFdFlags::MFD_CLOEXEC)?;
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    ftruncate(&fd, len)?;
    Ok(fd)
}

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

impl Mapping {
    /// Maps `len` bytes (rounded up to the kind's page size) of `kind` memory.
    pub fn new(kind: MemoryKind, len: usize) -> io::Result<Mapping> {
        let len = len.next_multiple_of(kind.page_size());
        let (addr, file) = match kind {
            MemoryKind::Anon => (
                mmap(
                    len,
                    RW,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                )?,
                None,
            ),
            MemoryKind::HugetlbPrivate => (
                mmap(
                    len,
                    RW,
                    libc::MAP_PRIVATE
                        | libc::MAP_ANONYMOUS
                        | libc::MAP_HUGETLB
                        | libc::MAP_HUGE_2MB
                        | libc::MAP_NORESERVE,
                    -1,
                )?,
                None,
            ),
            MemoryKind::Shmem => {
                let fd = memfd(c"uffdkit-shmem", MFdFlags::empty(), len)?;
                (
                    mmap(len, RW, libc::MAP_SHARED, fd.as_raw_fd())?,
                    Some(Arc::new(fd)),
                )
            }
            MemoryKind::Hugetlb => {
                let fd = memfd(
                    c"uffdkit-hugetlb",
                    MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_2MB,
                    len,
                )?;
                (
                    mmap(
                        len,
                        RW,
                        libc::MAP_SHARED | libc::MAP_NORESERVE,
                        fd.as_raw_fd(),
                    )?,
                    Some(Arc::new(fd)),
                )
            }
        };
        Ok(Mapping {
            addr,
            len,
            kind,
            file,
        })
    }

    /// Private anonymous memory whose start is aligned to `align` (a power of two), e.g.
    /// 2 MiB so that transparent huge pages can back it.
    pub fn anon_aligned(len: usize, align: usize) -> io::Result<Mapping> {
        assert!(align.is_power_of_two(), "alignment must be a power of two");
        // Checked: a length that wraps would map a little and trim (unmap) memory that is
        // not ours, then claim a mapping of almost the whole address space.
        let too_large = || io::Error::new(io::ErrorKind::InvalidInput, "mapping too large");
        let len = len
            .checked_next_multiple_of(crate::page_size())
            .ok_or_else(too_large)?;
        let raw_len = len.checked_add(align).ok_or_else(too_large)?;
        let raw = mmap(
            raw_len,
            RW,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )?;
        let addr = raw.next_multiple_of(align);
        // SAFETY: both trimmed pieces lie inside the mapping we just made and own.
        unsafe {
            if addr > raw {
                libc::munmap(raw as *mut _, addr - raw);
            }
            let end = addr + len;
            if raw + raw_len > end {
                libc::munmap(end as *mut _, raw + raw_len - end);
            }
        }
        Ok(Mapping {
            addr,
            len,
            kind: MemoryKind::Anon,
            file: None,
        })
    }

    /// A second mapping of the same shmem/hugetlb file, not registered with anything:
    /// writes through it fill the page cache without faults.
    pub fn alias(&self) -> io::Result<Mapping> {
        let file = self.file.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "only shared mappings have aliases",
            )
        })?;
        let mut flags = libc::MAP_SHARED;
        if self.kind == MemoryKind::Hugetlb {
            flags |= libc::MAP_NORESERVE;
        }
        Ok(Mapping {
            addr: mmap(self.len, RW, flags, file.as_raw_fd())?,
            len: self.len,
            kind: self.kind,
            file: Some(file.clone()),
        })
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mappings have at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory kind.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// The page size of the mapping.
    pub fn page_size(&self) -> usize {
        self.kind.page_size()
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.len / self.page_size()
    }

    /// Address of page `index`.
    pub fn page_addr(&self, index: usize) -> usize {
        assert!(index < self.pages(), "page {index} beyond the mapping");
        self.addr + index * self.page_size()
    }

    /// The backing file, for shared kinds.
    pub fn file(&self) -> Option<&OwnedFd> {
        self.file.as_deref()
    }

    /// Start as a raw pointer. Reading or writing through it may fault into a handler.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// `madvise(2)` on a sub-range (e.g. `MADV_DONTNEED`, which raises a REMOVE event).
    pub fn madvise(&self, offset: usize, len: usize, advice: i32) -> io::Result<()> {
        // Checked: a wrapping sum would pass a range far outside the mapping.
        let inside = offset.checked_add(len).is_some_and(|end| end <= self.len);
        assert!(inside, "madvise range beyond the mapping");
        // SAFETY: the range lies within this mapping.
        if unsafe { libc::madvise((self.addr + offset) as *mut _, len, advice) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Moves this mapping onto `target`'s range with `mremap(MREMAP_MAYMOVE |
    /// MREMAP_FIXED)` (what a VMM moving guest memory does; a registered range raises a
    /// REMAP event). `target`'s pages are replaced; the result owns the moved range.
    ///
    /// If the kernel refuses, both ranges are given up, not unmapped: a failed `mremap`
    /// may have moved part of the source already (since Linux 6.17 it moves VMA by VMA,
    /// and stops at one it may not move, such as a page registered with a userfaultfd
    /// without `EVENT_REMAP`) or unmapped the target (before 6.17 it did that first), and
    /// another thread may have mapped its own memory in those holes since: unmapping them
    /// could take that away. What stays mapped is leaked.
    pub fn move_onto(self, target: Mapping) -> io::Result<Mapping> {
        if target.len != self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "mremap target must have the same length",
            ));
        }
        let me = std::mem::ManuallyDrop::new(self);
        let (to, _) = target.leak();
        // SAFETY: both ranges are ours (`me` is never dropped, `target` was leaked); the
        // kernel unmaps whatever was at `to` and moves our pages there.
        let moved = unsafe {
            libc::mremap(
                me.addr as *mut _,
                me.len,
                me.len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                to as *mut libc::c_void,
            )
        };
        // SAFETY: `me` is never dropped, so its Arc is moved out exactly once.
        let file = unsafe { std::ptr::read(&me.file) };
        if moved == libc::MAP_FAILED {
            // Parts of either range may be holes now, which are no longer ours to unmap
            // (see above): leak them rather than unmap what another thread mapped there.
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: to,
            len: me.len,
            kind: me.kind,
            file,
        })
    }

    /// Gives up the mapping without unmapping it (e.g. after `mremap` moved it), returning
    /// its address and length.
    pub fn leak(self) -> (usize, usize) {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never dropped, so the Arc is moved out exactly once.
        drop(unsafe { std::ptr::read(&me.file) });
        (me.addr, me.len)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this range; nothing refers to it after drop.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

/// The 2 MiB hugetlb pool, read-only: how many pages are reserved and free. Growing the
/// pool is the operator's (or the tool's) decision, never a library's: see
/// `/proc/sys/vm/nr_hugepages`.
pub mod hugetlb {
    use std::io;

    const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

    fn read(name: &str) -> io::Result<usize> {
        let text = std::fs::read_to_string(format!("{POOL}/{name}"))?;
        text.trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Reserved 2 MiB pages (`nr_hugepages`).
    pub fn reserved() -> io::Result<usize> {
        read("nr_hugepages")
    }

    /// Free 2 MiB pages.
    pub fn free() -> io::Result<usize> {
        read("free_hugepages")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An offset and length whose sum wraps around must not pass the bounds check and
    /// reach memory outside the mapping (in a release build the sum wrapped silently).
    /// A length that wraps when rounded up and padded for alignment is refused; it used to
    /// map a page, unmap one below it that was not ours, and claim a mapping of almost the
    /// whole address space (whose bounds checks then let safe calls reach anything).
    #[test]
    fn an_aligned_mapping_too_large_to_be_is_refused() {
        let e = Mapping::anon_aligned(usize::MAX - 4095, 8192).expect_err("wraps");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let e = Mapping::anon_aligned(usize::MAX - 100, 4096).expect_err("wraps");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }

    #[test]
    #[should_panic(expected = "madvise range beyond the mapping")]
    fn a_madvise_range_that_wraps_around_is_refused() {
        let m = Mapping::new(MemoryKind::Anon, 4 * 4096).expect("map");
        let offset = usize::MAX - 4095; // offset + 2 pages wraps to 4095
        let _ = m.madvise(offset, 2 * 4096, libc::MADV_DONTNEED);
    }
}
