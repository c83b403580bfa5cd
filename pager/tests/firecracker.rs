//! The Firecracker UFFD handshake and serving, against a client that does what Firecracker
//! does: anonymous (or 2 MiB hugetlb) private guest memory, a uffd with EVENT_REMOVE,
//! MISSING registration, the JSON region table and the uffd in one sendmsg, the socket
//! kept open while the guest runs.

use crate::common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pager::firecracker::{self, HandshakeError, ServeOptions};
use pager::{DeliveryMode, FileSource, Prefetch};
use uffd_core::{send_fds, Features, Mapping, MemoryKind, RegisterMode, Uffd};

#[derive(Clone)]
struct Client {
    /// (pages, offset in the memory file) per region.
    regions: Vec<(usize, u64)>,
    page_size: usize,
    three_fds: bool,
    split_json: bool,
    dontneed: bool,
    exit_after: Option<usize>,
}

/// A userfaultfd as Firecracker opens it: non-blocking, with REMOVE events.
fn vmm_uffd() -> Uffd {
    Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_REMOVE)
        .open()
        .expect("uffd")
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("uffdkit-fc-{}-{name}", std::process::id()))
}

fn mem_file(name: &str, bytes: usize, page_size: usize) -> PathBuf {
    let path = temp(name);
    std::fs::write(&path, common::image(bytes / page_size, page_size, 5))
        .expect("write memory file");
    path
}

fn json(regions: &[(usize, usize, u64)], page_size: usize) -> String {
    let items: Vec<String> = regions
        .iter()
        .map(|(base, size, offset)| {
            format!(
                r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":{page_size},"page_size_kib":{page_size},"future_field":[1,2]}}"#
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// Firecracker's side, in the child: returns its exit code.
fn run_client(sock: &Path, file: &Path, c: &Client) -> i32 {
    let kind = if c.page_size == 4096 {
        MemoryKind::Anon
    } else {
        MemoryKind::HugetlbPrivate
    };
    let maps: Vec<Mapping> = c
        .regions
        .iter()
        .map(|(pages, _)| Mapping::new(kind, pages * c.page_size).expect("map guest memory"))
        .collect();
    let uffd = vmm_uffd();
    for m in &maps {
        uffd.register(m.addr(), m.len(), RegisterMode::MISSING)
            .expect("register");
    }
    let table: Vec<(usize, usize, u64)> = maps
        .iter()
        .zip(&c.regions)
        .map(|(m, (_, off))| (m.addr(), m.len(), *off))
        .collect();
    let body = json(&table, c.page_size);
    let mut stream = UnixStream::connect(sock).expect("connect");
    let (r, w) = nix::unistd::pipe().expect("pipe");
    let fds: Vec<_> = if c.three_fds {
        vec![r.as_fd(), uffd.as_fd(), w.as_fd()]
    } else {
        vec![uffd.as_fd()]
    };
    let first = if c.split_json { 7 } else { body.len() };
    send_fds(&stream, &body.as_bytes()[..first], &fds).expect("sendmsg");
    if c.split_json {
        std::thread::sleep(std::time::Duration::from_millis(20));
        stream
            .write_all(&body.as_bytes()[first..])
            .expect("rest of the JSON");
    }
    let file = std::fs::File::open(file).expect("memory file");
    let ps = c.page_size;
    let mut want = vec![0u8; ps];
    let mut touched = 0;
    for (m, (pages, offset)) in maps.iter().zip(&c.regions) {
        let dropped = if c.dontneed {
            pages / 4..pages / 2
        } else {
            0..0
        };
        for page in 0..*pages {
            if c.exit_after == Some(touched) {
                // Gone mid-restore, memory still mapped: no UNMAP, just EOF.
                // SAFETY: ends the child.
                unsafe { libc::_exit(0) };
            }
            if c.dontneed && page == pages / 2 {
                // Balloon-style: drop pages that were served; they must come back zero.
                m.madvise(dropped.start * ps, dropped.len() * ps, libc::MADV_DONTNEED)
                    .expect("DONTNEED");
                for z in dropped.clone() {
                    // SAFETY: guest memory, served by the handler.
                    let got = unsafe { common::bytes(m.page_addr(z), ps) };
                    if got.iter().any(|&b| b != 0) {
                        return 3;
                    }
                }
            }
            file.read_exact_at(&mut want, offset + (page * ps) as u64)
                .expect("read file");
            // SAFETY: guest memory, served by the handler.
            let got = unsafe { common::bytes(m.page_addr(page), ps) };
            if got != want.as_slice() {
                return 2;
            }
            touched += 1;
        }
    }
    0
}

/// Runs a client against the library handler; returns the client's exit code and the
/// handler's stats.
fn restore(name: &str, c: Client) -> (i32, pager::StatsSnapshot) {
    let total: usize = c
        .regions
        .iter()
        .map(|(p, o)| *o as usize + p * c.page_size)
        .max()
        .unwrap_or(0);
    let file = mem_file(name, total, c.page_size);
    let sock = temp(&format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).expect("bind");
    // SAFETY: the child runs the client and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        drop(listener);
        let code = std::panic::catch_unwind(|| run_client(&sock, &file, &c)).unwrap_or(101);
        // SAFETY: ends the child.
        unsafe { libc::_exit(code) };
    }
    let hs = firecracker::accept(&listener).expect("handshake");
    assert_eq!(hs.regions.len(), c.regions.len());
    assert_eq!(
        hs.peer.map(|p| p.pid),
        Some(pid),
        "SO_PEERCRED names the VMM"
    );
    let source = Arc::new(FileSource::mmap(&file).expect("open memory file"));
    let options = ServeOptions {
        mode: DeliveryMode::Thread,
        prefetch: Prefetch::Sequential,
        ..ServeOptions::default()
    };
    let stats = firecracker::serve(hs, source, &options).expect("served until EOF");
    let code = common::wait(pid);
    std::fs::remove_file(&file).ok();
    std::fs::remove_file(&sock).ok();
    (code, stats)
}

fn base(regions: Vec<(usize, u64)>, page_size: usize) -> Client {
    Client {
        regions,
        page_size,
        three_fds: false,
        split_json: false,
        dontneed: false,
        exit_after: None,
    }
}

#[test]
fn one_region_is_served_from_the_memory_file_with_removed_pages_zero() {
    let client = Client {
        dontneed: true,
        ..base(vec![(512, 0)], 4096)
    };
    let (code, stats) = restore("one", client);
    assert_eq!(
        code, 0,
        "the client saw file data, and zeros where it dropped pages"
    );
    assert_eq!(stats.events_remove, 1);
    assert!(
        stats.placed_zero >= 128,
        "dropped pages came back as zero pages: {stats:?}"
    );
}

#[test]
fn three_regions_end_to_end_with_split_json_and_three_fds() {
    let client = Client {
        three_fds: true,
        split_json: true,
        dontneed: true,
        ..base(vec![(128, 0), (256, 128 * 4096), (64, 384 * 4096)], 4096)
    };
    let (code, stats) = restore("three", client);
    assert_eq!(code, 0);
    assert_eq!(stats.events_remove, 3);
}

#[test]
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn two_mib_regions_are_served_whole() {
    if !common::hugetlb_available("two_mib_regions_are_served_whole") {
        return;
    }
    let ps = 2 << 20;
    let client = Client {
        dontneed: true,
        ..base(vec![(4, 0), (4, 4 * ps as u64)], ps)
    };
    let (code, stats) = restore("huge", client);
    assert_eq!(code, 0);
    assert!(stats.placed() >= 8);
}

#[test]
fn a_client_exiting_mid_restore_ends_serving_cleanly() {
    let client = Client {
        exit_after: Some(40),
        ..base(vec![(1024, 0)], 4096)
    };
    let (code, _) = restore("exit", client);
    assert_eq!(code, 0);
}

/// Sends `data` with `fds` from a connected client and returns the handler's verdict.
fn handshake_with(
    data: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
    close_after: bool,
) -> Result<firecracker::Handshake, HandshakeError> {
    let (server, client) = UnixStream::pair().expect("socketpair");
    if fds.is_empty() {
        (&client).write_all(data).expect("write");
    } else {
        send_fds(&client, data, fds).expect("send");
    }
    if close_after {
        drop(client);
        return firecracker::handshake(server);
    }
    let result = firecracker::handshake(server);
    drop(client);
    result
}

#[test]
fn malformed_handshakes_are_refused_clearly_without_hanging() {
    let uffd = vmm_uffd();
    let good = json(&[(0x7f00_0000_0000, 1 << 20, 0)], 4096);

    let err = handshake_with(b"not json at all", &[uffd.as_fd()], false).expect_err("not JSON");
    assert!(matches!(err, HandshakeError::Json(_)), "{err}");
    assert!(err.leaves_vmm_waiting(), "a uffd came: the VMM waits");

    let err = handshake_with(good.as_bytes(), &[], false).expect_err("no fd");
    assert!(matches!(err, HandshakeError::NoUffd(0)), "{err}");
    assert!(!err.leaves_vmm_waiting(), "no uffd: not a VMM");

    let (r, _w) = nix::unistd::pipe().expect("pipe");
    let err = handshake_with(good.as_bytes(), &[r.as_fd()], false).expect_err("a pipe is no uffd");
    assert!(matches!(err, HandshakeError::NoUffd(1)), "{err}");
    assert!(err.to_string().contains("none a userfaultfd"), "{err}");

    let err = handshake_with(&good.as_bytes()[..20], &[uffd.as_fd()], true).expect_err("truncated");
    assert!(matches!(err, HandshakeError::Truncated(20)), "{err}");
    assert!(err.leaves_vmm_waiting());

    let odd = good
        .replace("\"page_size\":4096", "\"page_size\":8192")
        .replace("\"page_size_kib\":4096", "\"page_size_kib\":8192");
    let err = handshake_with(odd.as_bytes(), &[uffd.as_fd()], false).expect_err("8 KiB pages");
    assert!(
        matches!(err, HandshakeError::PageSize { size: 8192, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("unsupported page size 8192"),
        "{err}"
    );

    let err = handshake_with(b"[]", &[uffd.as_fd()], false).expect_err("no regions");
    assert!(matches!(err, HandshakeError::NoRegions), "{err}");

    // A region that would end past the top of the address space is refused at the
    // handshake: it passed every check (the peer being this process stopped it here) and
    // its end was summed, wrapping, once served.
    let wraps = format!(
        r#"[{{"base_host_virt_addr":{},"size":8192,"offset":0,"page_size":4096}}]"#,
        u64::MAX - 4095
    );
    let err = handshake_with(wraps.as_bytes(), &[uffd.as_fd()], false).expect_err("wraps");
    assert!(matches!(err, HandshakeError::AddressSpace { .. }), "{err}");

    // A table with page_size_kib alone passes every check of the table: what stops it
    // here is only that this test's own process is the peer.
    let kib_only = r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size_kib":4096}]"#;
    let err = handshake_with(kib_only.as_bytes(), &[uffd.as_fd()], false)
        .expect_err("page_size_kib alone is accepted, the peer is not");
    assert!(matches!(err, HandshakeError::OwnProcess), "{err}");
    let region: firecracker::GuestRegion =
        serde_json::from_str(&kib_only[1..kib_only.len() - 1]).expect("parses");
    assert_eq!(region.page_size().expect("size"), 4096);
    // Firecracker before 1.7 sent neither field (4 KiB pages only): it was refused, and
    // so killed, at its handshake.
    let neither = r#"{"base_host_virt_addr":4096,"size":4096,"offset":0}"#;
    let region: firecracker::GuestRegion = serde_json::from_str(neither).expect("parses");
    assert_eq!(region.page_size().expect("size"), 4096);
}

/// Firecracker's secret-freedom builds (branch `feature/secret-hiding`: no release up to
/// 1.16) add `gpa_start` and `is_guest_memfd` to each region. False, the region is plain
/// anonymous memory, served as before; true, its faults come partly as requests on the
/// socket, which this handler does not answer: refused, as a table that leaves the VMM
/// waiting (so it is killed), naming the field.
#[test]
fn guest_memfd_regions_are_refused_and_their_other_fields_tolerated() {
    let uffd = vmm_uffd();
    let region = |memfd: bool| {
        format!(
            r#"{{"base_host_virt_addr":4096,"size":4096,"offset":0,"gpa_start":0,"page_size":4096,"is_guest_memfd":{memfd},"page_size_kib":4096}}"#
        )
    };
    let plain: firecracker::GuestRegion = serde_json::from_str(&region(false)).expect("parses");
    assert_eq!(plain.spec().expect("served").page_size, 4096);
    let err = handshake_with(
        format!("[{}]", region(false)).as_bytes(),
        &[uffd.as_fd()],
        false,
    )
    .expect_err("the peer is this process");
    assert!(matches!(err, HandshakeError::OwnProcess), "{err}");

    let (r, _w) = nix::unistd::pipe().expect("pipe");
    let table = format!("[{}]", region(true));
    let err = handshake_with(
        table.as_bytes(),
        &[uffd.as_fd(), r.as_fd(), r.as_fd()],
        false,
    )
    .expect_err("guest_memfd");
    assert!(
        matches!(err, HandshakeError::GuestMemfd { base: 4096 }),
        "{err}"
    );
    assert!(err.leaves_vmm_waiting(), "its uffd came: the VMM waits");
    assert!(
        err.to_string().contains("\"is_guest_memfd\": true"),
        "{err}"
    );
}

#[test]
fn a_connection_closed_without_data_is_reported_as_empty_not_as_a_vmm() {
    let (server, client) = UnixStream::pair().expect("socketpair");
    drop(client);
    let err = firecracker::handshake(server).expect_err("nothing sent");
    assert!(matches!(err, HandshakeError::Empty), "{err}");
    assert!(!err.leaves_vmm_waiting());
}

#[test]
fn a_silent_or_stalled_peer_is_refused_at_the_deadline() {
    let deadline = std::time::Duration::from_millis(200);
    // Connected, never a byte.
    let (server, client) = UnixStream::pair().expect("socketpair");
    let started = std::time::Instant::now();
    let err = firecracker::handshake_within(server, deadline).expect_err("silent");
    assert!(
        matches!(err, HandshakeError::Silent { received: 0, .. }),
        "{err}"
    );
    assert!(started.elapsed() >= deadline, "waited the deadline out");
    assert!(!err.leaves_vmm_waiting(), "nothing came: not a VMM");
    drop(client);

    // The table's first bytes with the uffd, then silence: a VMM left waiting.
    let uffd = vmm_uffd();
    let (server, client) = UnixStream::pair().expect("socketpair");
    send_fds(&client, b"[{\"base_host", &[uffd.as_fd()]).expect("send");
    let err = firecracker::handshake_within(server, deadline).expect_err("stalled");
    assert!(
        matches!(err, HandshakeError::Silent { received: 12, .. }),
        "{err}"
    );
    assert!(err.leaves_vmm_waiting());
    drop(client);
}

#[test]
fn kill_peer_refuses_this_process_and_invalid_pids() {
    for pid in [0, -1, std::process::id() as i32] {
        let peer = uffd_core::PeerCredentials {
            pid,
            uid: 0,
            gid: 0,
        };
        let err = firecracker::kill_peer(&peer).expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "pid {pid}");
    }
}

#[test]
fn regions_overlapping_or_beyond_the_file_fail_to_serve_with_an_error() {
    let file = mem_file("small", 64 * 4096, 4096);
    for (what, tables) in [
        ("beyond the file", vec![(0, 128 * 4096)]),
        ("overlapping", vec![(0, 16 * 4096), (8 * 4096, 16 * 4096)]),
    ] {
        // The VMM is a child (a peer that is this process is refused: its uffd would
        // have the pager write into this process): it maps, registers, sends, waits.
        let sock = temp("bad-regions.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).expect("bind");
        // SAFETY: the child maps, sends and waits for EOF, then `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let client = UnixStream::connect(&sock).expect("connect");
            let memory = Mapping::new(MemoryKind::Anon, 128 * 4096).expect("map");
            let uffd = vmm_uffd();
            uffd.register(memory.addr(), memory.len(), RegisterMode::MISSING)
                .expect("register");
            let regions: Vec<_> = tables
                .iter()
                .map(|&(at, len)| (memory.addr() + at, len, 0))
                .collect();
            send_fds(&client, json(&regions, 4096).as_bytes(), &[uffd.as_fd()]).expect("send");
            let _ = (&client).read(&mut [0u8; 1]); // until the handler closes
                                                   // SAFETY: ends the child.
            unsafe { libc::_exit(0) };
        }
        let hs = firecracker::accept(&listener).expect("the handshake itself is well formed");
        let source = Arc::new(FileSource::mmap(&file).expect("open"));
        let err = firecracker::serve(hs, source, &ServeOptions::default()).expect_err(what);
        let text = err.to_string();
        assert!(
            text.contains("the image has") || text.contains("overlap"),
            "{what}: {text}"
        );
        assert_eq!(common::wait(pid), 0);
        std::fs::remove_file(&sock).ok();
    }
    std::fs::remove_file(&file).ok();
}

#[test]
fn a_peer_that_is_this_process_is_refused() {
    let memory = Mapping::new(MemoryKind::Anon, 16 * 4096).expect("map");
    let uffd = vmm_uffd();
    uffd.register(memory.addr(), memory.len(), RegisterMode::MISSING)
        .expect("register");
    let (server, client) = UnixStream::pair().expect("socketpair");
    let table = json(&[(memory.addr(), memory.len(), 0)], 4096);
    send_fds(&client, table.as_bytes(), &[uffd.as_fd()]).expect("send");
    let err = firecracker::handshake(server).expect_err("our own uffd");
    assert!(matches!(err, HandshakeError::OwnProcess), "{err}");
}

/// The VMM is named by a pidfd taken at accept: once it has exited and its PID is
/// reused by another process, killing "the VMM" reports it gone and spares the other
/// process (a kill by PID, as `kill_peer` does, would kill it).
#[test]
fn killing_the_vmm_through_its_pidfd_never_signals_a_process_that_reused_its_pid() {
    const NAME: &str =
        "killing_the_vmm_through_its_pidfd_never_signals_a_process_that_reused_its_pid";
    if !testkit::isolated(NAME, std::time::Duration::from_secs(120)) {
        return;
    }
    for _attempt in 0..20 {
        let sock = temp("pidfd.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).expect("bind");
        // SAFETY: the child maps, registers, sends its table and exits at once.
        let vmm = unsafe { libc::fork() };
        assert!(vmm >= 0);
        if vmm == 0 {
            let memory = Mapping::new(MemoryKind::Anon, 4 * 4096).expect("map");
            let uffd = vmm_uffd();
            uffd.register(memory.addr(), memory.len(), RegisterMode::MISSING)
                .expect("register");
            let stream = UnixStream::connect(&sock).expect("connect");
            let table = json(&[(memory.addr(), memory.len(), 0)], 4096);
            send_fds(&stream, table.as_bytes(), &[uffd.as_fd()]).expect("send");
            // SAFETY: ends the child.
            unsafe { libc::_exit(0) };
        }
        let hs = firecracker::accept(&listener).expect("handshake");
        let pidfd = hs.peer_pidfd.as_ref().expect("SO_PEERPIDFD (Linux 6.5)");
        assert_eq!(hs.peer.expect("SO_PEERCRED").pid, vmm);
        assert_eq!(common::wait(vmm), 0, "the VMM exited and was reaped");
        // Another process takes its PID: the next PID handed out is `vmm`.
        let last = "/proc/sys/kernel/ns_last_pid";
        if std::fs::write(last, (vmm - 1).to_string()).is_err() {
            return common::skip(NAME, "cannot set ns_last_pid (needs root)");
        }
        // SAFETY: the child sleeps until killed.
        let other = unsafe { libc::fork() };
        assert!(other >= 0);
        if other == 0 {
            std::thread::sleep(std::time::Duration::from_secs(60));
            // SAFETY: ends the child.
            unsafe { libc::_exit(0) };
        }
        if other != vmm {
            // Another process of this machine forked in between: try again.
            // SAFETY: our own child.
            unsafe { libc::kill(other, libc::SIGKILL) };
            common::wait(other);
            continue;
        }
        let err = firecracker::kill_pidfd(pidfd.as_fd()).expect_err("the VMM is gone");
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH), "{err}");
        let mut status = 0;
        // SAFETY: polling our own child.
        let waited = unsafe { libc::waitpid(other, &mut status, libc::WNOHANG) };
        assert_eq!(waited, 0, "the process that reused the PID is alive");
        // SAFETY: our own child.
        unsafe { libc::kill(other, libc::SIGKILL) };
        common::wait(other);
        std::fs::remove_file(&sock).ok();
        return;
    }
    common::skip(
        NAME,
        "the PID was taken by another process 20 times in a row",
    );
}

#[test]
fn kill_peer_on_error_kills_the_vmm_when_serving_fails() {
    let file = mem_file("killpeer", 16 * 4096, 4096);
    let sock = temp("killpeer.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).expect("bind");
    // SAFETY: the child connects, sends a region table beyond the file, and waits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let memory = Mapping::new(MemoryKind::Anon, 64 * 4096).expect("map");
        let uffd = vmm_uffd();
        uffd.register(memory.addr(), memory.len(), RegisterMode::MISSING)
            .expect("register");
        let stream = UnixStream::connect(&sock).expect("connect");
        let body = json(&[(memory.addr(), memory.len(), 0)], 4096); // 64 pages, file has 16
        send_fds(&stream, body.as_bytes(), &[uffd.as_fd()]).expect("send");
        std::thread::sleep(std::time::Duration::from_secs(30)); // a VMM waiting on its load call
                                                                // SAFETY: ends the child (only reached if nobody killed it).
        unsafe { libc::_exit(0) };
    }
    let hs = firecracker::accept(&listener).expect("handshake");
    let options = ServeOptions {
        kill_peer_on_error: true,
        ..ServeOptions::default()
    };
    let source = Arc::new(FileSource::mmap(&file).expect("open"));
    let err = firecracker::serve(hs, source, &options).expect_err("regions beyond the file");
    assert!(err.to_string().contains("the image has"), "{err}");
    assert_eq!(
        common::wait(pid),
        128 + libc::SIGKILL,
        "the VMM was killed, not left hanging"
    );
    std::fs::remove_file(&file).ok();
    std::fs::remove_file(&sock).ok();
}
