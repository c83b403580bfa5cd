//! The cache's unit tests: publish and verified read, LRU eviction, fetch locks, and
//! what another user or a dead writer may leave in the directory.

use super::*;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chunked-cache-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A fresh 1 MiB cache in `temp_dir(name)`, and a 4 KiB chunk of `byte`s with its digest.
fn cache_and_chunk(name: &str, byte: u8) -> (PathBuf, ChunkCache, Vec<u8>, Digest) {
    let dir = temp_dir(name);
    let cache = ChunkCache::open(&dir, 1 << 20).unwrap();
    let data = vec![byte; 4096];
    let d = Digest::of(&data);
    (dir, cache, data, d)
}

#[test]
fn open_reclaims_the_temporary_files_of_dead_writers_only() {
    let dir = temp_dir("orphans");
    drop(ChunkCache::open(&dir, 1 << 20).unwrap());
    let tmp = dir.join("chunks/tmp");
    let hex = Digest::of(b"orphan").to_hex();
    // A PID that was a process's and is no more.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let ago = |secs| std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
    let plant = |name: String, modified| {
        let f = std::fs::File::create(tmp.join(&name)).unwrap();
        f.set_len(4096).unwrap();
        f.set_modified(modified).unwrap();
        name
    };
    let orphan = plant(format!("{hex}.{dead}.a"), ago(120));
    let fresh = plant(format!("{hex}.{dead}.b"), ago(0));
    let alive = plant(format!("{hex}.{}.c", std::process::id()), ago(120));
    let abandoned = plant(format!("{hex}.{}.d", std::process::id()), ago(7200));
    drop(ChunkCache::open(&dir, 1 << 20).unwrap());
    let left: Vec<String> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!left.contains(&orphan), "a dead writer's file stays: {left:?}");
    assert!(!left.contains(&abandoned), "an abandoned file stays: {left:?}");
    assert!(left.contains(&fresh), "a fresh file went: {left:?}");
    assert!(left.contains(&alive), "a live writer's file went: {left:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn put_then_get_returns_the_chunk_and_counts_a_hit() {
    let (dir, cache, data, d) = cache_and_chunk("hit", 7);
    assert_eq!(cache.get(&d, 4096), None);
    cache.put(&d, &data).unwrap();
    assert_eq!(cache.get(&d, 4096), Some(data));
    assert_eq!(cache.stats().hits, 1);
    assert_eq!(cache.stats().misses, 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_corrupted_cache_file_is_dropped_not_served() {
    let (dir, cache, data, d) = cache_and_chunk("corrupt", 1);
    cache.put(&d, &data).unwrap();
    std::fs::write(cache.path(&d), vec![2u8; 4096]).unwrap();
    assert_eq!(cache.get(&d, 4096), None);
    assert!(!cache.contains(&d));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_least_recently_used_chunks_go_first_when_over_the_bound() {
    let dir = temp_dir("lru");
    let cache = ChunkCache::open(&dir, 10 * 4096).unwrap();
    let chunks: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 4096]).collect();
    for (i, c) in chunks.iter().enumerate() {
        cache.put(&Digest::of(c), c).unwrap();
        // Distinct modification times, oldest first.
        let t = nix::sys::time::TimeSpec::new(1_000_000 + i as i64, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &cache.path(&Digest::of(c)),
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::FollowSymlink,
        )
        .unwrap();
    }
    // Chunk 0 is used again: it becomes the newest.
    assert!(cache.get(&Digest::of(&chunks[0]), 4096).is_some());
    let extra = vec![99u8; 4096];
    cache.put(&Digest::of(&extra), &extra).unwrap();
    assert!(cache.stats().used <= 9 * 4096);
    assert!(
        cache.contains(&Digest::of(&chunks[0])),
        "recently used survives"
    );
    assert!(
        !cache.contains(&Digest::of(&chunks[1])),
        "least recently used goes"
    );
    assert!(cache.contains(&Digest::of(&extra)));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_second_open_description_sees_the_fetch_lock_taken() {
    let dir = temp_dir("lock");
    let a = ChunkCache::open(&dir, 1 << 20).unwrap();
    let b = ChunkCache::open(&dir, 1 << 20).unwrap();
    let d = Digest::of(b"x");
    let FetchLock::Ours(slot) = a.try_lock_fetch(&d) else {
        panic!("first locker must win");
    };
    assert_eq!(b.try_lock_fetch(&d), FetchLock::Peer);
    assert!(b.peer_fetching(&d));
    a.unlock_fetch(slot);
    assert!(!b.peer_fetching(&d));
    assert!(matches!(b.try_lock_fetch(&d), FetchLock::Ours(_)));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_fifo_at_a_chunks_name_is_dropped_not_waited_on() {
    let (dir, cache, data, d) = cache_and_chunk("fifo", 3);
    cache.put(&d, &data).unwrap();
    std::fs::remove_file(cache.path(&d)).unwrap();
    nix::unistd::mkfifo(&cache.path(&d), nix::sys::stat::Mode::S_IRWXU).unwrap();
    // Before: File::open of the FIFO blocked until a writer came — forever.
    assert_eq!(cache.get(&d, 4096), None);
    assert!(std::fs::symlink_metadata(cache.path(&d)).is_err(), "the FIFO is gone");
    cache.put(&d, &data).unwrap();
    assert_eq!(cache.get(&d, 4096), Some(data));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_sparse_file_counts_the_blocks_it_takes_not_its_length() {
    let (dir, cache, data, d) = cache_and_chunk("sparse", 4);
    cache.put(&d, &data).unwrap();
    let filler = dir.join("chunks/ab/filler");
    std::fs::create_dir_all(filler.parent().unwrap()).unwrap();
    std::fs::File::create(&filler)
        .and_then(|f| f.set_len(9 << 30))
        .unwrap();
    drop(cache);
    let cache = ChunkCache::open(&dir, 1 << 20).unwrap();
    assert!(cache.stats().used < 1 << 20, "{:?}", cache.stats());
    cache.evict().unwrap();
    assert!(cache.contains(&d), "nothing evicted for a hole");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn eviction_never_follows_a_linked_fan_out_directory() {
    let dir = temp_dir("linked");
    let outside = temp_dir("linked-outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("precious"), vec![1u8; 64 << 10]).unwrap();
    let cache = ChunkCache::open(&dir, 8 * 4096).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("chunks/aa")).unwrap();
    for i in 0..16u8 {
        let data = vec![i; 4096];
        cache.put(&Digest::of(&data), &data).unwrap();
    }
    assert!(cache.stats().evicted > 0);
    assert!(outside.join("precious").exists(), "eviction left the cache");
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(outside).unwrap();
}

#[test]
fn a_cache_directory_another_user_owns_is_refused() {
    if !testkit::attacker::available("a_cache_directory_another_user_owns_is_refused") {
        return;
    }
    // /tmp is sticky and world-writable: anyone may create a name there first.
    let dir = temp_dir("strangers");
    testkit::attacker::as_nobody(|| {
        std::fs::create_dir(&dir).map_err(|e| testkit::attacker::failed("mkdir", &dir, e))
    });
    match ChunkCache::open(&dir, 1 << 20) {
        Err(Error::Private {
            source: FsError::NotOwned { owner, .. },
            ..
        }) => assert_eq!(owner, testkit::attacker::NOBODY),
        other => panic!("opened a stranger's cache: {other:?}"),
    }
    std::fs::remove_dir_all(dir).unwrap();
}
