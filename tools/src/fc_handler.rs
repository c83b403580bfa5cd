//! `uffdkit fc-handler`: a drop-in external page-fault handler for Firecracker snapshot
//! restore (`"mem_backend": {"backend_type": "Uffd", "backend_path": SOCK}`), and
//! `uffdkit fc-client`, which plays Firecracker's side against any such handler.

use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pager::firecracker::{self, ServeOptions};
use pager::FileSource;
use uffd_core::{send_fds, Features, Mapping, MemoryKind, RegisterMode, Uffd};

use crate::cli_args::{Mode, PrefetchArgs};
use crate::workload::{order, Pattern};

/// Options of `uffdkit fc-handler`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The Unix socket to create; Firecracker's `backend_path`.
    #[arg(long)]
    socket: PathBuf,
    /// The snapshot memory file (regions laid end to end, at their `offset`s).
    #[arg(long, required_unless_present_any = ["source", "image"])]
    mem_file: Option<PathBuf>,
    /// Serve a chunked image from an object store (s3://…, file:///…) instead of a file.
    #[arg(long, conflicts_with_all = ["mem_file", "source"])]
    image: Option<String>,
    /// Fetching and caching of `--image`.
    #[command(flatten)]
    image_source: crate::image::SourceArgs,
    /// Serve pages from a `uffdkit serve` page server at this address instead of a
    /// file (host:port or unix:/path; 4 KiB regions).
    #[arg(long, conflicts_with = "mem_file", requires = "key_file")]
    source: Option<String>,
    /// The page server's pre-shared key file (with --source).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Prefetch (started once the first fault is served) and recording.
    #[command(flatten)]
    prefetch: PrefetchArgs,
    /// Delivery mode (not sigbus: the memory is Firecracker's).
    #[arg(long, value_enum, default_value_t = Mode::Percpu)]
    mode: Mode,
    /// On a serving error, SIGKILL the Firecracker process (found with SO_PEERCRED) so it
    /// does not hang on faults nobody will serve.
    #[arg(long)]
    kill_peer_on_error: bool,
}

/// Runs `uffdkit fc-handler`: one restore, then exits 0 when Firecracker exits.
pub fn run(args: &Args) -> Result<()> {
    let source: Arc<dyn pager::Source> = match (&args.mem_file, &args.source, &args.key_file) {
        _ if args.image.is_some() => {
            crate::image::fc_source(args.image.as_deref(), &args.image_source)?
        }
        (Some(file), _, _) => Arc::new(
            FileSource::mmap(file)
                .with_context(|| format!("open memory file {}", file.display()))?,
        ),
        (None, Some(addr), Some(key)) => {
            let key = postcopy::auth::Key::from_file(key).context("read the key file")?;
            let addr: postcopy::net::Addr = addr.parse()?;
            Arc::new(
                postcopy::client::RemoteSource::connect(&addr, &key)
                    .with_context(|| format!("connect to the page server at {addr:?}"))?,
            )
        }
        _ => bail!("give --mem-file, or --source with --key-file"),
    };
    if let Ok(meta) = std::fs::symlink_metadata(&args.socket) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", args.socket.display());
        }
        std::fs::remove_file(&args.socket).context("remove a stale socket")?;
    }
    let listener = UnixListener::bind(&args.socket)
        .with_context(|| format!("bind {}", args.socket.display()))?;
    eprintln!("fc-handler: listening on {}", args.socket.display());
    let hs = firecracker::accept(&listener).context("Firecracker handshake")?;
    if args.source.is_some() && hs.regions.iter().any(|r| r.page_size().ok() != Some(4096)) {
        bail!("--source serves 4 KiB pages; this restore has 2 MiB regions");
    }
    let pages: usize = hs
        .regions
        .iter()
        .map(|r| r.spec().map(|s| s.pages()).unwrap_or(0))
        .sum();
    eprintln!(
        "fc-handler: {} region(s), {} pages, peer pid {}",
        hs.regions.len(),
        pages,
        hs.peer.map_or(-1, |p| p.pid)
    );
    if args.mode == Mode::Sigbus {
        bail!("--mode sigbus cannot serve another process's memory");
    }
    let options = ServeOptions {
        mode: args.mode.into(),
        // A page server streams every page itself; the pager's prefetcher would only
        // duplicate that on the urgent channel.
        prefetch: if args.source.is_some() || args.image.is_some() {
            pager::Prefetch::None
        } else {
            args.prefetch.plan(pages)?
        },
        record: args.prefetch.record.clone(),
        kill_peer_on_error: args.kill_peer_on_error,
    };
    let started = Instant::now();
    let stats = firecracker::serve(hs, source, &options).context("serving guest memory")?;
    eprintln!(
        "fc-handler: peer closed after {:.2} s; {} faults, {} pages on fault, {} prefetched, {} from the page server, {} zero pages, {} REMOVE events",
        started.elapsed().as_secs_f64(),
        stats.faults(),
        stats.placed_fault,
        stats.placed_prefetch,
        stats.placed_arrival,
        stats.placed_zero,
        stats.events_remove
    );
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

/// Options of `uffdkit fc-client`.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// The handler's socket.
    #[arg(long)]
    socket: PathBuf,
    /// The memory file the handler serves (to verify what arrives).
    #[arg(long)]
    mem_file: PathBuf,
    /// Split the file into this many regions laid end to end.
    #[arg(long, default_value_t = 1)]
    regions: usize,
    /// Guest page size: 4096, or 2097152 for 2 MiB hugetlb.
    #[arg(long, default_value_t = 4096)]
    page_size: usize,
    /// Order in which the guest touches its pages.
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pattern: Pattern,
    /// Drop (MADV_DONTNEED) a quarter of the first region mid-run and expect zeros there.
    #[arg(long)]
    dontneed: bool,
}

/// Runs `uffdkit fc-client`: maps guest memory as Firecracker does, hands the uffd over,
/// touches and verifies every page, and reports the time until every page was touched.
pub fn run_client(args: &ClientArgs) -> Result<()> {
    let kind = match args.page_size {
        4096 => MemoryKind::Anon,
        2097152 => MemoryKind::HugetlbPrivate,
        other => bail!("--page-size must be 4096 or 2097152, not {other}"),
    };
    let file = std::fs::File::open(&args.mem_file).context("open memory file")?;
    let len = file.metadata()?.len() as usize;
    let ps = args.page_size;
    let pages = len / ps;
    if args.regions == 0 || pages < args.regions {
        bail!("{pages} pages cannot make {} regions", args.regions);
    }
    let per = pages / args.regions;
    let maps: Vec<(Mapping, u64)> = (0..args.regions)
        .map(|i| Ok((Mapping::new(kind, per * ps)?, (i * per * ps) as u64)))
        .collect::<Result<_>>()?;
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_REMOVE)
        .open()?;
    for (m, _) in &maps {
        uffd.register(m.addr(), m.len(), RegisterMode::MISSING)?;
    }
    let table: Vec<String> = maps
        .iter()
        .map(|(m, off)| {
            format!(
                r#"{{"base_host_virt_addr":{},"size":{},"offset":{},"page_size":{},"page_size_kib":{}}}"#,
                m.addr(),
                m.len(),
                off,
                ps,
                ps
            )
        })
        .collect();
    let body = format!("[{}]", table.join(","));
    let stream = UnixStream::connect(&args.socket).context("connect to the handler")?;
    let started = Instant::now();
    send_fds(&stream, body.as_bytes(), &[uffd.as_fd()]).context("send the region table")?;
    drop(uffd); // the handler owns it now, as with Firecracker
    let mut want = vec![0u8; ps];
    let mut zeroed = 0..0;
    for (r, (m, off)) in maps.iter().enumerate() {
        for (i, page) in order(args.pattern, per, 7 + r as u64)
            .into_iter()
            .enumerate()
        {
            if args.dontneed && r == 0 && i == per / 2 {
                zeroed = per / 4..per / 2;
                m.madvise(zeroed.start * ps, zeroed.len() * ps, libc::MADV_DONTNEED)?;
            }
            // Each page is touched once: after the drop, dropped pages must read zero.
            if r == 0 && zeroed.contains(&page) {
                want.fill(0);
            } else {
                file.read_exact_at(&mut want, off + (page * ps) as u64)?;
            }
            // SAFETY: guest memory, served by the handler under test.
            let got = unsafe { std::slice::from_raw_parts(m.page_addr(page) as *const u8, ps) };
            if got != want.as_slice() {
                bail!("region {r} page {page}: wrong content");
            }
        }
    }
    let elapsed = started.elapsed();
    println!(
        "fc-client: {} region(s), {} pages of {} KiB touched and verified in {:.1} ms",
        args.regions,
        per * args.regions,
        ps / 1024,
        elapsed.as_secs_f64() * 1e3
    );
    drop(stream); // EOF: the handler exits
    Ok(())
}
