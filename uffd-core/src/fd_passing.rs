//! Passing file descriptors over Unix stream sockets (`SCM_RIGHTS`).
//!
//! This is how a hypervisor hands the userfaultfd of guest memory to an external pager:
//! one `sendmsg(2)` carrying a payload (e.g. a JSON region table) and the fds.
//! See `unix(7)`, "Ancillary messages".

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// At most this many fds per message (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 253;

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic.
    unsafe { libc::CMSG_SPACE((fds * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Sends `data` (at least one byte: stream sockets carry no fds without data) with `fds`
/// attached, in one `sendmsg(2)`. Returns the bytes of `data` sent; the caller sends any
/// remainder with plain writes. The fds stay open on this side.
pub fn send_fds(socket: impl AsFd, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "SCM_RIGHTS needs at least one byte of data",
        ));
    }
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more fds than SCM_MAX_FD",
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    // u64 elements keep the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; cmsg_space(fds.len()).div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; the fields are filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len()) as _;
        // SAFETY: msg_control points at a buffer of msg_controllen bytes, enough for one
        // header plus `fds.len()` fds, so the first header and its data are in bounds.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * size_of::<RawFd>()) as u32) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `msg` points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(socket.as_fd().as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// What one [`recv_fds`] call received.
#[derive(Debug)]
pub struct Received {
    /// Bytes of data written to the buffer; 0 means the peer closed the connection.
    pub bytes: usize,
    /// The fds that came with them, owned (close-on-exec) by the receiver.
    pub fds: Vec<OwnedFd>,
}

/// Receives data into `buf` and up to `max_fds` fds with one `recvmsg(2)`.
///
/// Fds arrive close-on-exec. If the sender attached more fds than `max_fds`, the kernel
/// truncates the control data; the fds that did arrive are closed and the call fails with
/// `InvalidData`, so nothing leaks and nothing is silently dropped.
pub fn recv_fds(socket: impl AsFd, buf: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let max_fds = max_fds.min(MAX_FDS);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let space = cmsg_space(max_fds.max(1));
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; the fields are filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points at live, writable buffers of the sizes it states.
        let n =
            unsafe { libc::recvmsg(socket.as_fd().as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed
    // headers; the CMSG_* walk stays inside them.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..payload / size_of::<RawFd>() {
                    // Each fd was installed in our table by this message: we own it.
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        drop(fds);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("peer sent more than {max_fds} fds; the message's fds were closed"),
        ));
    }
    Ok(Received { bytes: n, fds })
}

/// The peer process of a connected Unix socket (`SO_PEERCRED`), as of `connect(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Reads `SO_PEERCRED` of a connected Unix socket. See `unix(7)`.
pub fn peer_credentials(socket: impl AsFd) -> io::Result<PeerCredentials> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable ucred and `len` its size.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCredentials {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}
