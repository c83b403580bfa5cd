//! PAGEMAP_SCAN with async write-protect as a dirty-page tracker (the selftests' `pagemap`
//! case, the way the postcopy migration source uses it).

use uffd_core::{
    page_size, Features, Mapping, MemoryKind, PageRegion, Pagemap, RegisterMode, ScanQuery, Uffd,
    WriteProtectMode,
};

/// A tracked anonymous region: registered WP with WP_ASYNC + WP_UNPOPULATED, all protected.
fn tracked(pages: usize) -> (Uffd, Mapping) {
    let uffd = Uffd::builder()
        .require(Features::WP_ASYNC | Features::WP_UNPOPULATED)
        .open()
        .expect("open a uffd with WP_ASYNC");
    let map = Mapping::new(MemoryKind::Anon, pages * page_size()).expect("map");
    uffd.register(map.addr(), map.len(), RegisterMode::WP)
        .expect("register WP");
    uffd.write_protect(map.addr(), map.len(), WriteProtectMode::WP)
        .expect("protect");
    (uffd, map)
}

fn written_pages(pm: &Pagemap, map: &Mapping) -> Vec<usize> {
    let mut out = vec![PageRegion::default(); 4];
    let mut pages = Vec::new();
    let mut at = map.addr();
    while at < map.addr() + map.len() {
        let (n, end) = pm
            .scan(
                at,
                map.addr() + map.len(),
                &ScanQuery::written_and_reprotect(),
                &mut out,
            )
            .expect("scan");
        for r in &out[..n] {
            pages.extend(
                (r.start as usize..r.end as usize)
                    .step_by(page_size())
                    .map(|a| (a - map.addr()) / page_size()),
            );
        }
        at = end;
    }
    pages
}

fn write(map: &Mapping, page: usize, value: u8) {
    // SAFETY: `page` lies in the mapping, which this test owns.
    unsafe { std::ptr::write_volatile((map.addr() + page * page_size()) as *mut u8, value) };
}

#[test]
fn written_pages_are_reported_once_and_protected_again() {
    let (_uffd, map) = tracked(64);
    let pm = Pagemap::open().expect("open pagemap");
    assert_eq!(
        written_pages(&pm, &map),
        Vec::<usize>::new(),
        "nothing written yet"
    );
    // Unpopulated pages (WP_UNPOPULATED) and populated ones alike; runs longer than the
    // output vector (4 runs) make the scan resume from walk_end.
    let dirty = [0, 1, 2, 7, 9, 20, 21, 40, 50, 63];
    for &p in &dirty {
        write(&map, p, 1);
    }
    assert_eq!(written_pages(&pm, &map), dirty);
    assert_eq!(
        written_pages(&pm, &map),
        Vec::<usize>::new(),
        "re-protected by the scan"
    );
    // A page written again after the scan is dirty again; reads never are.
    // SAFETY: in the mapping.
    let _ = unsafe { std::ptr::read_volatile((map.addr() + 5 * page_size()) as *const u8) };
    write(&map, 9, 2);
    assert_eq!(written_pages(&pm, &map), vec![9]);
}

#[test]
fn writes_racing_the_scan_are_never_lost() {
    // A writer bumps page counters while scans run; every page whose value changed since
    // the previous scan must be reported by the next one.
    let pages = 256;
    let (_uffd, map) = tracked(pages);
    let pm = Pagemap::open().expect("open pagemap");
    let base = map.addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Writes so far: each scan window waits for some, so a starved writer (a loaded
    // machine) makes the test slower, never vacuous.
    let writes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (stop, writes) = (stop.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let p = (i * 7919) % pages;
                // SAFETY: in the mapping, which outlives the joined thread.
                unsafe {
                    let w = (base + p * page_size()) as *mut u64;
                    std::ptr::write_volatile(w, std::ptr::read_volatile(w) + 1);
                }
                i += 1;
                writes.store(i, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let some_writes = || {
        let (from, until) = (
            writes.load(std::sync::atomic::Ordering::Relaxed),
            std::time::Instant::now() + std::time::Duration::from_secs(10),
        );
        while writes.load(std::sync::atomic::Ordering::Relaxed) < from + 16
            && std::time::Instant::now() < until
        {
            std::thread::yield_now();
        }
    };
    let read_all = || -> Vec<u64> {
        (0..pages)
            // SAFETY: in the mapping.
            .map(|p| unsafe { std::ptr::read_volatile((base + p * page_size()) as *const u64) })
            .collect()
    };
    // Every write after scan S1 lands before or after S2's re-protection of its page, so
    // a page that changed between two snapshots taken after S1 and after S2 must be
    // reported by S2 or by the next scan S3.
    let mut missed = Vec::new();
    let mut reported_total = 0;
    for _ in 0..200 {
        let _ = written_pages(&pm, &map); // S1
        let before = read_all();
        some_writes();
        let mut reported: std::collections::HashSet<usize> =
            written_pages(&pm, &map).into_iter().collect(); // S2
        let after = read_all();
        reported_total += reported.len();
        reported.extend(written_pages(&pm, &map)); // S3
        missed.extend((0..pages).filter(|&p| before[p] != after[p] && !reported.contains(&p)));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        reported_total > 0,
        "the writer never ran during a scan window"
    );
    assert_eq!(missed, Vec::<usize>::new(), "writes lost between scans");
}

#[test]
fn dirty_tracker_reports_written_blocks_once_per_round() {
    let pages = 64;
    let map = Mapping::new(MemoryKind::Anon, pages * page_size()).expect("map");
    let mut tracker = uffd_core::DirtyTracker::start(map.addr(), map.len()).expect("start");
    for p in [0, 3, 17, 18, 63] {
        write(&map, p, 7);
    }
    // Blocks of 4 pages: 0 holds pages 0 and 3, 4 holds 17 and 18, 15 holds 63.
    let mut blocks = Vec::new();
    let written = tracker
        .collect(4 * page_size(), |b| blocks.push(b))
        .expect("collect");
    blocks.dedup();
    assert_eq!(written, 5, "five pages written");
    assert_eq!(blocks, vec![0, 4, 15]);
    let mut runs = Vec::new();
    assert_eq!(tracker.collect_runs(|r| runs.push(r)).expect("collect"), 0);
    assert!(runs.is_empty(), "protected again by the first round");
    write(&map, 18, 8);
    tracker.collect_runs(|r| runs.push(r)).expect("collect");
    assert_eq!(runs, vec![18 * page_size()..19 * page_size()]);
    drop(tracker);
    write(&map, 5, 1); // unregistered: plain memory again, no fault, no tracking
}
