//! fc-handler's socket against another user: the socket is 0600 whatever the umask the
//! handler runs under (it had the umask's mode: under `umask 002` a group member was
//! served root's guest memory), and a connection from a user neither ours, root nor
//! `--peer-uid` is closed unread even where the socket's mode would let it connect.

use super::*;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;

/// `fc-handler SOCKET MEMFILE EXTRA…` under `umask 000`, listening.
fn loose_handler(s: &Scene, extra: &[&str]) -> (PathBuf, Proc) {
    let sock = s.shared("fc.sock");
    let mut cmd = uffdkit(["fc-handler", "-v"]);
    cmd.arg(&sock).arg(s.path("raw")).args(extra);
    // SAFETY: umask(2) only, in the child between fork and exec: async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut proc = Proc::start(cmd);
    common::wait_listening(&sock, &mut proc);
    (sock, proc)
}

/// Root's fc-client served by the handler: it still serves after what the test did.
fn served(sock: &Path, handler: Proc, s: &Scene) -> Finished {
    let mut client = uffdkit(["fc-client", "--socket"]);
    client.arg(sock).arg("--mem-file").arg(s.path("raw"));
    let c = run(client);
    let h = handler.finish_within(Duration::from_secs(60));
    assert!(
        c.status.success(),
        "client: {}\nhandler: {}",
        c.text(),
        h.text()
    );
    assert!(h.status.success(), "handler: {}", h.text());
    h
}

#[test]
fn another_user_cannot_connect_to_fc_handler_whatever_the_umask_nor_be_served() {
    let test = "another_user_cannot_connect_to_fc_handler_whatever_the_umask_nor_be_served";
    let Some(s) = Scene::new(test) else {
        return;
    };
    let (sock, handler) = loose_handler(&s, &[]);
    let meta = std::fs::symlink_metadata(&sock).expect("lstat the socket");
    assert_eq!(meta.mode() & 0o7777, 0o600, "under umask 000");
    let at = sock.clone();
    attacker::as_nobody(move || match UnixStream::connect(&at) {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => Ok(()),
        Err(e) => Err(failed("connect (expected EACCES)", &at, e)),
        Ok(_) => Err(format!("nobody connected to {}", at.display())),
    });
    // Opened up (by mistake, or by a peer it was handed to): still closed unread.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let at = sock.clone();
    attacker::as_nobody(move || {
        let mut c = UnixStream::connect(&at).map_err(|e| failed("connect", &at, e))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| failed("set a timeout on", &at, e))?;
        // A table that would be refused, were it read: the handler must not get that far.
        let _ = c.write_all(b"[]");
        match c.read(&mut [0u8; 1]) {
            Ok(0) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => Ok(()),
            other => Err(format!("not closed at once: {other:?}")),
        }
    });
    let h = served(&sock, handler, &s);
    assert!(
        h.stderr.contains("closed a connection from uid 65534 (pid") && h.stderr.contains("unread"),
        "{}",
        h.text()
    );
    assert!(
        !h.stderr.contains("ignoring a connection"),
        "never read: {}",
        h.text()
    );
}

#[test]
fn a_socket_handed_to_peer_uid_is_that_users_alone_and_its_connections_accepted() {
    let test = "a_socket_handed_to_peer_uid_is_that_users_alone_and_its_connections_accepted";
    let Some(s) = Scene::new(test) else {
        return;
    };
    let (sock, handler) = loose_handler(&s, &["--peer-uid", "65534"]);
    let meta = std::fs::symlink_metadata(&sock).expect("lstat the socket");
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7777),
        (attacker::NOBODY, 0o600),
        "handed to uid 65534"
    );
    let at = sock.clone();
    // A probe that says nothing: let go quietly, not refused as a stranger.
    attacker::as_nobody(move || {
        UnixStream::connect(&at)
            .map(drop)
            .map_err(|e| failed("connect", &at, e))
    });
    let h = served(&sock, handler, &s);
    assert!(!h.stderr.contains("unread"), "{}", h.text());
}
