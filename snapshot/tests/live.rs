//! Live snapshots against the real kernel: writers write at full speed while the snapshot
//! is taken, each write logged with a sequence number; the snapshot must equal the memory
//! at one consistent instant of that log (every thread's included writes a prefix of its
//! log, replayed over the initial content, byte for byte) — with writes held by faults on
//! the way. Anonymous (with unpopulated pages), shmem and hugetlb memory; another process's
//! memory through the userfaultfd it sends; failures that must release every writer.

use crate::common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{contents, memory, writers};
use snapshot::{Error, FileSink, LiveSnapshot, MemorySink, PageSink, Quiesce, Region};
use uffd_core::{peer_credentials, recv_fds, send_fds, Features, MemoryKind, Uffd};

/// A memory sink that takes its time (a slow disk): it keeps the snapshot running long
/// enough for the writers to hit pages not yet saved even on a loaded machine.
struct SlowSink(MemorySink);

impl PageSink for SlowSink {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        std::thread::sleep(Duration::from_micros(200));
        self.0.write(offset, data)
    }
}

/// Takes a live snapshot of `len` bytes of `kind` memory while `threads` writers write
/// at full speed, and checks it holds one consistent instant of their logs, with writes
/// held on the way: a run in which no writer happened to hit a page not yet saved proves
/// nothing about that path and is taken again (at most five times).
fn holds_the_cut(kind: MemoryKind, len: usize, threads: usize, handlers: usize, batch: usize) {
    for attempt in 1..=5 {
        if held_writes_and_held_the_cut(kind, len, threads, handlers, batch) {
            return;
        }
        eprintln!("{kind:?}: attempt {attempt}: no write met a page not yet saved; again");
    }
    panic!("{kind:?}: in five snapshots no write was held: the fault path went untested");
}

/// One run of [`holds_the_cut`]: whether a write was held.
fn held_writes_and_held_the_cut(
    kind: MemoryKind,
    len: usize,
    threads: usize,
    handlers: usize,
    batch: usize,
) -> bool {
    let (map, mut initial) = memory(kind, len);
    let w = writers(&map, threads, 50_000);
    let sink = Arc::new(SlowSink(MemorySink::new(len)));
    // SAFETY: the mapping outlives the snapshot; no other uffd is registered on it.
    let live = unsafe {
        LiveSnapshot::builder()
            .region(Region::new(map.addr(), len, kind, 0))
            .savers(2)
            .handlers(handlers)
            .batch(batch)
            .start(sink.clone())
    }
    .expect("start");
    let report = live.finish().expect("finish");
    // Writes go on after the snapshot, unhindered.
    common::assert_writing(&w, "after the snapshot");
    let log = w.stop();
    let cut = log
        .check_cut(&mut initial, &sink.0.to_vec())
        .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    for (t, &(included, total)) in cut.included.iter().enumerate() {
        assert!(
            included > 0 && included < total,
            "{kind:?}: thread {t}'s cut must fall mid-run ({included} of {total})"
        );
    }
    assert_eq!(report.pages as usize, len / kind.page_size());
    assert_eq!(
        report.saved_by_fault + report.saved_in_background,
        report.pages,
        "each page saved once"
    );
    report.faults > 0
}

#[test]
fn a_live_snapshot_of_anonymous_memory_under_full_speed_writes_is_the_memory_at_the_cut() {
    holds_the_cut(MemoryKind::Anon, 32 << 20, 2, 1, snapshot::DEFAULT_BATCH);
}

#[test]
fn one_page_batches_two_handlers_and_three_writers_race_faults_against_background_saves() {
    // Batches of one page claimed by the background while a fault wants the same page,
    // and two handlers serving three writers.
    holds_the_cut(MemoryKind::Anon, 8 << 20, 3, 2, 4096);
}

#[test]
fn a_live_snapshot_of_shared_memory_is_the_memory_at_the_cut() {
    holds_the_cut(MemoryKind::Shmem, 16 << 20, 2, 2, snapshot::DEFAULT_BATCH);
}

#[test]
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn a_live_snapshot_of_two_mib_pages_is_the_memory_at_the_cut() {
    let test = "a_live_snapshot_of_two_mib_pages_is_the_memory_at_the_cut";
    if !testkit::hugepages::available(test, 8) {
        return;
    }
    holds_the_cut(
        MemoryKind::HugetlbPrivate,
        16 << 20,
        2,
        2,
        snapshot::DEFAULT_BATCH,
    );
}

/// A sink that fails after `ok` writes.
struct FailingSink {
    ok: usize,
    seen: AtomicUsize,
}

impl PageSink for FailingSink {
    fn write(&self, _offset: u64, _data: &[u8]) -> std::io::Result<()> {
        if self.seen.fetch_add(1, Ordering::Relaxed) >= self.ok {
            return Err(std::io::Error::other("disk full"));
        }
        Ok(())
    }
}

#[test]
fn a_failing_sink_fails_the_snapshot_and_releases_every_writer() {
    let (map, _) = memory(MemoryKind::Anon, 16 << 20);
    let w = writers(&map, 2, 10_000);
    let sink = Arc::new(FailingSink {
        ok: 20,
        seen: AtomicUsize::new(0),
    });
    // SAFETY: as above.
    let live = unsafe {
        LiveSnapshot::builder()
            .region(Region::new(map.addr(), map.len(), MemoryKind::Anon, 0))
            .batch(4096)
            .start(sink)
    }
    .expect("start");
    let err = live.finish().expect_err("the sink fails");
    assert!(
        matches!(&err, Error::Sink { source, .. } if source.to_string() == "disk full"),
        "{err}"
    );
    common::assert_writing(&w, "after the snapshot failed");
    w.stop();
}

#[test]
fn a_dropped_snapshot_releases_its_writers() {
    let (map, _) = memory(MemoryKind::Anon, 16 << 20);
    let w = writers(&map, 2, 10_000);
    // SAFETY: as above.
    let live = unsafe {
        LiveSnapshot::builder()
            .region(Region::new(map.addr(), map.len(), MemoryKind::Anon, 0))
            .savers(1)
            .batch(4096)
            .start(Arc::new(MemorySink::new(map.len())))
    }
    .expect("start");
    drop(live);
    common::assert_writing(&w, "after the drop");
    w.stop();
}

#[test]
fn unsuitable_userfaultfds_and_regions_are_refused() {
    let (map, _) = memory(MemoryKind::Anon, 1 << 20);
    let region = Region::new(map.addr(), map.len(), MemoryKind::Anon, 0);
    let sink = || Arc::new(MemorySink::new(1 << 20)) as Arc<dyn PageSink>;
    let asynchronous = Uffd::builder()
        .require(Features::WP_ASYNC | Features::WP_UNPOPULATED)
        .open()
        .unwrap();
    let err = LiveSnapshot::builder()
        .region(region)
        .uffd(asynchronous)
        .start_remote(std::process::id(), sink())
        .expect_err("WP_ASYNC");
    assert!(matches!(err, Error::AsyncWriteProtect), "{err}");
    let bare = Uffd::builder().open().unwrap();
    let err = LiveSnapshot::builder()
        .region(region)
        .uffd(bare)
        .start_remote(std::process::id(), sink())
        .expect_err("no WP_UNPOPULATED, no EVENT_REMOVE");
    assert!(
        matches!(err, Error::MissingFeatures { missing }
            if missing == Features::WP_UNPOPULATED | Features::EVENT_REMOVE),
        "{err}"
    );
    let err = LiveSnapshot::builder()
        .region(region)
        .start_remote(std::process::id(), sink())
        .expect_err("another process's memory without its uffd");
    assert!(matches!(err, Error::Region { .. }), "{err}");
    // SAFETY: nothing is started: the region is refused first.
    let err = unsafe {
        LiveSnapshot::builder()
            .region(Region::new(map.addr() + 100, 4096, MemoryKind::Anon, 0))
            .start(sink())
    }
    .expect_err("misaligned");
    assert!(matches!(err, Error::Region { index: 0, .. }), "{err}");
    // The memory is untouched by the refusals: plain writable memory.
    // SAFETY: our mapping.
    unsafe { (map.addr() as *mut u8).write_volatile(1) };
}

const CHILD: &str = "SNAPSHOT_TEST_CHILD_SOCKET";
const REMOTE_LEN: usize = 16 << 20;

/// The child of `another_process_memory_is_snapshot_through_the_uffd_it_sends`: maps and
/// fills memory, sends its userfaultfd and the region, writes at full speed until told
/// the snapshot is done, then checks the snapshot file against its own log.
fn remote_child(socket: &str) {
    let mut stream = UnixStream::connect(socket).expect("connect");
    let (map, mut initial) = memory(MemoryKind::Anon, REMOTE_LEN);
    let uffd = Uffd::builder()
        .require(Features::WP_UNPOPULATED | Features::EVENT_REMOVE)
        .open()
        .expect("uffd");
    let w = writers(&map, 2, 50_000);
    let text = format!("{} {}", map.addr(), map.len());
    send_fds(&stream, text.as_bytes(), &[uffd.as_fd()]).expect("send uffd");
    drop(uffd);
    let mut path = String::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .read_to_string(&mut path)
        .expect("the snapshot's path");
    let log = w.stop();
    let snapshot = std::fs::read(path.trim()).expect("read the snapshot");
    let cut = log
        .check_cut(&mut initial, &snapshot)
        .expect("a consistent cut");
    assert!(cut.included.iter().all(|&(i, t)| i > 0 && i < t), "{cut:?}");
    println!("child: snapshot verified, cut {:?}", cut.included);
}

#[test]
fn another_process_memory_is_snapshot_through_the_uffd_it_sends() {
    if let Ok(socket) = std::env::var(CHILD) {
        return remote_child(&socket);
    }
    let dir = std::env::temp_dir();
    let socket = dir.join(format!("snapshot-remote-{}.sock", std::process::id()));
    let image = dir.join(format!("snapshot-remote-{}.raw", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).expect("bind");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            &testkit::full_test_name(
                "another_process_memory_is_snapshot_through_the_uffd_it_sends",
            ),
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD, &socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the child");
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                    let _ = child.kill();
                    panic!("the child never connected");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let pid = peer_credentials(&stream).unwrap().pid as u32;
    let mut buf = [0u8; 64];
    let got = recv_fds(&stream, &mut buf, 1).expect("receive the uffd");
    let text = std::str::from_utf8(&buf[..got.bytes]).unwrap();
    let (addr, len) = text.split_once(' ').unwrap();
    let (addr, len): (usize, usize) = (addr.parse().unwrap(), len.parse().unwrap());
    let uffd = Uffd::from_fd(got.fds.into_iter().next().expect("an fd")).expect("adopt");
    let sink = Arc::new(FileSink::create(&image, len as u64).unwrap());
    let report = LiveSnapshot::builder()
        .region(Region::new(addr, len, MemoryKind::Anon, 0))
        .uffd(uffd)
        .savers(2)
        .start_remote(pid, sink)
        .expect("start on the child's memory")
        .finish()
        .expect("finish");
    stream
        .write_all(image.to_str().unwrap().as_bytes())
        .unwrap();
    drop(stream); // EOF: the child stops writing and checks
    let out = loop {
        if let Some(_status) = child.try_wait().unwrap() {
            break child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the child hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&image);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child: {text}");
    assert!(text.contains("child: snapshot verified"), "{text}");
    assert_eq!(report.pages as usize, REMOTE_LEN / 4096);
    assert!(
        report.faults > 0,
        "the child's writes were held: {report:?}"
    );
}

#[test]
fn a_stop_the_world_dump_of_paused_writers_is_their_memory() {
    let (map, mut initial) = memory(MemoryKind::Anon, 8 << 20);
    let mut w = writers(&map, 2, 50_000);
    w.pause().expect("pause");
    let sink = MemorySink::new(map.len());
    // SAFETY: paused writers; the mapping is ours.
    let report = unsafe {
        snapshot::dump(
            &[Region::new(map.addr(), map.len(), MemoryKind::Anon, 0)],
            &sink,
            2,
        )
    }
    .expect("dump");
    let now = contents(&map);
    w.resume().expect("resume");
    let log = w.stop();
    let dumped = sink.into_bytes();
    assert!(dumped == now, "the dump is the paused memory");
    log.check_cut(&mut initial, &dumped)
        .expect("a consistent cut");
    assert_eq!(report.bytes, 8 << 20);
}

/// A memory sink whose writes wait until it is opened: a saver holding a batch stops
/// there, so the pages after that batch stay unsaved until the test says otherwise.
struct GatedSink {
    sink: MemorySink,
    open: Mutex<bool>,
    opened: Condvar,
}

impl GatedSink {
    fn new(len: usize) -> GatedSink {
        GatedSink {
            sink: MemorySink::new(len),
            open: Mutex::new(false),
            opened: Condvar::new(),
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl PageSink for GatedSink {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let open = self.open.lock().unwrap();
        drop(self.opened.wait_while(open, |open| !*open).unwrap());
        self.sink.write(offset, data)
    }
}

/// Discards (`advice`) the last page of `kind` memory after the cut, while the one saver
/// is held at its first batch, then writes it: the snapshot must fail naming that page,
/// not hold what the page became.
fn discard_before_saved_fails(kind: MemoryKind, advice: libc::c_int) {
    let len = 4 << 20;
    let (map, _) = memory(kind, len);
    let last = map.addr() + len - 4096;
    let sink = Arc::new(GatedSink::new(len));
    // SAFETY: the mapping outlives the snapshot; no other uffd is registered on it.
    let live = unsafe {
        LiveSnapshot::builder()
            .region(Region::new(map.addr(), len, kind, 0))
            .savers(1)
            .start(sink.clone())
    }
    .expect("start");
    // Returns once a handler has read the REMOVE event: the page is discarded after that.
    map.madvise(len - 4096, 4096, advice).expect("madvise");
    // SAFETY: our mapping; released (the snapshot failed) or never protected again.
    unsafe { (last as *mut u8).write_volatile(9) };
    sink.open();
    let err = live
        .finish()
        .expect_err("a page discarded before it was saved");
    assert!(
        matches!(err, Error::Discarded { addr, len } if addr <= last && last < addr + len),
        "{kind:?}: {err}"
    );
}

#[test]
fn discarding_anonymous_pages_not_yet_saved_fails_the_snapshot_naming_them() {
    discard_before_saved_fails(MemoryKind::Anon, libc::MADV_DONTNEED);
}

#[test]
fn punching_a_hole_in_shared_memory_not_yet_saved_fails_the_snapshot_naming_it() {
    discard_before_saved_fails(MemoryKind::Shmem, libc::MADV_REMOVE);
}

#[test]
fn discarding_pages_already_saved_leaves_the_snapshot_holding_the_cut() {
    let len = 1 << 20;
    let map = uffd_core::Mapping::new(MemoryKind::Anon, len).expect("map");
    // SAFETY: our fresh mapping, nothing else uses it yet.
    unsafe { std::ptr::write_bytes(map.as_ptr(), 7, len) };
    let sink = Arc::new(MemorySink::new(len));
    // SAFETY: as above.
    let mut live = unsafe {
        LiveSnapshot::builder()
            .region(Region::new(map.addr(), len, MemoryKind::Anon, 0))
            .start(sink.clone())
    }
    .expect("start");
    assert!(live.wait_saved(None).expect("saved"), "every page saved");
    // Returns once a handler has read the REMOVE event (handlers serve until finish).
    map.madvise(len - 4096, 4096, libc::MADV_DONTNEED)
        .expect("madvise");
    // SAFETY: our mapping; every page is saved and un-protected.
    unsafe { map.as_ptr().add(len - 4096).write_volatile(9) };
    let report = live
        .finish()
        .expect("a discard of saved pages is no failure");
    assert_eq!(report.pages as usize, len / 4096);
    let got = sink.to_vec();
    assert!(got.iter().all(|&b| b == 7), "the snapshot holds the cut");
    // SAFETY: our mapping, no longer registered.
    assert_eq!(unsafe { *map.as_ptr().add(len - 4096) }, 9);
}
