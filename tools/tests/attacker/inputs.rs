//! Finding 5: FIFOs, devices and readable keys as inputs; absurd sizes; socket files.

use super::*;

/// Finding 5: a FIFO given as the memory file hung `fc-handler` before it listened (and
/// `serve` and `restore` the same way).
#[test]
fn fc_handler_refuses_a_fifo_memory_file_at_once() {
    let Some(s) = Scene::new("fc_handler_refuses_a_fifo_memory_file_at_once") else {
        return;
    };
    let mem = s.shared("mem");
    attacker::as_nobody(|| mkfifo(&mem));
    let mut cmd = uffdkit(["fc-handler"]);
    cmd.arg(s.path("fc.sock")).arg(&mem);
    let f = Proc::start(cmd).finish_within(Duration::from_secs(20));
    assert!(!f.status.success(), "{}", f.text());
    assert!(f.stderr.contains("FIFO"), "{}", f.text());
    // serve's image, restore's image: the same.
    let key = s.path("key");
    write_key(&key, "a-key-of-enough-length");
    let mut serve = uffdkit(["serve", "--image"]);
    serve.arg(&mem).arg("--key-file").arg(&key);
    serve
        .arg("--listen")
        .arg(format!("unix:{}", s.path("serve.sock").display()));
    let mut restore = uffdkit(["restore", "--image"]);
    restore.arg(&mem);
    for cmd in [serve, restore] {
        let f = Proc::start(cmd).finish_within(Duration::from_secs(20));
        assert!(!f.status.success(), "{}", f.text());
        assert!(f.stderr.contains("FIFO"), "{}", f.text());
    }
}

/// Finding 5: a key file others can read is refused unless allowed explicitly, and a
/// device (which would be read until memory runs out) is refused at once.
#[test]
fn a_key_file_others_can_read_or_a_device_is_refused() {
    let Some(s) = Scene::new("a_key_file_others_can_read_or_a_device_is_refused") else {
        return;
    };
    let key = s.path("key");
    write_key(&key, "a-key-of-enough-length");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    attacker::as_nobody(|| match std::fs::read(&key) {
        Ok(_) => Ok(()), // the premise: others can read this key
        Err(e) => Err(failed("read", &key, e)),
    });
    let serve = |key: &Path, extra: &[&str]| {
        let mut cmd = uffdkit(["serve", "--image"]);
        cmd.arg(s.path("raw"))
            .arg("--key-file")
            .arg(key)
            .arg("--listen")
            .arg(format!("unix:{}", s.path("serve.sock").display()))
            .args(extra);
        Proc::start(cmd)
    };
    let f = serve(&key, &[]).finish_within(Duration::from_secs(20));
    assert!(!f.status.success(), "{}", f.text());
    assert!(
        f.stderr.contains("readable by group or others"),
        "{}",
        f.text()
    );
    let f = serve(Path::new("/dev/zero"), &[]).finish_within(Duration::from_secs(20));
    assert!(!f.status.success(), "{}", f.text());
    assert!(f.stderr.contains("character device"), "{}", f.text());
    // TLS files the same: /dev/zero as a private key is refused, not read forever.
    let mut tls = uffdkit(["serve", "--image"]);
    tls.arg(s.path("raw"))
        .args([
            "--tls-cert",
            "/dev/zero",
            "--tls-key",
            "/dev/zero",
            "--tls-ca",
            "/dev/zero",
        ])
        .arg("--listen")
        .arg(format!("unix:{}", s.path("tls.sock").display()));
    let f = Proc::start(tls).finish_within(Duration::from_secs(20));
    assert!(!f.status.success(), "{}", f.text());
    assert!(f.stderr.contains("character device"), "{}", f.text());
    // Allowed explicitly, the same key serves.
    let mut server = serve(&key, &["--allow-readable-keys"]);
    common::wait_listening(&s.path("serve.sock"), &mut server);
}

/// Finding 5: a store is not trusted either. A 77-byte manifest declaring 1 PiB in 2^24
/// chunks cost every reader 1.6–2.4 GB, and `restore` aborted allocating 2 TiB of
/// per-page tables; a sparse 8 TiB file costs nothing to make and did the same. Each is
/// now refused from what it declares, before anything is sized for it.
#[test]
fn an_image_declaring_a_petabyte_is_refused_before_anything_is_allocated() {
    let dir = temp("attacker-bomb");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("store")).expect("store");
    let (page, chunk, len): (u32, u32, u64) = (4096, 64 << 20, 1 << 50);
    let count = len / u64::from(chunk);
    let mut m = chunked::manifest::MAGIC.to_vec();
    m.extend_from_slice(&chunked::manifest::VERSION.to_le_bytes());
    m.extend_from_slice(&[chunked::HashAlgorithm::Blake3.id(), 0]);
    m.extend_from_slice(&page.to_le_bytes());
    m.extend_from_slice(&chunk.to_le_bytes());
    m.extend_from_slice(&len.to_le_bytes());
    m.extend_from_slice(&count.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.push(0); // one zero run of every chunk
    m.extend_from_slice(&(count as u32).to_le_bytes());
    let trailer = chunked::Digest::of(&m);
    m.extend_from_slice(&trailer.0);
    assert_eq!(m.len(), 77);
    std::fs::write(dir.join("store/bomb"), &m).expect("manifest");
    let url = format!("file://{}/bomb", dir.join("store").display());
    let sparse = dir.join("sparse.raw");
    std::fs::File::create(&sparse)
        .and_then(|f| f.set_len(8 << 40)) // what ext4 and tmpfs allow
        .expect("sparse file");
    let out = dir.join("out.raw");
    let runs: Vec<Vec<&std::ffi::OsStr>> = vec![
        vec!["image".as_ref(), "inspect".as_ref(), url.as_ref()],
        vec![
            "image".as_ref(),
            "pull".as_ref(),
            url.as_ref(),
            out.as_os_str(),
            "--no-cache".as_ref(),
        ],
        vec![
            "restore".as_ref(),
            "--image".as_ref(),
            url.as_ref(),
            "--no-cache".as_ref(),
        ],
        vec!["restore".as_ref(), "--image".as_ref(), sparse.as_os_str()],
    ];
    for args in runs {
        let started = Instant::now();
        let f = Proc::start(uffdkit(&args)).finish_within(Duration::from_secs(30));
        assert!(!f.status.success(), "{args:?}: {}", f.text());
        assert!(
            f.stderr.contains("--max-image"),
            "{args:?} not refused for its size: {}",
            f.text()
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{args:?}");
    }
    assert!(
        !out.exists(),
        "a pull of a refused image created its output"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Finding 5: `serve` and `migrate dest` left their Unix socket files behind after
/// SIGTERM. Now each removes it and dies of the signal's status — but only its own: a
/// socket another listener bound at the path since is left alone.
#[test]
fn serve_and_migrate_dest_remove_their_socket_files_on_sigterm() {
    let dir = temp("attacker-sockets");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (key, image) = (dir.join("key"), dir.join("image"));
    write_key(&key, "a-key-of-enough-length");
    common::image(&image, 1 << 20);
    // Then a socket another listener bound at the path since: not ours to remove.
    for (name, rebound) in [
        ("serve", false),
        ("dest", false),
        ("serve", true),
        ("dest", true),
    ] {
        let sock = dir.join(format!("{name}-{rebound}.sock"));
        let mut cmd = match name {
            "serve" => uffdkit(["serve".as_ref(), "--image".as_ref(), image.as_os_str()]),
            _ => uffdkit(["migrate", "dest"]),
        };
        cmd.arg("--key-file").arg(&key);
        cmd.arg("--listen").arg(format!("unix:{}", sock.display()));
        let mut proc = Proc::start(cmd);
        common::wait_listening(&sock, &mut proc);
        let theirs = rebound.then(|| {
            std::fs::remove_file(&sock).expect("someone removes it");
            std::os::unix::net::UnixListener::bind(&sock).expect("and binds theirs")
        });
        proc.signal(nix::sys::signal::Signal::SIGTERM);
        let f = proc.finish_within(Duration::from_secs(20));
        assert_eq!(f.code(), Some(143), "{name}: {}", f.text());
        assert_eq!(
            sock.exists(),
            rebound,
            "{name}, rebound {rebound}: {}",
            sock.display()
        );
        drop(theirs);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Finding 5, TLS: a private key others can read lets them pose as this host; it is
/// refused unless allowed explicitly.
#[test]
fn a_tls_key_others_can_read_is_refused() {
    let Some(s) = Scene::new("a_tls_key_others_can_read_is_refused") else {
        return;
    };
    if Command::new("openssl").arg("version").output().is_err() {
        testkit::skip(
            "a_tls_key_others_can_read_is_refused",
            "openssl is not installed (scripts/test installs it)",
        );
        return;
    }
    let pki = s.path("pki");
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/tls-certs"))
        .arg(&pki)
        .arg("localhost")
        .output()
        .expect("run scripts/tls-certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = pki.join("localhost.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let serve = |extra: &[&str]| {
        let mut cmd = uffdkit(["serve", "--image"]);
        cmd.arg(s.path("raw"))
            .arg("--tls-cert")
            .arg(pki.join("localhost.pem"))
            .arg("--tls-key")
            .arg(&key)
            .arg("--tls-ca")
            .arg(pki.join("ca.pem"))
            .arg("--listen")
            .arg(format!("unix:{}", s.path("tls.sock").display()))
            .args(extra);
        Proc::start(cmd)
    };
    let f = serve(&[]).finish_within(Duration::from_secs(20));
    assert!(!f.status.success(), "{}", f.text());
    assert!(
        f.stderr.contains("readable by group or others"),
        "{}",
        f.text()
    );
    let mut server = serve(&["--allow-readable-keys"]);
    common::wait_listening(&s.path("tls.sock"), &mut server);
}
