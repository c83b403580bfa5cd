//! Runs of pages never leave their region, and a placement the kernel keeps refusing for a
//! range that is still mapped ends the pager instead of retrying forever. Regions side by
//! side in the address space (two `Mapping::new` calls usually are) are where a run could
//! cross; tests that hung before the fix run in a process of their own (`testkit::isolated`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use page_state::PageState;
use pager::{DeliveryMode, Features, Mapping, MemoryKind, MemorySource, Pager, Prefetch, Uffd};

use crate::common;

const PS: usize = 4096;
const PAGES: usize = 4;
const WATCHDOG: Duration = Duration::from_secs(30);

/// Two mappings of `kind`, `lo` right below `hi` in the address space (mmap places a later
/// mapping below an earlier one; a few tries find a pair with nothing in between).
fn adjacent(kind: MemoryKind, pages: usize) -> (Arc<Mapping>, Arc<Mapping>) {
    let mut misses = Vec::new();
    for _ in 0..16 {
        let hi = Mapping::new(kind, pages * PS).expect("map hi");
        let lo = Mapping::new(kind, pages * PS).expect("map lo");
        if lo.addr() + lo.len() == hi.addr() {
            return (Arc::new(lo), Arc::new(hi));
        }
        misses.push((hi, lo));
    }
    panic!("no two adjacent mappings in 16 tries");
}

/// Waits until page `page` of `pager` is Received, at most 10 s.
fn wait_received(pager: &Pager, page: usize) {
    let state = pager.wait_placed(page, Duration::from_secs(10));
    assert_eq!(state, Some(PageState::Received), "page {page} placed");
}

/// Pages of `memory` that do not hold image pages `from..`: (page, image page they hold).
fn wrong_pages(memory: &Mapping, image: &[u8], from: usize) -> Vec<(usize, Option<usize>)> {
    (0..memory.len() / PS)
        .filter_map(|i| {
            // SAFETY: served by the pager: a raw read of whatever it placed.
            let got = unsafe { common::bytes(memory.addr() + i * PS, PS) };
            let want = &image[(from + i) * PS..(from + i + 1) * PS];
            (got != want).then(|| (i, image.chunks(PS).position(|c| c == got)))
        })
        .collect()
}

/// Touches the second-to-last page of `lo` (served by `pager` with fault-around) and
/// checks the run it brings stops at `lo`'s end: `hi`'s pages still Missing, then both
/// regions' content, `hi` holding image pages `hi_from..`.
fn fault_around_stays_in_lo(
    pager: &Pager,
    (lo, hi): (&Mapping, &Mapping),
    image: &[u8],
    hi_from: usize,
) {
    // SAFETY: served by the pager (a hang here is the defect: the watchdog fails the test).
    let _ = unsafe { std::ptr::read_volatile((lo.addr() + (PAGES - 2) * PS) as *const u8) };
    // Fault-around places lo's last page in one ioctl with whatever else its run holds.
    wait_received(pager, PAGES - 1);
    let hi_states: Vec<_> = (PAGES..2 * PAGES).map(|p| pager.states().get(p)).collect();
    assert!(
        hi_states.iter().all(|s| *s == Some(PageState::Missing)),
        "hi's pages untouched by lo's fault-around: {hi_states:?}"
    );
    assert_eq!(wrong_pages(hi, image, hi_from), vec![], "hi's content");
    assert_eq!(wrong_pages(lo, image, 0), vec![], "lo's content");
}

#[test]
fn fault_around_stops_at_the_end_of_its_region() {
    let (lo, hi) = adjacent(MemoryKind::Anon, PAGES);
    // lo is served from image pages 0..4, hi from 8..12: the pages after lo's are not hi's.
    let image = common::image(3 * PAGES, PS, 0);
    let pager = Pager::builder(common::uffd(), Arc::new(MemorySource::new(image.clone())))
        .mapping(lo.clone(), 0)
        .mapping(hi.clone(), (2 * PAGES * PS) as u64)
        .mode(DeliveryMode::Thread)
        .fault_around(8)
        .start()
        .expect("start");
    fault_around_stays_in_lo(&pager, (&lo, &hi), &image, 2 * PAGES);
    pager.stop().expect("stop");
}

#[test]
fn minor_fault_around_stages_only_through_its_own_regions_alias() {
    if !testkit::isolated(
        "regions::minor_fault_around_stages_only_through_its_own_regions_alias",
        WATCHDOG,
    ) {
        return;
    }
    let (lo, hi) = adjacent(MemoryKind::Shmem, PAGES);
    let image = common::image(2 * PAGES, PS, 0);
    let pager = Pager::builder(common::uffd(), Arc::new(MemorySource::new(image.clone())))
        .mapping_minor(lo.clone(), 0)
        .mapping_minor(hi.clone(), (PAGES * PS) as u64)
        .mode(DeliveryMode::Thread)
        .fault_around(4)
        .start()
        .expect("start");
    fault_around_stays_in_lo(&pager, (&lo, &hi), &image, PAGES);
    pager.stop().expect("stop");
}

#[test]
fn prefetch_completes_over_adjacent_regions_of_two_vmas() {
    if !testkit::isolated(
        "regions::prefetch_completes_over_adjacent_regions_of_two_vmas",
        WATCHDOG,
    ) {
        return;
    }
    // Two shmem mappings are two VMAs (two memfds): one COPY may not span both.
    let (lo, hi) = adjacent(MemoryKind::Shmem, PAGES);
    let image = common::image(2 * PAGES, PS, 0);
    let pager = Pager::builder(common::uffd(), Arc::new(MemorySource::new(image.clone())))
        .mapping(lo.clone(), 0)
        .mapping(hi.clone(), (PAGES * PS) as u64)
        .mode(DeliveryMode::Thread)
        .fault_around(8)
        .prefetch(Prefetch::Sequential)
        .start()
        .expect("start");
    assert!(
        common::prefetched(&pager),
        "prefetch completes: {:?}",
        pager.stats()
    );
    assert_eq!(wrong_pages(&lo, &image, 0), vec![], "lo's content");
    assert_eq!(wrong_pages(&hi, &image, PAGES), vec![], "hi's content");
    pager.stop().expect("stop");
}

#[test]
fn a_run_over_two_vmas_of_one_region_is_placed_page_by_page() {
    if !testkit::isolated(
        "regions::a_run_over_two_vmas_of_one_region_is_placed_page_by_page",
        WATCHDOG,
    ) {
        return;
    }
    let (lo, hi) = adjacent(MemoryKind::Shmem, PAGES);
    let image = common::image(2 * PAGES, PS, 0);
    let spec = pager::RegionSpec::new(lo.addr(), 2 * PAGES * PS, MemoryKind::Shmem, 0);
    let builder = Pager::builder(common::uffd(), Arc::new(MemorySource::new(image.clone())));
    // SAFETY: both mappings are ours, alive until the end of the test (after `stop`), and
    // only read raw; the region spans them both.
    let pager = unsafe { builder.region(spec) }
        .mode(DeliveryMode::Thread)
        .prefetch(Prefetch::Sequential)
        .start()
        .expect("start");
    assert!(
        common::prefetched(&pager),
        "prefetch completes: {:?}",
        pager.stats()
    );
    assert_eq!(wrong_pages(&lo, &image, 0), vec![], "lo's content");
    assert_eq!(wrong_pages(&hi, &image, PAGES), vec![], "hi's content");
    pager.stop().expect("stop");
}

#[test]
fn a_page_the_kernel_keeps_calling_gone_while_its_region_is_mapped_fails_the_pager() {
    if !testkit::isolated(
        "regions::a_page_the_kernel_keeps_calling_gone_while_its_region_is_mapped_fails_the_pager",
        WATCHDOG,
    ) {
        return;
    }
    let len = PAGES * PS;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: a fresh mapping of our own, given to the pager under its contract.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, anon, -1, 0) };
    assert_ne!(base, libc::MAP_FAILED, "mmap");
    let base = base as usize;
    // Without UNMAP events the pager is never told of the hole punched below.
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_REMOVE)
        .open()
        .expect("uffd");
    let image = common::image(PAGES, PS, 0);
    let builder = Pager::builder(uffd, Arc::new(MemorySource::new(image)));
    let spec = pager::RegionSpec::new(base, len, MemoryKind::Anon, 0);
    // SAFETY: our own mapping, never read; its page 2 is unmapped behind the pager's back
    // on purpose (what the test is about), the rest only when this process exits.
    let builder = unsafe { builder.region(spec) }.mode(DeliveryMode::Thread);
    // SAFETY: page 2 of our own mapping, before the pager starts placing.
    assert_eq!(unsafe { libc::munmap((base + 2 * PS) as *mut _, PS) }, 0);
    let started = Instant::now();
    let pager = builder
        .prefetch(Prefetch::Sequential)
        .start()
        .expect("start");
    assert!(
        pager.wait(Some(Duration::from_secs(20))),
        "the pager gives up on the page: {:?}",
        pager.stats()
    );
    let error = pager.stop().expect_err("a fatal error");
    assert!(
        error.to_string().contains("ENOENT") || format!("{error:?}").contains("RangeGone"),
        "the error names the refusal: {error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// The last page-aligned image offset: a run that starts here and holds two pages has its
/// second page past 2^64.
const LAST_PAGE_OFFSET: u64 = u64::MAX - (PS as u64 - 1);

/// A run handed to a placer whose pages pass image offset 2^64 places nothing: the
/// offsets were summed without a check, so in release builds the run's second page landed
/// at image offset 0 — a page the caller never named (in debug builds, a panic).
#[test]
fn a_run_whose_image_offsets_wrap_around_lands_nowhere() {
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, PAGES * PS).expect("map"));
    let (pager, placer, _) = common::remote(common::uffd(), &[(memory.clone(), 0)], PAGES * PS);
    let data = vec![0xAB; 2 * PS];
    assert_eq!(
        placer.place_run(LAST_PAGE_OFFSET, &data).expect("run"),
        Some(0)
    );
    assert_eq!(
        placer
            .place_zero_run(LAST_PAGE_OFFSET, 2 * PS)
            .expect("zero run"),
        Some(0)
    );
    let staging = Mapping::anon_aligned(2 * PS, PS).expect("staging");
    // SAFETY: our own mapping, unregistered, borrowed exclusively for the call.
    let given = unsafe { std::slice::from_raw_parts_mut(staging.as_ptr(), 2 * PS) };
    given.fill(0xCD);
    assert_eq!(
        placer
            .place_run_moving(LAST_PAGE_OFFSET, given)
            .expect("moving run"),
        Some(0)
    );
    assert_eq!(
        placer.state(0),
        Some(PageState::Missing),
        "page 0 untouched"
    );
    let stats = pager.stop().expect("stop");
    assert_eq!(stats.placed_arrival + stats.placed_zero, 0, "{stats:?}");
}

/// A region whose image range would pass 2^64 bytes is refused at start: its end was
/// summed without a check, so in release builds a two-page region at the last page offset
/// "needed" one page of the image, started, and its second page was served image page 0
/// (in debug builds, `start` panicked).
#[test]
fn a_region_whose_image_range_wraps_around_is_refused() {
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, 2 * PS).expect("map"));
    let image = common::image(2, PS, 0);
    let started = Pager::builder(common::uffd(), Arc::new(MemorySource::new(image.clone())))
        .mapping(memory.clone(), LAST_PAGE_OFFSET)
        .mode(DeliveryMode::Thread)
        .start();
    match started {
        Err(pager::Error::BadRegion { reason, .. }) => {
            assert!(reason.contains("image"), "{reason}")
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(pager) => {
            // SAFETY: served by the pager: a raw read of whatever it placed.
            let second = unsafe { common::bytes(memory.addr() + PS, PS) };
            let held = image.chunks(PS).position(|page| page == second);
            panic!(
                "started; its second page holds image page {held:?}; {:?}",
                pager.stop()
            )
        }
    }
}

/// A region named by address whose end would pass the top of the address space is
/// refused with the reason, never summed into a wrapped end: the overlap check compared
/// that end with the other regions' (an overflow panic in debug builds; in release builds
/// only the kernel's EINVAL at registration stopped it).
#[test]
fn a_region_whose_address_range_wraps_around_is_refused() {
    let image = common::image(4, PS, 0);
    let builder = Pager::builder(common::uffd(), Arc::new(MemorySource::new(image)));
    let specs = [
        pager::RegionSpec::new(usize::MAX - (PS - 1), 2 * PS, MemoryKind::Anon, 0),
        pager::RegionSpec::new(0x10_0000, 2 * PS, MemoryKind::Anon, 2 * PS as u64),
    ];
    // SAFETY: refused before anything is registered or placed (what the test checks).
    let started = unsafe { builder.regions(specs) }
        .mode(DeliveryMode::Thread)
        .start();
    match started {
        Err(pager::Error::BadRegion { reason, .. }) => {
            assert!(reason.contains("address space"), "{reason}")
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(pager) => panic!("started: {:?}", pager.stop()),
    }
}

/// What Firecracker 1.1 to 1.10 does to a restored VM's balloon pages: fresh anonymous
/// memory mapped over them (MAP_FIXED), which no event reports to a uffd without UNMAP
/// events. With `silent_unmaps` the page is the process's from then on: left alone,
/// counted, and the rest of the region served — where without it the pager fails (above).
#[test]
fn with_silent_unmaps_a_page_mapped_over_is_left_to_the_process() {
    if !testkit::isolated(
        "regions::with_silent_unmaps_a_page_mapped_over_is_left_to_the_process",
        WATCHDOG,
    ) {
        return;
    }
    use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
    use std::num::NonZeroUsize;
    let len = PAGES * PS;
    let rw = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
    let size = NonZeroUsize::new(len).expect("len");
    // SAFETY: a fresh mapping of our own, given to the pager under its contract.
    let base = unsafe { mmap_anonymous(None, size, rw, MapFlags::MAP_PRIVATE) }.expect("mmap");
    let base = base.as_ptr() as usize;
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_REMOVE)
        .open()
        .expect("uffd");
    // Registered first, as the VMM does; the memory put over page 2 after is not.
    uffd.register(base, len, uffd_core::RegisterMode::MISSING)
        .expect("register");
    let page2 = NonZeroUsize::new(base + 2 * PS).expect("addr");
    let one = NonZeroUsize::new(PS).expect("len");
    // SAFETY: page 2 of our own mapping, replaced before the pager exists.
    unsafe {
        mmap_anonymous(
            Some(page2),
            one,
            rw,
            MapFlags::MAP_PRIVATE | MapFlags::MAP_FIXED,
        )
    }
    .expect("map over page 2");
    let image = common::image(PAGES, PS, 0);
    let builder = Pager::builder(uffd, Arc::new(MemorySource::new(image.clone())));
    let spec = pager::RegionSpec::new(base, len, MemoryKind::Anon, 0);
    // SAFETY: our own mapping, read raw only after the pager completes; its page 2 was
    // mapped over behind the pager's back on purpose (what the test is about).
    let builder = unsafe { builder.region(spec) }
        .register(false)
        .mode(DeliveryMode::Thread)
        .silent_unmaps(true);
    let pager = builder
        .prefetch(Prefetch::Sequential)
        .start()
        .expect("start");
    assert!(
        pager.wait_complete(Duration::from_secs(20)),
        "the prefetch completes: {:?}",
        pager.stats()
    );
    let stats = pager.stop().expect("no fatal error");
    assert_eq!(stats.gone_silently, 1, "{stats:?}");
    assert_eq!(stats.placed(), PAGES as u64 - 1, "{stats:?}");
    for page in 0..PAGES {
        // SAFETY: our own mapping, every page present (placed, or plain memory).
        let got = unsafe { std::slice::from_raw_parts((base + page * PS) as *const u8, PS) };
        let want = match page {
            2 => vec![0u8; PS],
            _ => image[page * PS..(page + 1) * PS].to_vec(),
        };
        assert!(got == want.as_slice(), "page {page}");
    }
}
