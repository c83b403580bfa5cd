//! Handing a userfaultfd to another process over a Unix socket, as a VMM hands guest
//! memory's uffd to an external pager.

use crate::common;

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use uffd_core::{
    peer_credentials, recv_fds, send_fds, CopyMode, Error, Event, Features, Mapping, MemoryKind,
    RegisterMode, Uffd,
};

const PS: usize = 4096;

#[test]
fn a_child_registers_memory_sends_its_uffd_and_the_parent_serves_its_faults() {
    let (parent_sock, child_sock) = UnixStream::pair().expect("socketpair");
    let pages = 16;
    // SAFETY: the child only runs the closure and `_exit`s (see common::fork_child).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        drop(parent_sock);
        let code = std::panic::catch_unwind(|| {
            let region = Mapping::new(MemoryKind::Anon, pages * PS).expect("map");
            let uffd = Uffd::builder()
                .non_blocking(true)
                .require(Features::EVENT_REMOVE)
                .open()
                .expect("open");
            uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
                .expect("register");
            let table = format!("{} {}", region.addr(), region.len());
            send_fds(&child_sock, table.as_bytes(), &[uffd.as_fd()]).expect("send");
            drop(uffd); // only the parent holds it now
            for page in 0..pages {
                // SAFETY: our registered page, served by the parent.
                let got = unsafe { common::bytes(region.page_addr(page), PS) };
                if got != common::pattern(page, PS, 7).as_slice() {
                    return 1;
                }
            }
            0
        })
        .unwrap_or(101);
        // SAFETY: ends the child.
        unsafe { libc::_exit(code) };
    }
    drop(child_sock);
    let mut buf = [0u8; 128];
    let received = recv_fds(&parent_sock, &mut buf, 4).expect("recv");
    assert_eq!(received.fds.len(), 1);
    let text = std::str::from_utf8(&buf[..received.bytes]).expect("utf8");
    let mut parts = text.split(' ').map(|p| p.parse::<usize>().expect("number"));
    let (base, len) = (parts.next().expect("addr"), parts.next().expect("len"));
    let uffd = Uffd::from_fd(received.fds.into_iter().next().expect("fd")).expect("adopt");
    assert_eq!(
        uffd.features(),
        Features::EVENT_REMOVE,
        "features read from fdinfo"
    );
    let uffd = Arc::new(uffd);
    let handler = common::Handler::spawn(uffd.clone(), move |uffd, event| {
        let Event::Pagefault { addr, .. } = event else {
            return;
        };
        assert!(
            (base..base + len).contains(&addr),
            "fault in the child's region"
        );
        let page = (addr - base) / PS;
        // SAFETY: a missing page of the child's registered region: the child expects
        // exactly this pattern there.
        match unsafe { uffd.copy(addr, &common::pattern(page, PS, 7), CopyMode::empty()) } {
            Ok(_) | Err(Error::Exists { .. }) => {}
            Err(e) => panic!("copy into the child: {e}"),
        }
    });
    assert_eq!(common::wait_child(pid), Ok(0), "child verified every page");
    // Counted after each copy returns, which may be after the woken child has exited:
    // read the count once the handler thread is joined.
    let handled = handler.handled.clone();
    handler.stop();
    assert_eq!(
        handled.load(std::sync::atomic::Ordering::Relaxed),
        pages as u64
    );
    // The child is gone: placing into its address space reports it.
    // SAFETY: the target address space no longer exists.
    let gone = unsafe { uffd.copy(base, &[0u8; PS], CopyMode::empty()) };
    assert!(matches!(gone, Err(Error::ProcessGone { .. })), "{gone:?}");
}

#[test]
fn several_fds_and_a_payload_arrive_in_one_message_with_peer_credentials() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let uffd = common::open(Features::empty());
    let mem = Mapping::new(MemoryKind::Shmem, PS).expect("memfd");
    let (r, w) = nix::unistd::pipe().expect("pipe");
    let sent = send_fds(
        &a,
        b"[regions]",
        &[uffd.as_fd(), mem.file().expect("fd").as_fd(), w.as_fd()],
    )
    .expect("send");
    assert_eq!(sent, 9);
    let mut buf = [0u8; 64];
    let got = recv_fds(&b, &mut buf, 8).expect("recv");
    assert_eq!(&buf[..got.bytes], b"[regions]");
    assert_eq!(got.fds.len(), 3);
    // The third fd is the pipe's write end: writing through it reaches our read end.
    nix::unistd::write(&got.fds[2], b"x").expect("write through received fd");
    let mut byte = [0u8; 1];
    std::fs::File::from(r).read_exact(&mut byte).expect("read");
    assert_eq!(&byte, b"x");
    let cred = peer_credentials(&b).expect("SO_PEERCRED");
    assert_eq!(cred.pid, std::process::id() as i32);
}

#[test]
fn more_fds_than_accepted_are_closed_and_reported() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let (_r, w) = nix::unistd::pipe().expect("pipe");
    send_fds(&a, b"x", &[w.as_fd(), w.as_fd(), w.as_fd()]).expect("send");
    let err = recv_fds(&b, &mut [0u8; 8], 1).expect_err("only one fd accepted");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
}

#[test]
fn empty_payload_is_refused_and_closed_peer_reads_zero() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let err = send_fds(&a, b"", &[]).expect_err("no data");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    drop(a);
    let got = recv_fds(&b, &mut [0u8; 8], 1).expect("recv on closed peer");
    assert_eq!((got.bytes, got.fds.len()), (0, 0));
}
