//! Helpers for the pager's integration tests: real uffds, real mappings, real faults.
#![allow(dead_code)]

pub mod balloon;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use page_state::PageState;
use pager::{DeliveryMode, Fetched, Pager, Placer, Source, SourceError};
use uffd_core::{Features, MemoryKind, Uffd};

pub use testkit::skip;

/// Whether 2 MiB hugetlb pages can be had (reserving them as root); skips loudly if not.
pub fn hugetlb_available(test: &str) -> bool {
    match testkit::hugepages::ensure_free(64) {
        Ok(free) if free >= 8 => true,
        Ok(free) => {
            skip(test, &format!("hugetlb: only {free} free 2 MiB pages"));
            false
        }
        Err(e) => {
            skip(test, &format!("hugetlb: cannot reserve 2 MiB pages: {e}"));
            false
        }
    }
}

/// How long a prefetch may place nothing before [`prefetched`] calls it hung.
pub const PREFETCH_STALL: Duration = Duration::from_secs(20);

/// Waits for `pager` to have placed every page; false only if no page was placed for
/// [`PREFETCH_STALL`]. A sequential prefetch is paced by a SCHED_IDLE thread: it places a
/// batch only when a CPU is idle, so its whole run takes as long as busy CPUs leave it
/// (beside busy loops on one CPU, 22-30 s for 8 MiB), and only a stall is a hang.
pub fn prefetched(pager: &Pager) -> bool {
    let received = || pager.states().count(PageState::Received);
    let (mut placed, mut since) = (received(), Instant::now());
    while !pager.wait_complete(Duration::from_millis(100)) {
        let now = received();
        if now != placed {
            (placed, since) = (now, Instant::now());
        } else if since.elapsed() >= PREFETCH_STALL {
            return false;
        }
    }
    true
}

/// A non-blocking uffd with the events a pager handles.
pub fn uffd() -> Uffd {
    Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_REMOVE | Features::EVENT_UNMAP | Features::EVENT_REMAP)
        .optional(
            Features::MISSING_SHMEM
                | Features::MISSING_HUGETLBFS
                | Features::MINOR_SHMEM
                | Features::MINOR_HUGETLBFS,
        )
        .open()
        .expect("open uffd")
}

/// A non-blocking uffd for SIGBUS delivery (the pager's SIGBUS mode needs the feature and
/// REMOVE events).
pub fn sigbus_uffd() -> Uffd {
    Uffd::builder()
        .non_blocking(true)
        .require(Features::SIGBUS | Features::EVENT_REMOVE)
        .open()
        .expect("open a SIGBUS-mode uffd")
}

/// A synthetic image: page `i` holds a pattern derived from `i`, except every
/// `zero_every`-th page which is all zero.
pub fn image(pages: usize, page_size: usize, zero_every: usize) -> Vec<u8> {
    let mut out = vec![0u8; pages * page_size];
    for (i, page) in out.chunks_exact_mut(page_size).enumerate() {
        if zero_every != 0 && i % zero_every == zero_every - 1 {
            continue;
        }
        let seed = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for (w, chunk) in page.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&(seed ^ w as u64).to_ne_bytes());
        }
    }
    out
}

/// The bytes at `addr` (mapped, and served by a running pager if missing).
///
/// # Safety
/// `addr..addr + len` is mapped and readable.
pub unsafe fn bytes<'a>(addr: usize, len: usize) -> &'a [u8] {
    // SAFETY: forwarded to the caller.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
}

/// Wraps a source and counts fetches per page.
pub struct Counting<S> {
    pub inner: S,
    pub page_size: usize,
    pub reads: Vec<AtomicU32>,
}

impl<S: Source> Counting<S> {
    pub fn new(inner: S, page_size: usize) -> Arc<Self> {
        let pages = (inner.len() as usize).div_ceil(page_size);
        Arc::new(Self {
            inner,
            page_size,
            reads: (0..pages).map(|_| AtomicU32::new(0)).collect(),
        })
    }

    pub fn reads_of(&self, page: usize) -> u32 {
        self.reads[page].load(Ordering::Relaxed)
    }
}

impl<S: Source> Source for Counting<S> {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let first = offset as usize / self.page_size;
        for p in first..first + scratch.len() / self.page_size {
            self.reads[p].fetch_add(1, Ordering::Relaxed);
        }
        self.inner.fetch(offset, scratch)
    }

    fn zero_ranges(&self) -> Vec<std::ops::Range<u64>> {
        self.inner.zero_ranges()
    }
}

/// A remote source: every fetch answers Pending (and is counted); the test places.
pub struct Far {
    pub len: u64,
    pub asked: AtomicU64,
    placer: Mutex<Option<mpsc::Sender<Placer>>>,
}

impl Source for Far {
    fn len(&self) -> u64 {
        self.len
    }
    fn fetch<'a>(&'a self, _: u64, _: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        Ok(Fetched::Pending)
    }
    fn attach(&self, placer: Placer) {
        if let Some(tx) = self.placer.lock().expect("placer").take() {
            let _ = tx.send(placer);
        }
    }
}

/// A pager serving `regions` (memory, image offset) from a [`Far`] source of `len`
/// bytes, and its placer.
pub fn remote(
    uffd: Uffd,
    regions: &[(Arc<uffd_core::Mapping>, u64)],
    len: usize,
) -> (Pager, Placer, Arc<Far>) {
    let (tx, rx) = mpsc::channel();
    let far = Arc::new(Far {
        len: len as u64,
        asked: AtomicU64::new(0),
        placer: Mutex::new(Some(tx)),
    });
    let mut builder = Pager::builder(uffd, far.clone()).mode(DeliveryMode::Thread);
    for (memory, offset) in regions {
        builder = builder.mapping(memory.clone(), *offset);
    }
    let pager = builder.start().expect("start");
    let placer = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the pager attaches its placer");
    (pager, placer, far)
}

/// Memory of `kind` for the tests (hugetlb needs its pool).
pub fn kinds(test: &str) -> Vec<MemoryKind> {
    let mut kinds = vec![MemoryKind::Anon, MemoryKind::Shmem];
    if hugetlb_available(test) {
        kinds.push(MemoryKind::Hugetlb);
        kinds.push(MemoryKind::HugetlbPrivate);
    }
    kinds
}

/// Forks a child that maps `pages` anonymous pages, registers them (MISSING) on a uffd of
/// its own, sends that uffd over a socket, runs `body` on its memory and exits with its
/// code. Returns the child's pid, the adopted uffd, and the region's base and length.
pub fn child_with_uffd(
    pages: usize,
    body: impl FnOnce(&uffd_core::Mapping) -> i32,
) -> (i32, Uffd, usize, usize) {
    use std::os::fd::AsFd;
    let (parent, child) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    // SAFETY: the child runs `body` and `_exit`s; glibc makes malloc safe after fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        drop(parent);
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let memory = uffd_core::Mapping::new(MemoryKind::Anon, pages * 4096).expect("map");
            let uffd = uffd();
            uffd.register(
                memory.addr(),
                memory.len(),
                uffd_core::RegisterMode::MISSING,
            )
            .expect("register");
            let table = format!("{} {}", memory.addr(), memory.len());
            uffd_core::send_fds(&child, table.as_bytes(), &[uffd.as_fd()]).expect("send");
            drop(uffd); // the parent serves it now
            let code = body(&memory);
            // Exit with the region still mapped: a process that dies mid-restore sends no
            // UNMAP, it just goes away.
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }))
        .unwrap_or(101);
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    drop(child);
    let mut buf = [0u8; 64];
    let got = uffd_core::recv_fds(&parent, &mut buf, 2).expect("recv");
    let text = std::str::from_utf8(&buf[..got.bytes]).expect("utf8");
    let mut it = text.split(' ').map(|n| n.parse::<usize>().expect("number"));
    let (base, len) = (it.next().expect("base"), it.next().expect("len"));
    let fd = got.fds.into_iter().next().expect("one fd");
    (pid, Uffd::from_fd(fd).expect("adopt"), base, len)
}

/// Waits for `pid`; returns its exit code (or 128 + signal).
pub fn wait(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid");
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

/// A pager in SIGBUS mode serving `pages` anonymous 4 KiB pages from `source`.
pub fn sigbus_pager(source: Arc<dyn Source>, pages: usize) -> (Arc<uffd_core::Mapping>, Pager) {
    let memory = Arc::new(uffd_core::Mapping::new(MemoryKind::Anon, pages * 4096).expect("map"));
    let pager = Pager::builder(sigbus_uffd(), source)
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Sigbus)
        .start()
        .expect("start in SIGBUS mode");
    (memory, pager)
}

/// The exit code of the embedder's SIGBUS handler [`touch_in_sigbus_mode`] installs: the
/// pager handed the signal on (an abort would end the process with SIGABRT instead).
pub const HANDED_ON: i32 = 4;

extern "C" fn exit_handed_on(_: i32) {
    // SAFETY: ends the process at once (async-signal-safe).
    unsafe { libc::_exit(HANDED_ON) };
}

/// In a test's own process: installs an embedder's SIGBUS handler (before the pager)
/// ending the process with [`HANDED_ON`], serves a 16-page region from `source` in SIGBUS
/// mode and touches its first page. Returns only to fail: the touch was served.
pub fn touch_in_sigbus_mode(source: Arc<dyn Source>) -> ! {
    let handler = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(exit_handed_on),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only calls `_exit`.
    unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGBUS, &handler) }
        .expect("install the embedder's handler");
    let (memory, pager) = sigbus_pager(source, 16);
    // SAFETY: the served region; the fault ends the process through the embedder's handler.
    let byte = unsafe { std::ptr::read_volatile(memory.as_ptr()) };
    drop(pager);
    panic!("the touch was served: read {byte}");
}

/// Waits for child `pid`; returns its exit code (128 + signal if killed), killing it after
/// 20 s (a hang: -1).
pub fn wait_bounded(pid: i32) -> i32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut status = 0;
        // SAFETY: polling our own child.
        let waited = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if waited == pid {
            return if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: our own child, hung.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait(pid);
            return -1;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
