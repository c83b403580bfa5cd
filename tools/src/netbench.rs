//! `uffdkit migrate netbench`: the postcopy transport against its own baselines, measured
//! in one run over TCP loopback (raw TCP pinned both ways, the rest unpinned): the round
//! trip of a small frame, raw TCP throughput of the same bytes the stream carries, the
//! background stream's throughput (pages placed at the destination), and the latency of
//! requested pages with the link idle and with the stream saturating it — with `--tls`,
//! the stream and the requested pages over TLS 1.3 too (certificates from a throwaway
//! CA), each series interleaved with the plaintext one so both see the same machine.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use postcopy::migrate::{DestOptions, Destination, Migration, SourceOptions};
use postcopy::net::Conn;
use postcopy::Security;
use serde_json::json;
use transport::tls::Authority;
use transport::wire::Control;
use transport::Key;
use transport::Socket;
use uffd_core::{Mapping, MemoryKind, PageCategories, PageRegion, Pagemap, ScanFlags, ScanQuery};

use crate::workload::{
    fill_page, order, process_cpu, summarize, timed_touch, Pattern, Summary, Touch,
};

/// Options of `uffdkit migrate netbench`.
#[derive(clap::Args, Debug)]
pub struct NetArgs {
    /// Bytes streamed per throughput run (and the region of the loaded-latency run).
    #[arg(long, default_value = "256M", value_parser = crate::units::parse_size)]
    pub size: usize,
    /// Region of the demand-only (idle) latency run: every page is requested.
    #[arg(long, default_value = "32M", value_parser = crate::units::parse_size)]
    pub idle_size: usize,
    /// Random pages touched (timed) by the destination workload per latency run.
    #[arg(long, default_value_t = 1000)]
    pub touches: usize,
    /// Runs of each measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Also over TLS 1.3 (`auto`: certificates from a throwaway CA), against plaintext
    /// with a pre-shared key in the same run.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "auto")]
    pub tls: Option<crate::link_args::AutoTls>,
    /// The destination moves the stream's whole 2 MiB blocks in as transparent huge pages
    /// instead of copying every page (`DestOptions::huge_pages`).
    #[arg(long)]
    pub huge_pages: bool,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Round trips of a PING/PONG frame pair over one loopback connection: unpinned, on this
/// thread; with `pin`, the pinger on CPU `pin[0]` and the echo on `pin[1]`, on threads of
/// their own (this thread's affinity, which later threads inherit, is left alone).
fn round_trips(n: usize, pin: Option<[usize; 2]>) -> Result<Summary> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let echo = std::thread::spawn(move || -> Result<()> {
        if let Some([_, cpu]) = pin {
            pager::pin_to_cpu(cpu)?;
        }
        let (s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut conn = Conn::plain(Socket::Tcp(s))?;
        while let Ok(Control::Ping { seq }) = conn.r.recv_control() {
            conn.w.send_control(&Control::Pong { seq })?;
        }
        Ok(())
    });
    let ping = move || -> Result<Summary> {
        // Connected first: the echo leaves its accept whatever happens here.
        let s = TcpStream::connect(addr)?;
        if let Some([cpu, _]) = pin {
            pager::pin_to_cpu(cpu)?;
        }
        s.set_nodelay(true)?;
        let mut conn = Conn::plain(Socket::Tcp(s))?;
        let mut ns = Vec::with_capacity(n);
        let t = Instant::now();
        for seq in 0..n as u64 {
            let s = Instant::now();
            conn.w.send_control(&Control::Ping { seq })?;
            match conn.r.recv_control()? {
                Control::Pong { seq: got } if got == seq => {}
                other => anyhow::bail!("echo answered {other:?}"),
            }
            ns.push(s.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
        let wall = t.elapsed();
        conn.link.shutdown();
        Ok(summarize(ns, wall))
    };
    let rtt = match pin {
        None => ping(),
        Some(_) => std::thread::spawn(ping)
            .join()
            .map_err(|_| anyhow::anyhow!("pinger panicked"))?,
    };
    let _ = echo.join();
    rtt
}

/// Milliseconds of CPU per GiB moved.
fn per_gib(cpu: Duration, bytes: usize) -> f64 {
    cpu.as_secs_f64() * 1e3 * f64::from(1u32 << 30) / bytes as f64
}

/// Raw TCP: MiB/s of `bytes` written in 256 KiB chunks to a reader that discards them,
/// the writer pinned to CPU 0 and the reader to `reader_cpu`, and the CPU both took per
/// GiB.
fn raw_tcp(bytes: usize, reader_cpu: usize) -> Result<(f64, f64)> {
    let cpu = process_cpu()?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let reader = std::thread::spawn(move || -> Result<()> {
        pager::pin_to_cpu(reader_cpu)?;
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < bytes {
            let n = s.read(&mut buf)?;
            anyhow::ensure!(n > 0, "closed early");
            got += n;
        }
        s.write_all(&[1])?;
        Ok(())
    });
    let writer = std::thread::spawn(move || -> Result<Duration> {
        pager::pin_to_cpu(0)?;
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let chunk = vec![0x5au8; 256 << 10];
        let t = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            s.write_all(&chunk[..n])?;
            sent += n;
        }
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack)?;
        Ok(t.elapsed())
    });
    let took = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let cpu = per_gib(process_cpu()? - cpu, bytes);
    Ok((
        bytes as f64 / took.as_secs_f64() / f64::from(1u32 << 20),
        cpu,
    ))
}

/// One in-process pure-postcopy migration of `bytes` of non-zero pages. `touches`: the
/// destination workload times that many random-page reads at RUN (then, without
/// `background`, reads every page so the demand-only run completes). Returns the
/// destination's RUN → complete time, the touch latencies of pages that faulted, and the
/// CPU both ends took per GiB from RUN to their end (the digests and verdict included).
/// `huge_pages`: the destination's [`DestOptions::huge_pages`].
fn migration(
    (listener, opener): &(Security, Security),
    bytes: usize,
    (background, touches): (bool, usize),
    huge_pages: bool,
) -> Result<(Duration, Vec<u32>, f64)> {
    let opts = DestOptions {
        huge_pages,
        ..DestOptions::default()
    };
    let dest = Destination::bind(&"127.0.0.1:0".parse()?, listener, opts)?;
    let addr = dest.local_addr()?;
    type Touches = std::thread::JoinHandle<uffd_core::Result<Vec<u32>>>;
    let lat: Arc<Mutex<Option<Touches>>> = Arc::default();
    let l = lat.clone();
    let at_run: Arc<Mutex<Option<Duration>>> = Arc::default();
    let r = at_run.clone();
    let dest_t = std::thread::spawn(move || {
        dest.run(move |mem| {
            *r.lock().unwrap_or_else(|p| p.into_inner()) = process_cpu().ok();
            *l.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::thread::spawn(move || {
                let pages = mem.len / 4096;
                let mut timed: Vec<usize> = order(Pattern::Random, pages, 11);
                timed.truncate(touches);
                let ns = requested_touches(mem.base, &timed)?;
                if !background {
                    let all: Vec<usize> = (0..pages).collect();
                    let _ = timed_touch(mem.base, 4096, &all, Touch::Read);
                }
                Ok(ns)
            }));
        })
    });
    let memory = Mapping::new(MemoryKind::Anon, bytes)?;
    for p in 0..bytes / 4096 {
        // SAFETY: our fresh mapping.
        let page =
            unsafe { std::slice::from_raw_parts_mut((memory.addr() + p * 4096) as *mut u8, 4096) };
        fill_page(page, p, 0);
    }
    let opts = SourceOptions {
        max_rounds: 0,
        background,
        ..SourceOptions::default()
    };
    // SAFETY: our mapping, alive until `run` returns; nothing writes it.
    let m = unsafe { Migration::new(addr, opener, memory.addr(), bytes, opts)? };
    m.run(|| {}).context("source")?;
    let report = dest_t
        .join()
        .map_err(|_| anyhow::anyhow!("destination panicked"))?
        .context("destination")?;
    let touches = lat.lock().unwrap_or_else(|p| p.into_inner()).take();
    let faulted = touches
        .context("no RUN: the destination workload never started")?
        .join()
        .map_err(|_| anyhow::anyhow!("destination workload panicked"))?
        .context("destination workload")?;
    let at_run = at_run.lock().unwrap_or_else(|p| p.into_inner()).take();
    let cpu = per_gib(process_cpu()? - at_run.context("no RUN")?, bytes);
    Ok((report.postcopy, faulted, cpu))
}

/// Reads one byte of each page of `order` under `base` (4 KiB pages), timing each, and
/// returns the latencies of the touches whose page was not present just before
/// (`PAGEMAP_SCAN`): the requested pages, told apart by the page tables, not by a time
/// threshold (a present page's touch can be preempted past any threshold). A page the
/// stream places between the scan and the touch counts though it did not fault: a window
/// of one syscall's return.
fn requested_touches(base: usize, order: &[usize]) -> uffd_core::Result<Vec<u32>> {
    let pagemap = Pagemap::open()?;
    let present = ScanQuery {
        flags: ScanFlags::empty(),
        inverted: PageCategories::empty(),
        mask: PageCategories::PRESENT,
        any_of: PageCategories::empty(),
        report: PageCategories::PRESENT,
        max_pages: 0,
    };
    let mut found = [PageRegion::default(); 1];
    let mut faulted = Vec::new();
    for &page in order {
        let addr = base + page * 4096;
        let (regions, _) = pagemap.scan(addr, addr + 4096, &present, &mut found)?;
        let (ns, _) = timed_touch(base, 4096, &[page], Touch::Read);
        if regions == 0 {
            faulted.extend(ns);
        }
    }
    Ok(faulted)
}

/// Both ends of a link secured one way.
type Ends = (Security, Security);

/// The plaintext ends, and the TLS ends if asked for.
fn ends(tls: bool) -> Result<(Ends, Option<Ends>)> {
    let key: Security = Key::new(transport::key::nonce()?.to_vec())?.into();
    let psk = (key.clone(), key);
    if !tls {
        return Ok((psk, None));
    }
    let ca = Authority::new("uffdkit netbench")?;
    let names = ["localhost", "127.0.0.1"];
    let end = || -> Result<Security> { Ok(ca.config(&ca.issue(&names)?)?.into()) };
    Ok((psk, Some((end()?, end()?))))
}

/// One security's series: stream MiB/s and CPU ms per GiB per run, requested-page
/// latencies (ns).
#[derive(Default)]
struct Series {
    stream: Vec<f64>,
    cpu: Vec<f64>,
    idle: Vec<u32>,
    loaded: Vec<u32>,
}

impl Series {
    /// One run of each measurement over `ends`.
    fn run(&mut self, ends: &Ends, a: &NetArgs) -> Result<()> {
        let huge = a.huge_pages;
        let (t, _, cpu) = migration(ends, a.size, (true, 0), huge)?;
        self.stream
            .push(a.size as f64 / t.as_secs_f64() / f64::from(1u32 << 20));
        self.cpu.push(cpu);
        self.idle
            .extend(migration(ends, a.idle_size, (false, a.touches), huge)?.1);
        self.loaded
            .extend(migration(ends, a.size, (true, a.touches), huge)?.1);
        Ok(())
    }

    /// Median stream MiB/s and CPU ms per GiB, idle and loaded latency summaries (`None`:
    /// not measured — `--touches 0`, or no touched page was missing).
    fn figures(self) -> (f64, f64, Option<Summary>, Option<Summary>) {
        let wall = Duration::from_secs(1);
        let summary = |ns: Vec<u32>| (!ns.is_empty()).then(|| summarize(ns, wall));
        let (idle, loaded) = (summary(self.idle), summary(self.loaded));
        (median(self.stream), median(self.cpu), idle, loaded)
    }
}

/// A requested-page latency as JSON: `null` figures when not measured.
fn latency_json(s: &Option<Summary>) -> serde_json::Value {
    json!({
        "p50": s.map(|s| s.p50_us),
        "p99": s.map(|s| s.p99_us),
        "count": s.map_or(0, |s| s.count),
    })
}

/// `a`'s p50 over `b`'s, when both were measured.
fn p50_ratio(a: &Option<Summary>, b: &Option<Summary>) -> Option<f64> {
    Some(a.as_ref()?.p50_us / b.as_ref()?.p50_us)
}

/// Runs the benchmark.
pub fn run(a: &NetArgs) -> Result<()> {
    let rtt = round_trips(20_000, None)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The unpinned round trip's threads share a CPU or not, as the scheduler has it, and
    // the two cost very differently on a busy machine (3.8 vs 11 µs beside two busy
    // loops here): both, pinned, say which one the ratios' baseline was.
    let rtt_same = round_trips(20_000, Some([0, 0]))?;
    let rtt_cross = round_trips(20_000, Some([0, 1 % cpus]))?;
    let (plain_ends, tls_ends) = ends(a.tls.is_some())?;
    let mut raw_same = Vec::new();
    let mut raw_cross = Vec::new();
    let (mut plain, mut tls) = (Series::default(), Series::default());
    for _ in 0..a.repeat {
        raw_same.push(raw_tcp(a.size, 0)?);
        raw_cross.push(raw_tcp(a.size, 1 % cpus)?);
        plain.run(&plain_ends, a)?;
        if let Some(ends) = &tls_ends {
            tls.run(ends, a).context("over TLS")?;
        }
    }
    let split = |v: Vec<(f64, f64)>| -> (f64, f64) {
        let (rate, cpu): (Vec<f64>, Vec<f64>) = v.into_iter().unzip();
        (median(rate), median(cpu))
    };
    let ((same, same_cpu), (cross, cross_cpu)) = (split(raw_same), split(raw_cross));
    let (stream, stream_cpu, idle, loaded) = plain.figures();
    let tls = tls_ends.map(|_| tls.figures());
    let mut figures = json!({
        "placement": "unpinned, TCP loopback, destination per-CPU handlers",
        "huge_pages": a.huge_pages,
        "rtt_us": { "p50": rtt.p50_us, "p99": rtt.p99_us },
        "rtt_same_cpu_us": { "p50": rtt_same.p50_us, "p99": rtt_same.p99_us },
        "rtt_cross_cpu_us": { "p50": rtt_cross.p50_us, "p99": rtt_cross.p99_us },
        "raw_tcp_same_cpu_mib_s": same,
        "raw_tcp_cross_cpu_mib_s": cross,
        "stream_mib_s": stream,
        "stream_vs_raw_same_cpu": stream / same,
        "stream_vs_raw_cross_cpu": stream / cross,
        "cpu_ms_per_gib": {
            "raw_tcp_same_cpu": same_cpu,
            "raw_tcp_cross_cpu": cross_cpu,
            "stream": stream_cpu,
        },
        "requested_idle_us": latency_json(&idle),
        "requested_loaded_us": latency_json(&loaded),
        "idle_p50_vs_rtt": p50_ratio(&idle, &Some(rtt)),
        "loaded_p50_vs_rtt": p50_ratio(&loaded, &Some(rtt)),
    });
    if let Some((t_stream, t_cpu, t_idle, t_loaded)) = &tls {
        figures["tls"] = json!({
            "stream_mib_s": t_stream,
            "stream_cpu_ms_per_gib": t_cpu,
            "stream_vs_raw_same_cpu": t_stream / same,
            "stream_vs_raw_cross_cpu": t_stream / cross,
            "stream_vs_plaintext": t_stream / stream,
            "requested_idle_us": latency_json(t_idle),
            "requested_loaded_us": latency_json(t_loaded),
            "idle_p50_vs_plaintext": p50_ratio(t_idle, &idle),
            "loaded_p50_vs_plaintext": p50_ratio(t_loaded, &loaded),
        });
    }
    if a.json {
        println!("{figures}");
        return Ok(());
    }
    let landing = if a.huge_pages {
        "whole blocks moved in as huge pages"
    } else {
        "every page copied"
    };
    println!(
        "migrate netbench (TCP loopback, unpinned; medians of {} runs; same run; {landing}):",
        a.repeat
    );
    println!(
        "  frame round trip (PING/PONG)          p50 {:>8.1} µs  p99 {:>8.1} µs",
        rtt.p50_us, rtt.p99_us
    );
    println!(
        "    pinned: same CPU p50 {:.1} µs, across CPUs p50 {:.1} µs (the ratios below use the unpinned one)",
        rtt_same.p50_us, rtt_cross.p50_us
    );
    let latency = |what: &str, s: &Option<Summary>, extra: String| {
        match s {
        Some(s) => println!(
            "  requested page, {what:<23}p50 {:>8.1} µs  p99 {:>8.1} µs  ({:.1}× RTT, {} faults{extra})",
            s.p50_us,
            s.p99_us,
            s.p50_us / rtt.p50_us,
            s.count
        ),
        None => println!(
            "  requested page, {what:<23}not measured (no timed touch found its page missing; --touches {})",
            a.touches
        ),
    }
    };
    let demand = format!(", {} MiB demand-only", a.idle_size >> 20);
    latency("link idle", &idle, demand.clone());
    latency("stream saturating", &loaded, String::new());
    if let Some((_, _, t_idle, t_loaded)) = &tls {
        let vs = |t: &Option<Summary>, p: &Option<Summary>| {
            p50_ratio(t, p).map_or(String::new(), |r| format!(", {r:.2}× plaintext"))
        };
        latency(
            "TLS, link idle",
            t_idle,
            format!("{demand}{}", vs(t_idle, &idle)),
        );
        latency("TLS, stream saturating", t_loaded, vs(t_loaded, &loaded));
    }
    println!(
        "  raw TCP {same:.0} MiB/s pinned same CPU, {cross:.0} MiB/s pinned across CPUs; postcopy stream (unpinned, placed at the destination) {stream:.0} MiB/s = {:.0} % / {:.0} % of raw ({} MiB)",
        100.0 * stream / same,
        100.0 * stream / cross,
        a.size >> 20
    );
    if let Some((t_stream, ..)) = &tls {
        println!(
            "  postcopy stream over TLS 1.3 {t_stream:.0} MiB/s = {:.0} % / {:.0} % of raw, {:.0} % of plaintext",
            100.0 * t_stream / same,
            100.0 * t_stream / cross,
            100.0 * t_stream / stream
        );
    }
    let tls_cpu = tls
        .as_ref()
        .map_or(String::new(), |t| format!(", over TLS {:.0} ms", t.1));
    println!(
        "  CPU per GiB, both ends, every thread: raw TCP {same_cpu:.0} / {cross_cpu:.0} ms (same / across CPUs); stream {stream_cpu:.0} ms{tls_cpu} (RUN to the end, the digests included)"
    );
    Ok(())
}
