//! The baselines a lazy restore is compared with: copying everything first (eager), and
//! `mmap(MAP_PRIVATE)` of the image.

use super::*;

pub(super) fn run_eager(
    args: &Args,
    image: &Image,
    len: u64,
    pages: &[usize],
    reference: Option<&std::fs::File>,
) -> Result<Outcome> {
    let start = Instant::now();
    let mut downloaded = match image {
        Image::Url(url) => {
            // Download the whole image first (every chunk, verified), as a restore that
            // does not page lazily must.
            // mkdtemp: nobody else can pre-create the directory or plant a link in it.
            let dir = uffd_core::private_fs::TempDir::new("uffdkit-download-")
                .context("create a temporary directory")?;
            let path = dir.path().join("image");
            let img = chunked::Image::open(url, &args.chunked.bound.store_options())?;
            img.pull(
                &path,
                args.chunked.cache.open()?,
                chunked::RetryPolicy::default(),
                16,
            )?;
            Some((Some(dir), std::fs::File::open(&path)?))
        }
        Image::File(..) => None,
    };
    let file = match (&downloaded, image) {
        (Some((_, f)), _) => f,
        (None, Image::File(f, _)) => f,
        (None, Image::Url(_)) => unreachable!("downloaded above"),
    };
    let memory = Mapping::new(MemoryKind::Anon, (len as usize).next_multiple_of(PS))?;
    // SAFETY: our fresh mapping of at least `len` bytes.
    let dst = unsafe { std::slice::from_raw_parts_mut(memory.as_ptr(), len as usize) };
    file.read_exact_at(dst, 0).context("read the image")?;
    let loaded = start.elapsed();
    // Read in: the directory goes now (the file with it once closed).
    if let Some((dir, _)) = &mut downloaded {
        drop(dir.take());
    }
    let t = Instant::now();
    let workload = run_workload(memory.addr(), pages, args.writes, &AtomicUsize::new(0));
    let wall = t.elapsed();
    let total = start.elapsed();
    if let (false, Some(file)) = (args.no_verify, reference) {
        verify(memory.addr(), file, pages, len, args.writes)?;
    }
    let mut detail = workload_detail(&workload, wall);
    merge(&mut detail, json!({ "load_s": loaded.as_secs_f64() }));
    Ok(Outcome {
        strategy: if downloaded.is_some() {
            "download"
        } else {
            "eager"
        },
        total,
        detail,
        lat: workload.lat,
        timeline: Vec::new(),
    })
}

pub(super) fn run_mmap(
    args: &Args,
    len: u64,
    pages: &[usize],
    file: &std::fs::File,
) -> Result<Outcome> {
    let start = Instant::now();
    let size = std::num::NonZeroUsize::new(len as usize).context("an empty image")?;
    // SAFETY: a fresh private mapping of the open file, nothing else refers to its range;
    // writes are copied on write and never reach the file.
    let mapped = unsafe {
        nix::sys::mman::mmap(
            None,
            size,
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_PRIVATE,
            file,
            0,
        )
    }
    .context("mmap the image")?;
    let addr = mapped.as_ptr() as usize;
    let t = Instant::now();
    let workload = run_workload(addr, pages, args.writes, &AtomicUsize::new(0));
    let wall = t.elapsed();
    let total = start.elapsed();
    let checked = if args.no_verify {
        Ok(())
    } else {
        verify(addr, file, pages, len, args.writes)
    };
    // SAFETY: our mapping, no longer used.
    let _ = unsafe { nix::sys::mman::munmap(mapped, len as usize) };
    checked?;
    Ok(Outcome {
        strategy: "mmap",
        total,
        detail: workload_detail(&workload, wall),
        lat: workload.lat,
        timeline: Vec::new(),
    })
}
