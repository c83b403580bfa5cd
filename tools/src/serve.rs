//! `uffdkit serve`: a page server many destinations restore one image from at once.
//!
//! The image is read with `pread(2)`, never through a mapping: the server reads every
//! byte it sends (the frames' checksums), and a file truncated under it would raise SIGBUS
//! there for the pages it lost — the server died, and its clients, cut off, gave up only
//! at their bound. A read that fails (the file shrank, an I/O error) breaks the image
//! ([`Image`]): every read after it fails too, so each client is told why (a SHUT naming
//! the cause: it fails its restore at once instead of reconnecting), and once no client
//! has come for a while the server exits 1 saying so.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pager::{Fetched, FileSource, Source, SourceError};
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
    let image = Arc::new(Image::new(
        FileSource::pread(&args.image).with_context(|| format!("open {}", args.image.display()))?,
    ));
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
        || PageServer::bind_with(&addr, image.clone(), security, opts),
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
    let cause = progress::track(module_path!(), "serve", status, || image.wait_broken());
    // Each session tells its client why as its next read fails. A client that took the
    // end of its pair for a break (the SHUT behind the pages on its way) reconnects, and
    // its new session tells it at once: serve on until no session came for a while.
    let (quiet, until) = (2 * silence, Instant::now() + 10 * silence);
    let mut idle_since = Instant::now();
    while Instant::now() < until {
        if server.stats().sessions > 0 {
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= quiet {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!(
        "{} can no longer be served (its clients were told): {cause}",
        args.image.display()
    )
}

/// The image as served: its reads, and the first that failed, after which every read
/// fails (see the module docs).
struct Image {
    file: FileSource,
    /// Why the image broke (the first failed read, with its cause), once it did.
    broken: Mutex<Option<String>>,
    changed: Condvar,
}

impl Image {
    fn new(file: FileSource) -> Image {
        Image {
            file,
            broken: Mutex::new(None),
            changed: Condvar::new(),
        }
    }

    /// Blocks until a read fails; returns why.
    fn wait_broken(&self) -> String {
        let mut broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(cause) = &*broken {
                return cause.clone();
            }
            broken = self.changed.wait(broken).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Source for Image {
    fn len(&self) -> u64 {
        self.file.len()
    }

    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let broken = || self.broken.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cause) = &*broken() {
            return Err(SourceError {
                what: "read image (an earlier read failed)",
                offset,
                source: std::io::Error::other(cause.clone()),
            });
        }
        self.file.fetch(offset, scratch).inspect_err(|e| {
            broken().get_or_insert_with(|| format!("{e}: {}", e.source));
            self.changed.notify_all();
        })
    }
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
