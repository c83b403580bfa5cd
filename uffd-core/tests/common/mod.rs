//! Helpers shared by the uffd-core integration tests. Everything here drives the real
//! kernel: real userfaultfds, real mappings, real faults.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uffd_core::{Event, EventBuffer, Features, MemoryKind, ReadStatus, Uffd};

/// Huge pages the hugetlb tests of one binary may use at once.
const HUGE_POOL: usize = 64;

pub use testkit::skip;

/// The memory kinds a test should cover: anon and shmem always, hugetlb when the 2 MiB
/// pool has (or, as root, can be grown to) enough free pages; otherwise a loud skip.
pub fn kinds(test: &str) -> Vec<MemoryKind> {
    let mut kinds = vec![MemoryKind::Anon, MemoryKind::Shmem];
    match testkit::hugepages::ensure_free(HUGE_POOL) {
        Ok(free) if free >= 8 => kinds.push(MemoryKind::Hugetlb),
        Ok(free) => skip(test, &format!("hugetlb: only {free} free 2 MiB pages")),
        Err(e) => skip(test, &format!("hugetlb: cannot reserve 2 MiB pages: {e}")),
    }
    kinds
}

/// A non-blocking userfaultfd with `features` required.
pub fn open(features: Features) -> Uffd {
    Uffd::builder()
        .non_blocking(true)
        .require(features)
        .open()
        .expect("open userfaultfd")
}

/// Page `index`'s test content: distinct per page, per word and per `salt`.
pub fn pattern(index: usize, page_size: usize, salt: u64) -> Vec<u8> {
    let seed = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
    (0..page_size / 8)
        .flat_map(|w| (seed ^ w as u64).to_ne_bytes())
        .collect()
}

/// The bytes at `addr`, read as a slice (the caller knows the page is present).
///
/// # Safety
/// `addr..addr + len` is mapped, readable, and will not fault into a stopped handler.
pub unsafe fn bytes<'a>(addr: usize, len: usize) -> &'a [u8] {
    // SAFETY: forwarded to the caller.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
}

/// Reads one byte at `addr` on a new thread (so the test thread can serve the fault).
pub fn read_on_thread(addr: usize) -> JoinHandle<u8> {
    // SAFETY: tests pass addresses inside mappings that outlive the thread.
    std::thread::spawn(move || unsafe { std::ptr::read_volatile(addr as *const u8) })
}

/// Writes `value` at `addr` on a new thread.
pub fn write_on_thread(addr: usize, value: u8) -> JoinHandle<()> {
    // SAFETY: as for `read_on_thread`.
    std::thread::spawn(move || unsafe { std::ptr::write_volatile(addr as *mut u8, value) })
}

/// Waits up to 5 s for the next event.
pub fn next_event(uffd: &Uffd, buf: &mut EventBuffer) -> Event {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "no userfaultfd event within 5 s");
        if !uffd
            .wait_readable(Some(Duration::from_millis(100)))
            .expect("poll")
        {
            continue;
        }
        if let ReadStatus::Events(n) = uffd.read_events(buf).expect("read events") {
            assert_eq!(n, 1, "expected exactly one event");
            return buf.drain().next().expect("one event");
        }
    }
}

/// Waits up to 5 s until `count` page faults have been read (several may come per read);
/// returns their addresses sorted. Any other event fails the test.
pub fn collect_faults(uffd: &Uffd, buf: &mut EventBuffer, count: usize) -> Vec<usize> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut addrs = Vec::new();
    while addrs.len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} faults in 5 s",
            addrs.len()
        );
        if !uffd
            .wait_readable(Some(Duration::from_millis(100)))
            .expect("poll")
        {
            continue;
        }
        if uffd.read_events(buf).expect("read") == ReadStatus::WouldBlock {
            continue;
        }
        for event in buf.drain() {
            match event {
                Event::Pagefault { addr, .. } => addrs.push(addr),
                other => panic!("expected page faults, got {other:?}"),
            }
        }
    }
    addrs.sort_unstable();
    addrs
}

/// A thread that serves a userfaultfd with a closure until dropped.
pub struct Handler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Events handled so far.
    pub handled: Arc<AtomicU64>,
}

impl Handler {
    /// Spawns the handler thread; `serve` is called for each event.
    pub fn spawn(uffd: Arc<Uffd>, mut serve: impl FnMut(&Uffd, Event) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let handled = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, handled) = (stop.clone(), handled.clone());
            std::thread::spawn(move || {
                let mut buf = EventBuffer::new(64);
                // Relaxed: the flag only says "stop"; join() orders the rest.
                while !stop.load(Ordering::Relaxed) {
                    if !uffd
                        .wait_readable(Some(Duration::from_millis(20)))
                        .expect("poll")
                    {
                        continue;
                    }
                    if uffd.read_events(&mut buf).expect("read") == ReadStatus::WouldBlock {
                        continue;
                    }
                    for event in buf.drain() {
                        serve(&uffd, event);
                        handled.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Handler {
            stop,
            thread: Some(thread),
            handled,
        }
    }

    /// Stops the thread and reports whether it panicked.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("handler thread panicked");
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `child` in a forked process and returns its exit status (`Ok(code)`) or the
/// signal that killed it (`Err(signal)`). The child must not return; it calls `_exit`.
pub fn fork_child(child: impl FnOnce() -> i32) -> Result<i32, i32> {
    // SAFETY: the child only runs `child` and `_exit`s; glibc makes malloc safe after fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(101);
        // SAFETY: _exit ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    wait_child(pid)
}

/// Waits for `pid` and decodes its status as [`fork_child`] does.
pub fn wait_child(pid: i32) -> Result<i32, i32> {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid");
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Err(libc::WTERMSIG(status))
    }
}
