//! `uffdkit fc-client`: plays Firecracker's side of the UFFD handshake against any
//! external page-fault handler (ours, or Firecracker's examples) and verifies every page
//! it serves — what a VMM does, without a guest kernel (which this host cannot boot).

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use uffd_core::{send_fds, Features, Mapping, MemoryKind, RegisterMode, Uffd};

use crate::workload::{order, Pattern};

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
    /// Close the socket right after the handshake, as Firecracker before 1.12 does
    /// (it then runs on its userfaultfd alone); by default it stays open until exit, as
    /// from 1.12.
    #[arg(long)]
    close_socket: bool,
    /// Once every page is verified (the line printed), keep running until stdin closes:
    /// a VMM that goes on after its restore (the handler serves until it exits).
    #[arg(long)]
    hold: bool,
    /// Inflate a balloon as Firecracker 1.1 to 1.10 does after a UFFD restore: fresh
    /// anonymous memory mapped over a quarter of the first region (`MAP_FIXED`, then
    /// `MADV_DONTNEED`: its `remove_range` with `restored`), which takes the range out of
    /// the userfaultfd without any event. Done right after the handshake, before a page is
    /// touched; those pages must read zero (4 KiB pages only: no balloon with huge pages
    /// before 1.14).
    #[arg(long, conflicts_with = "dontneed")]
    balloon_mmap: bool,
    /// Send the region table of Firecracker's secret-freedom builds (`feature/secret-hiding`,
    /// no release up to 1.16): `gpa_start` and `"is_guest_memfd": true`, with two more fds
    /// after the userfaultfd (stand-ins for the guest_memfd and the userfault bitmap).
    #[arg(long)]
    secret_free: bool,
}

/// Runs `uffdkit fc-client`: maps guest memory as Firecracker does, hands the uffd over,
/// touches and verifies every page, and reports the time until every page was touched.
pub fn run(args: &ClientArgs) -> Result<()> {
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
    if args.balloon_mmap && ps != 4096 {
        bail!("--balloon-mmap needs 4 KiB pages (no balloon with huge pages before 1.14)");
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
    // Firecracker's secret-freedom builds add `gpa_start` and `is_guest_memfd`.
    let secret = |off: u64| match args.secret_free {
        true => format!(r#","gpa_start":{off},"is_guest_memfd":true"#),
        false => String::new(),
    };
    let table: Vec<String> = maps
        .iter()
        .map(|(m, off)| {
            format!(
                r#"{{"base_host_virt_addr":{},"size":{},"offset":{},"page_size":{}{},"page_size_kib":{}}}"#,
                m.addr(),
                m.len(),
                off,
                ps,
                secret(*off),
                ps
            )
        })
        .collect();
    let body = format!("[{}]", table.join(","));
    let stream = UnixStream::connect(&args.socket).context("connect to the handler")?;
    let started = Instant::now();
    let stand_ins = match args.secret_free {
        true => vec![file.try_clone()?, file.try_clone()?],
        false => Vec::new(),
    };
    let fds: Vec<_> = std::iter::once(uffd.as_fd())
        .chain(stand_ins.iter().map(|f| f.as_fd()))
        .collect();
    send_fds(&stream, body.as_bytes(), &fds).context("send the region table")?;
    drop(fds);
    drop(uffd); // the handler owns it now, as with Firecracker
    if args.secret_free {
        // Such a Firecracker asks for its vCPUs' faults on the socket and waits for the
        // answer; it never touches unregistered memory: wait as it would.
        let mut byte = [0u8; 1];
        let _ = std::io::Read::read(&mut &stream, &mut byte);
        // Unanswered, it would hang; a handler that refused it kills it (its SIGKILL may
        // come just after the socket closed): hang a while, then say so.
        std::thread::sleep(std::time::Duration::from_secs(10));
        bail!("the handler closed the socket without answering the secret-free VM");
    }
    let stream = (!args.close_socket).then_some(stream);
    let mut want = vec![0u8; ps];
    let mut zeroed = 0..0;
    if args.balloon_mmap {
        zeroed = per / 4..per / 2;
        balloon_mmap(&maps[0].0, zeroed.start * ps, zeroed.len() * ps)?;
    }
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
        "fc-client: {} region(s), {} pages of {} KiB touched and verified in {:.1} ms; {}",
        args.regions,
        per * args.regions,
        ps / 1024,
        elapsed.as_secs_f64() * 1e3,
        resident()
    );
    if args.hold {
        std::io::Write::flush(&mut std::io::stdout())?;
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())?;
    }
    drop(stream);
    Ok(()) // the process exits next: the handler, watching it, stops
}

/// What Firecracker 1.1 to 1.10 does to a balloon's pages in a restored VM: fresh
/// anonymous memory mapped over them (`MAP_FIXED`), then `MADV_DONTNEED`. The new mapping
/// is not registered with any userfaultfd: the range leaves the handler's, silently.
fn balloon_mmap(memory: &Mapping, offset: usize, len: usize) -> Result<()> {
    use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
    use std::num::NonZeroUsize;
    let inside = offset
        .checked_add(len)
        .is_some_and(|end| end <= memory.len());
    let (Some(addr), Some(size), true) = (
        NonZeroUsize::new(memory.addr() + offset),
        NonZeroUsize::new(len),
        inside,
    ) else {
        bail!("the balloon's range is empty or beyond the region");
    };
    // SAFETY: MAP_FIXED over part of our own guest mapping, which hands out no references
    // into its bytes (they are read raw, by address, in `run`); `memory` unmaps the whole
    // range, this part included, when dropped.
    unsafe {
        mmap_anonymous(
            Some(addr),
            size,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE | MapFlags::MAP_FIXED,
        )
    }
    .context("map over the balloon's pages")?;
    memory.madvise(offset, len, libc::MADV_DONTNEED)?;
    Ok(())
}

/// This process's resident anonymous memory (`RssAnon`): the guest pages placed as data
/// (a zero page placed with UFFDIO_ZEROPAGE maps the shared zero page and costs nothing).
fn resident() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    match status.lines().find_map(|l| l.strip_prefix("RssAnon:")) {
        Some(kib) => format!("resident anonymous memory {}", kib.trim()),
        None => "resident anonymous memory unknown".into(),
    }
}
