//! Findings 1–3: the chunk cache (links, fillers, modes, locks, FIFOs).

use super::*;

/// Finding 1: a cache directory another user created, with `fetch.lock` and
/// `evict.lock` linked to root's files and every fan-out directory linked into a
/// root-only directory. Before: root created and truncated files through the links and
/// wrote chunks into the root-only directory.
#[test]
fn a_cache_another_user_created_is_refused_and_none_of_its_links_is_followed() {
    let Some(s) =
        Scene::new("a_cache_another_user_created_is_refused_and_none_of_its_links_is_followed")
    else {
        return;
    };
    s.push();
    let cache = s.shared("cache");
    let (created, truncated, rootonly) =
        (s.victim("created"), s.victim("file"), s.path("rootonly"));
    attacker::as_nobody(|| {
        mkdir(&cache, 0o777)?;
        symlink(&created, &cache.join("fetch.lock"))?;
        symlink(&truncated, &cache.join("evict.lock"))?;
        mkdir(&cache.join("chunks"), 0o777)?;
        mkdir(&cache.join("chunks/tmp"), 0o777)?;
        for b in 0..=255u8 {
            symlink(&rootonly, &cache.join(format!("chunks/{b:02x}")))?;
        }
        Ok(())
    });
    let before = s.outside();
    let f = s
        .pull(&cache, &s.path("out.raw"), &["--cache-mib", "1"])
        .finish();
    assert_eq!(s.outside(), before, "root changed a file outside the cache");
    refused_because_another_user_owns(&f);
    assert!(!created.exists(), "root created a file through fetch.lock");
}

/// Finding 1: a link another user planted where the cache should be, pointing into a
/// root-only directory. Before: root created its cache there.
#[test]
fn a_cache_path_another_user_linked_elsewhere_is_refused() {
    let Some(s) = Scene::new("a_cache_path_another_user_linked_elsewhere_is_refused") else {
        return;
    };
    s.push();
    let (cache, rootonly) = (s.shared("cache"), s.path("rootonly"));
    attacker::as_nobody(|| symlink(&rootonly, &cache));
    let before = s.outside();
    let f = s.pull(&cache, &s.path("out.raw"), &[]).finish();
    assert_eq!(s.outside(), before, "root changed a file outside the cache");
    assert_eq!(
        std::fs::read_dir(&rootonly).unwrap().count(),
        0,
        "root wrote into the link's target"
    );
    refused_because_another_user_owns(&f);
}

/// Finding 1, eviction: a 9 GB sparse filler pushes "used" over the bound, and a fan-out
/// directory linked to a directory of root's files. Before: eviction deleted root's
/// files through the link.
#[test]
fn eviction_never_deletes_through_a_planted_link_nor_for_a_sparse_filler() {
    let Some(s) =
        Scene::new("eviction_never_deletes_through_a_planted_link_nor_for_a_sparse_filler")
    else {
        return;
    };
    s.push();
    let dir = s.victim("dir");
    std::fs::create_dir(&dir).expect("victim dir");
    for name in ["a", "b"] {
        let p = dir.join(name);
        std::fs::write(&p, b"root's").expect("victim");
        // Older than any chunk: first in line for eviction.
        let t = nix::sys::time::TimeSpec::new(1_000_000, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &p,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .expect("utimensat");
    }
    let cache = s.shared("cache");
    attacker::as_nobody(|| {
        mkdir(&cache, 0o777)?;
        mkdir(&cache.join("chunks"), 0o777)?;
        mkdir(&cache.join("chunks/ff"), 0o777)?;
        let filler = cache.join("chunks/ff/filler");
        std::fs::File::create(&filler)
            .and_then(|f| f.set_len(9 << 30))
            .map_err(|e| failed("fill", &filler, e))?;
        symlink(&dir, &cache.join("chunks/aa"))
    });
    let before = s.outside();
    let f = s
        .pull(&cache, &s.path("out.raw"), &["--cache-mib", "64"])
        .finish();
    assert_eq!(s.outside(), before, "root changed a file outside the cache");
    refused_because_another_user_owns(&f);
}

/// Finding 2: guest memory in the cache and in a pulled image must be unreadable to
/// other users. Before: chunks were 0644 in 0755 directories, pulled images 0644.
#[test]
fn cached_chunks_and_pulled_images_are_unreadable_to_other_users() {
    let Some(s) = Scene::new("cached_chunks_and_pulled_images_are_unreadable_to_other_users")
    else {
        return;
    };
    s.push();
    let (cache, out) = (s.shared("cache"), s.shared("out.raw"));
    ok(s.pull(&cache, &out, &[]).finish());
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(s.path("raw")).unwrap()
    );
    let mut files = vec![out.clone()];
    let mut dirs = vec![cache.clone()];
    while let Some(d) = dirs.pop() {
        let mode = std::fs::metadata(&d).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                dirs.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    let chunks = files
        .iter()
        .filter(|p| p.starts_with(cache.join("chunks")))
        .count();
    assert_eq!(
        chunks,
        s.chunk_names().len(),
        "every chunk cached: {files:?}"
    );
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", f.display());
    }
    attacker::as_nobody(|| {
        for f in &files {
            if std::fs::read(f).is_ok() {
                return Err(format!("nobody read {}", f.display()));
            }
        }
        Ok(())
    });
}

/// Finding 2: an output another user created first in a shared directory (mode 0666, so
/// root could write it) would hand that user the guest memory written into it. Before:
/// `image pull` wrote into it.
#[test]
fn a_pull_never_writes_into_an_output_another_user_created() {
    let Some(s) = Scene::new("a_pull_never_writes_into_an_output_another_user_created") else {
        return;
    };
    s.push();
    let out = s.shared("out.raw");
    attacker::as_nobody(|| {
        std::fs::File::create(&out).map_err(|e| failed("create", &out, e))?;
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| failed("chmod", &out, e))
    });
    let f = s.pull(&s.shared("cache"), &out, &[]).finish();
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        0,
        "root wrote into it"
    );
    refused_because_another_user_owns(&f);
}

/// Finding 3: a read lock on the cache's lock file, held by another user, made every
/// chunk wait for the retry deadline (60 s a chunk). Now the lock file is unreachable to
/// others and the pull does not wait.
#[test]
fn another_user_cannot_lock_the_cache_and_stall_a_pull() {
    let Some(s) = Scene::new("another_user_cannot_lock_the_cache_and_stall_a_pull") else {
        return;
    };
    s.push();
    let cache = s.shared("cache");
    ok(s.pull(&cache, &s.path("warm.raw"), &[]).finish());
    let lock = cache.join("fetch.lock");
    // Best effort, as an attacker would: take a read lock on the whole file if it can.
    let holder = attacker::spawn(|| {
        if let Ok(f) = std::fs::File::open(&lock) {
            let whole = libc::flock {
                l_type: libc::F_RDLCK as i16,
                l_whence: libc::SEEK_SET as i16,
                l_start: 0,
                l_len: 0,
                l_pid: 0,
            };
            nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_OFD_SETLK(&whole))
                .map_err(|e| failed("lock", &lock, e))?;
            // Held by the open file description, which this child keeps until released.
            std::mem::forget(f);
        }
        Ok(())
    });
    // Were the lock taken, every chunk would be another process's: waited for (one
    // patience, now that stalled peers are overtaken; the retry deadline before), then
    // fetched as overtaken. A count says so whatever the timing.
    let f = ok(s
        .pull(&cache, &s.path("out.raw"), &["--cold-cache"])
        .finish_within(Duration::from_secs(120)));
    assert_eq!(
        common::overtaken(&f),
        0,
        "no chunk was waited for as another's: {}",
        f.text()
    );
    holder.finish();
    attacker::as_nobody(|| match std::fs::File::open(&lock) {
        Ok(_) => Err(format!("nobody opened {}", lock.display())),
        Err(_) => Ok(()),
    });
}

/// Finding 3: a FIFO where a chunk should be hung a root pull forever (the open blocked).
#[test]
fn a_fifo_planted_at_a_chunk_name_cannot_hang_a_pull() {
    let Some(s) = Scene::new("a_fifo_planted_at_a_chunk_name_cannot_hang_a_pull") else {
        return;
    };
    s.push();
    let cache = s.shared("cache");
    let names = s.chunk_names();
    attacker::as_nobody(|| {
        mkdir(&cache, 0o777)?;
        mkdir(&cache.join("chunks"), 0o777)?;
        for hex in &names {
            let fan_out = cache.join("chunks").join(&hex[..2]);
            if !fan_out.exists() {
                mkdir(&fan_out, 0o777)?;
            }
            mkfifo(&fan_out.join(hex))?;
        }
        Ok(())
    });
    let f = s
        .pull(&cache, &s.path("out.raw"), &[])
        .finish_within(Duration::from_secs(30));
    refused_because_another_user_owns(&f);
}
