//! `uffdkit serve`: a page server many destinations restore one image from at once.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pager::{FileSource, Source};
use postcopy::server::{PageServer, ServerOptions};
use postcopy::Timing;
use transport::Addr;

use crate::link_args::{raise_open_files, AdmissionArgs, SecurityArgs, SECURITY_HELP};
use crate::progress::{self, Status};
use crate::units;

/// Options of `uffdkit serve`.
#[derive(clap::Args, Debug)]
#[command(after_help = SECURITY_HELP)]
pub struct Args {
    /// The memory image to serve.
    #[arg(long)]
    image: PathBuf,
    /// Where to listen: host:port (loopback unless told otherwise) or unix:/path. The
    /// bound address is printed on stdout as `LISTEN <addr>`.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: String,
    /// TLS certificates, or a pre-shared key (trusted links only).
    #[command(flatten)]
    security: SecurityArgs,
    /// Bounds on what strangers may hold.
    #[command(flatten)]
    admission: AdmissionArgs,
    /// A client connection that brings nothing for this many seconds (heartbeats are
    /// sent every sixth of it) is closed; the client reconnects and resumes.
    #[arg(long, default_value_t = 3.0)]
    silence: f64,
    /// The page size served: the guest memory's (4096, or 2097152 for a hugepage-backed
    /// guest); clients refuse regions of another size.
    #[arg(long, default_value_t = 4096, value_parser = parse_page_size)]
    page_size: usize,
}

/// `--page-size`: one of the sizes a pager places.
fn parse_page_size(text: &str) -> Result<usize, String> {
    text.parse()
        .ok()
        .filter(|s| postcopy::server::PAGE_SIZES.contains(s))
        .ok_or_else(|| format!("{text}: the page size must be 4096 or 2097152"))
}

/// Runs `uffdkit serve` until killed.
pub fn run(args: &Args) -> Result<()> {
    let security = args.security.security()?;
    let admission = args.admission.admission()?;
    let addr: Addr = args.listen.parse()?;
    let socket_file = crate::signals::remove_socket_on_termination(&addr)?;
    let silence = Duration::try_from_secs_f64(args.silence)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--silence must be a positive number of seconds")?;
    let timing = Timing {
        silence,
        heartbeat: silence / 6,
        ..Timing::default()
    };
    // A regular file, checked without blocking: a FIFO at the path would hang the open.
    let file = uffd_core::private_fs::open_regular(&args.image, false)
        .with_context(|| format!("open {}", args.image.display()))?;
    let id = identity(&file).with_context(|| format!("stat {}", args.image.display()))?;
    let image =
        FileSource::mmap(&args.image).with_context(|| format!("open {}", args.image.display()))?;
    let len = image.len();
    let open_files = raise_open_files();
    let opts = ServerOptions {
        timing,
        admission,
        page_size: args.page_size,
        image: Some(id),
    };
    let kind = security.kind();
    let server = socket_file.bind(
        || PageServer::bind_with(&addr, std::sync::Arc::new(image), security, opts),
        PageServer::socket_file,
    )?;
    let bound = server.local_addr()?;
    log::info!(
        "{} ({}) on {bound}, {kind}; at most {} handshakes ({:?} each) and {} clients at once, {open_files} open files",
        args.image.display(),
        units::bytes(len),
        admission.max_handshakes,
        admission.handshake_deadline,
        admission.max_sessions,
    );
    // For scripts (and port 0): the address, first thing on stdout.
    println!("LISTEN {bound}");
    std::io::Write::flush(&mut std::io::stdout())?;
    let started = Instant::now();
    let status = || {
        let s = server.stats();
        let bytes = s.pages_sent * args.page_size as u64;
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        Status {
            phase: String::new(),
            fraction: None,
            text: format!(
                "sent {}, {}/s; {} connection pairs, {} requests, {} zero pages, {} superseded{}",
                units::bytes(bytes),
                units::bytes((bytes as f64 / secs) as u64),
                s.pairs,
                s.requests,
                s.zero_pages_sent,
                s.superseded,
                strangers(&s)
            ),
        }
    };
    progress::track(module_path!(), "serve", status, || server.serve_forever())
}

/// What strangers cost the server, when they cost anything: connections in their
/// handshake, and those not admitted, by why.
fn strangers(s: &postcopy::server::ServerStats) -> String {
    if s.handshaking + s.refused + s.timed_out + s.evicted + s.busy == 0 {
        return String::new();
    }
    format!(
        "; {} in handshake, {} refused, {} timed out, {} evicted, {} busy",
        s.handshaking, s.refused, s.timed_out, s.evicted, s.busy
    )
}

/// The image file's identity for ADVISE (`ServerOptions::image`): its device, inode, size
/// and modification time, hashed. A client that lost its connection resumes against this
/// server restarted on the same unchanged file, and is refused by one serving another
/// file, or this one rewritten (std's hasher: stable for one build of uffdkit; a server
/// of another build is, at worst, refused as another image).
fn identity(file: &std::fs::File) -> std::io::Result<u64> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()).hash(&mut h);
    Ok(h.finish())
}
