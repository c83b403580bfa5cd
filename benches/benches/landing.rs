//! What landing a page costs the destination, per byte on one CPU: each step the
//! receiver takes for an arriving page (`UFFDIO_COPY` into missing memory, the migration
//! digest, the frame CRC), beside what a plain copy costs here and what a copy into fresh
//! pages (fault, zeroing, copy) costs, so the stream's ceiling is a measured figure.
//! `uffdio_move` is the other half of a design that receives into fresh pages and moves
//! them into place: that design pays `fresh_page_memcpy` (as `recv`'s copy) plus it.
//! `shmem_continue` is a third design, for guest memory that is a memfd: receive straight
//! into its page cache through an unregistered alias, then map the pages with
//! `UFFDIO_CONTINUE` — one copy in all (its `memcpy` stands for `recv`'s), against
//! `recv`'s plus `UFFDIO_COPY`'s. `thp_move` is a whole fourth design: receive into fresh
//! transparent huge pages and move each whole 2 MiB into place with one `UFFDIO_MOVE` —
//! `recv`'s copy (its `memcpy`), the huge page's fault and zeroing, and the move; compare
//! it with `uffdio_copy` plus `memcpy`, what the receiver pays today for the same bytes.
//!
//! Every case covers a 64 MiB region (`UFFDKIT_LANDING_MIB`) in runs of 32 pages, the
//! piece the receiver lands at once (`Receiver::land_pages`): one ioctl per run, as
//! `Placer::place_run` issues. The source of every run is one 128 KiB buffer, resident in
//! cache as a just-received frame is; the region is emptied between iterations outside the
//! timed part (`iter_custom`). 64 MiB fits this machine's last-level cache (300 MiB); a
//! migration lands GiBs of cold memory, which `UFFDKIT_LANDING_MIB=1024` measures.
//!
//! `taskset -c 1 nice cargo bench -p uffdkit-benches --bench landing`
//! (one CPU, as the README's raw-TCP figure). Criterion's time is wall time, which a busy
//! machine inflates; with `UFFDKIT_CLOCK=cpu` each case is timed by the CPU time (user and
//! system) of the thread that runs it instead: what landing costs a CPU, while others share it.

use std::hint::black_box;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use nix::time::{clock_gettime, ClockId};
use uffd_core::{
    ContinueMode, CopyMode, Features, Mapping, MemoryKind, MoveMode, RegisterMode, Uffd,
};

const PAGE: usize = 4096;
/// Pages per run: the receiver's piece (`PIECE` in postcopy's receiver).
const RUN_PAGES: usize = 32;
const RUN: usize = RUN_PAGES * PAGE;
/// A transparent huge page.
const HUGE: usize = 2 << 20;

/// The region's size in bytes: 64 MiB, or `UFFDKIT_LANDING_MIB` MiB. A region the size
/// of the last-level cache or more shows what writing to cold memory adds to each copy.
fn region_len() -> usize {
    static MIB: OnceLock<usize> = OnceLock::new();
    let mib = *MIB.get_or_init(|| match std::env::var("UFFDKIT_LANDING_MIB") {
        Err(_) => 64,
        Ok(v) => match v.parse() {
            Ok(mib) if mib > 0 => mib,
            _ => panic!("UFFDKIT_LANDING_MIB={v}: a whole number of MiB"),
        },
    });
    mib << 20
}

/// Runs in the region.
fn runs() -> usize {
    region_len() / RUN
}

/// One run's bytes, every page different and no page zero.
fn source() -> Vec<u8> {
    (0..RUN)
        .map(|i| (i / PAGE * 7 + i % 251 + 1) as u8)
        .collect()
}

fn anon(len: usize) -> Mapping {
    Mapping::new(MemoryKind::Anon, len).expect("map anonymous memory")
}

/// Drops every page of `m`: the next touch (or placement) finds it missing.
fn empty(m: &Mapping) {
    m.madvise(0, m.len(), libc::MADV_DONTNEED)
        .expect("MADV_DONTNEED");
}

/// Panics unless every run of `m` reads back as `src`.
fn assert_holds_runs(m: &Mapping, src: &[u8]) {
    // SAFETY: `m` is mapped for its length and every page is present (placed or
    // written), so no read faults into a userfaultfd; nothing writes it meanwhile.
    let bytes = unsafe { std::slice::from_raw_parts(m.as_ptr().cast_const(), m.len()) };
    for (r, run) in bytes.chunks_exact(RUN).enumerate() {
        assert!(run == src, "run {r} does not hold the source bytes");
    }
}

/// What the cases are timed by (`UFFDKIT_CLOCK`: `wall`, the default, or `cpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    Wall,
    /// `CLOCK_THREAD_CPUTIME_ID`: this thread's user and system time, page faults and
    /// ioctls included; time spent waiting for the CPU is not.
    ThreadCpu,
}

fn clock() -> Clock {
    static CLOCK: OnceLock<Clock> = OnceLock::new();
    *CLOCK.get_or_init(|| match std::env::var("UFFDKIT_CLOCK").as_deref() {
        Ok("cpu") => Clock::ThreadCpu,
        Ok("wall") | Err(_) => Clock::Wall,
        Ok(other) => panic!("UFFDKIT_CLOCK={other}: wall or cpu"),
    })
}

fn thread_cpu_time() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .expect("CLOCK_THREAD_CPUTIME_ID")
        .into()
}

/// Sums the times of `iters` calls of `body`, each after an untimed `prepare`.
fn timed(iters: u64, mut prepare: impl FnMut(), mut body: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        prepare();
        total += match clock() {
            Clock::Wall => {
                let start = Instant::now();
                body();
                start.elapsed()
            }
            Clock::ThreadCpu => {
                let start = thread_cpu_time();
                body();
                thread_cpu_time() - start
            }
        };
    }
    total
}

/// A userfaultfd with `features` (those the kernel has) serving `region` for missing pages.
fn registered(region: &Mapping, features: Features) -> Uffd {
    let uffd = Uffd::builder()
        .optional(features)
        .open()
        .expect("open a userfaultfd (root, or vm.unprivileged_userfaultfd=1)");
    uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
        .expect("register MISSING");
    uffd
}

/// Copies `src` into each run of `dst` as the receiver's unregistered land does.
fn memcpy_runs(dst: &Mapping, src: &[u8]) {
    for r in 0..runs() {
        // SAFETY: `dst` is our unregistered mapping of `region_len()` bytes and the run lies in
        // it; `src` is a separate buffer of RUN bytes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_ptr().add(r * RUN), RUN) };
    }
}

/// Places `src` into each run of the empty, registered `region` with one `UFFDIO_COPY`.
fn copy_runs(uffd: &Uffd, region: &Mapping, src: &[u8]) {
    for r in 0..runs() {
        // SAFETY: the run lies in `region`, registered with `uffd`; only this bench reads
        // it, and expects `src` there.
        let placed = unsafe { uffd.copy(region.addr() + r * RUN, src, CopyMode::empty()) }
            .expect("UFFDIO_COPY into missing pages");
        assert_eq!(placed, RUN);
    }
}

/// Moves each run of `from` into the empty, registered `region` with one `UFFDIO_MOVE`.
fn move_runs(uffd: &Uffd, region: &Mapping, from: &Mapping) {
    for r in 0..runs() {
        let off = r * RUN;
        // SAFETY: the run lies in `region`, registered with `uffd`, which only this bench
        // reads; `from` is our unregistered mapping, whose pages we give up.
        let moved = unsafe {
            uffd.move_pages(
                region.addr() + off,
                from.addr() + off,
                RUN,
                MoveMode::empty(),
            )
        }
        .expect("UFFDIO_MOVE into missing pages");
        assert_eq!(moved, RUN);
    }
}

fn uffdio_copy(g: &mut BenchmarkGroup<'_, WallTime>, src: &[u8]) {
    let region = anon(region_len());
    let uffd = registered(&region, Features::empty());
    // Once, outside timing: the placed pages hold the source. Every timed pass places into
    // an emptied region too: a page left present would fail the copy with EEXIST.
    copy_runs(&uffd, &region, src);
    assert_holds_runs(&region, src);
    g.bench_function("uffdio_copy", |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || empty(&region),
                || copy_runs(&uffd, &region, black_box(src)),
            )
        })
    });
}

fn uffdio_move(g: &mut BenchmarkGroup<'_, WallTime>, src: &[u8]) {
    let region = anon(region_len());
    let uffd = registered(&region, Features::MOVE);
    if !uffd.features().contains(Features::MOVE) {
        testkit::skip("landing/uffdio_move", "the kernel has no UFFDIO_MOVE");
        return;
    }
    // Where a receiver that reads into fresh pages would have them; filled (faulted in)
    // before each pass, outside timing: fresh_page_memcpy is that part.
    let from = anon(region_len());
    memcpy_runs(&from, src);
    move_runs(&uffd, &region, &from);
    assert_holds_runs(&region, src);
    // SAFETY: `from` is mapped and unregistered: its moved-away pages read as zero.
    let left = unsafe { std::slice::from_raw_parts(from.as_ptr().cast_const(), from.len()) };
    assert!(
        left.iter().all(|&b| b == 0),
        "the moved pages left their source"
    );
    empty(&from);
    g.bench_function("uffdio_move", |b| {
        b.iter_custom(|iters| {
            let prepare = || {
                empty(&region);
                memcpy_runs(&from, src);
            };
            timed(iters, prepare, || move_runs(&uffd, &region, &from))
        })
    });
}

/// Anonymous memory on 2 MiB boundaries, advised for transparent huge pages.
fn thp_advised(len: usize) -> Mapping {
    let m = Mapping::anon_aligned(len, HUGE).expect("map aligned anonymous memory");
    m.madvise(0, len, libc::MADV_HUGEPAGE)
        .expect("MADV_HUGEPAGE");
    m
}

/// Fills `from` (fresh, THP-advised) with the runs of `src`, as `recv` into it would, and
/// moves it into the empty, registered `region` 2 MiB at a time.
fn thp_move_runs(uffd: &Uffd, region: &Mapping, from: &Mapping, src: &[u8]) {
    memcpy_runs(from, src);
    for off in (0..region.len()).step_by(HUGE) {
        // SAFETY: the 2 MiB lie in `region`, registered with `uffd`, which only this bench
        // reads; `from` is our unregistered mapping, whose pages we give up.
        let moved = unsafe {
            uffd.move_pages(
                region.addr() + off,
                from.addr() + off,
                HUGE,
                MoveMode::empty(),
            )
        }
        .expect("UFFDIO_MOVE of a huge page into missing memory");
        assert_eq!(moved, HUGE);
    }
}

fn thp_move(g: &mut BenchmarkGroup<'_, WallTime>, src: &[u8]) {
    assert_eq!(
        region_len() % HUGE,
        0,
        "UFFDKIT_LANDING_MIB: a multiple of 2"
    );
    let region = thp_advised(region_len());
    let uffd = registered(&region, Features::MOVE);
    if !uffd.features().contains(Features::MOVE) {
        testkit::skip("landing/thp_move", "the kernel has no UFFDIO_MOVE");
        return;
    }
    let from = thp_advised(region_len());
    memcpy_runs(&from, src);
    if !testkit::hugepages::all_transparent(&from) {
        // THP disabled (`/sys/kernel/mm/transparent_hugepage/enabled`: never), or memory
        // too fragmented for 2 MiB pages: this design would not have them either.
        testkit::skip(
            "landing/thp_move",
            "fresh memory did not get transparent huge pages",
        );
        return;
    }
    empty(&from);
    thp_move_runs(&uffd, &region, &from, src);
    assert_holds_runs(&region, src);
    assert!(
        testkit::hugepages::all_transparent(&region),
        "the huge pages were moved whole"
    );
    g.bench_function("thp_move", |b| {
        b.iter_custom(|iters| {
            // The moves left `from` empty: only the region is emptied again.
            timed(
                iters,
                || empty(&region),
                || thp_move_runs(&uffd, &region, &from, black_box(src)),
            )
        })
    });
}

/// Writes each run of `src` through `alias` into the page cache (populated in bulk first,
/// as a receiver would before `recv` into it), then maps it in `region` (registered MINOR)
/// with one `UFFDIO_CONTINUE`.
fn continue_runs(uffd: &Uffd, region: &Mapping, alias: &Mapping, src: &[u8]) {
    for r in 0..runs() {
        let off = r * RUN;
        alias
            .madvise(off, RUN, libc::MADV_POPULATE_WRITE)
            .expect("MADV_POPULATE_WRITE");
        // SAFETY: the run lies in `alias`, our unregistered mapping of the memfd; `src`
        // is a separate buffer of RUN bytes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), alias.as_ptr().add(off), RUN) };
        // SAFETY: the run lies in `region`, registered with `uffd`; only this bench reads
        // it, and expects what was just written behind it.
        let mapped =
            unsafe { uffd.continue_range(region.addr() + off, RUN, ContinueMode::empty()) }
                .expect("UFFDIO_CONTINUE");
        assert_eq!(mapped, RUN);
    }
}

fn shmem_continue(g: &mut BenchmarkGroup<'_, WallTime>, src: &[u8]) {
    let region = Mapping::new(MemoryKind::Shmem, region_len()).expect("map a memfd");
    let alias = region.alias().expect("a second mapping of the memfd");
    let uffd = Uffd::builder()
        .optional(Features::MINOR_SHMEM)
        .open()
        .expect("open a userfaultfd (root, or vm.unprivileged_userfaultfd=1)");
    if !uffd.features().contains(Features::MINOR_SHMEM) {
        testkit::skip(
            "landing/shmem_continue",
            "the kernel has no MINOR mode on shmem",
        );
        return;
    }
    uffd.register(region.addr(), region.len(), RegisterMode::MINOR)
        .expect("register MINOR");
    // Punches the whole file out: page cache and both mappings empty again.
    let punch = || {
        region
            .madvise(0, region.len(), libc::MADV_REMOVE)
            .expect("MADV_REMOVE");
    };
    continue_runs(&uffd, &region, &alias, src);
    assert_holds_runs(&region, src);
    punch();
    // A page already mapped would fail the next pass's UFFDIO_CONTINUE with EEXIST: the
    // punch emptied the registered mapping too.
    g.bench_function("shmem_continue", |b| {
        b.iter_custom(|iters| {
            timed(iters, punch, || {
                continue_runs(&uffd, &region, &alias, black_box(src))
            })
        })
    });
}

fn memcpy(g: &mut BenchmarkGroup<'_, WallTime>, src: &[u8]) {
    let dst = anon(region_len());
    memcpy_runs(&dst, src); // faults every page in, before any timing
    assert_holds_runs(&dst, src);
    g.bench_function("memcpy", |b| {
        b.iter_custom(|iters| timed(iters, || {}, || memcpy_runs(&dst, black_box(src))))
    });
}

fn fresh_page_memcpy(g: &mut BenchmarkGroup<'_, WallTime>, src: &[u8]) {
    let dst = anon(region_len());
    memcpy_runs(&dst, src);
    assert_holds_runs(&dst, src);
    g.bench_function("fresh_page_memcpy", |b| {
        b.iter_custom(|iters| timed(iters, || empty(&dst), || memcpy_runs(&dst, black_box(src))))
    });
}

/// Sums `f` over the region's runs (all from `src`) in `chunk`-byte pieces, and checks
/// the sum is `runs()` times one run's: the pass read every byte it was given.
fn summed(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    src: &[u8],
    chunk: usize,
    f: fn(&[u8]) -> u64,
) {
    let one_run = src
        .chunks_exact(chunk)
        .fold(0u64, |a, c| a.wrapping_add(f(c)));
    let expected = one_run.wrapping_mul(runs() as u64);
    let pass = || {
        let mut sum = 0u64;
        for _ in 0..runs() {
            for c in black_box(src).chunks_exact(chunk) {
                sum = sum.wrapping_add(f(c));
            }
        }
        assert_eq!(sum, expected, "{name} over the region");
    };
    g.bench_function(name, |b| b.iter_custom(|iters| timed(iters, || {}, pass)));
}

/// The migration digest of each page, as the destination takes it of every page it lands.
fn digest(g: &mut BenchmarkGroup<'_, WallTime>, src: &[u8]) {
    let mut digests: Vec<u64> = src
        .chunks_exact(PAGE)
        .map(postcopy::migrate::digest)
        .collect();
    digests.sort_unstable();
    digests.dedup();
    assert_eq!(
        digests.len(),
        RUN_PAGES,
        "the digest tells the run's pages apart"
    );
    summed(g, "digest", src, PAGE, postcopy::migrate::digest);
}

/// CRC-32 (IEEE) one bit at a time: the reference crc32fast's SIMD path must match.
fn crc32_bitwise(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// The frame CRC over the same bytes, a run per call (a frame's CRC is one call over it).
fn crc32(g: &mut BenchmarkGroup<'_, WallTime>, src: &[u8]) {
    assert_eq!(
        crc32fast::hash(src),
        crc32_bitwise(src),
        "crc32fast is CRC-32"
    );
    summed(g, "crc32", src, RUN, |run| u64::from(crc32fast::hash(run)));
}

fn landing(c: &mut Criterion) {
    let src = source();
    eprintln!("landing: timed by {:?} (UFFDKIT_CLOCK)", clock());
    let mut g = c.benchmark_group(format!("landing_{}mib", region_len() >> 20));
    g.throughput(Throughput::Bytes(region_len() as u64));
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(4));
    uffdio_copy(&mut g, &src);
    uffdio_move(&mut g, &src);
    shmem_continue(&mut g, &src);
    thp_move(&mut g, &src);
    memcpy(&mut g, &src);
    fresh_page_memcpy(&mut g, &src);
    digest(&mut g, &src);
    crc32(&mut g, &src);
    g.finish();
}

criterion_group!(benches, landing);
criterion_main!(benches);
