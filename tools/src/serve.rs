//! `uffdkit serve`: a page server many destinations restore one image from at once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use pager::{Fetched, FileSource, Source, SourceError};
use postcopy::auth::Key;
use postcopy::net::Addr;
use postcopy::server::PageServer;

use crate::progress::{self, Status};
use crate::units;

/// Options of `uffdkit serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The memory image to serve.
    #[arg(long)]
    image: PathBuf,
    /// Where to listen: host:port (loopback unless told otherwise) or unix:/path.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: String,
    /// File holding the pre-shared key (at least 16 bytes) every client must prove.
    #[arg(long)]
    key_file: PathBuf,
}

/// Runs `uffdkit serve` until killed.
pub fn run(args: &Args) -> Result<()> {
    let key = Key::from_file(&args.key_file).context("read the key file")?;
    let addr: Addr = args.listen.parse()?;
    let image =
        FileSource::mmap(&args.image).with_context(|| format!("open {}", args.image.display()))?;
    let source = Arc::new(Counted {
        inner: image,
        reads: AtomicU64::default(),
        bytes: AtomicU64::default(),
    });
    let server = PageServer::bind(&addr, source.clone(), key).context("bind")?;
    log::info!(
        "{} ({}) on {:?}",
        args.image.display(),
        units::bytes(source.len()),
        server.local_addr()?
    );
    let started = Instant::now();
    let status = || {
        let bytes = source.bytes.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        Status {
            phase: String::new(),
            fraction: None,
            text: format!(
                "sent {}, {} image reads, {}/s on average",
                units::bytes(bytes),
                source.reads.load(Ordering::Relaxed),
                units::bytes((bytes as f64 / secs) as u64)
            ),
        }
    };
    progress::track(module_path!(), "serve", status, || server.run())?;
    Ok(())
}

/// The image, counting what clients read of it (the server's own counters are not
/// reachable while it runs on this thread).
struct Counted {
    inner: FileSource,
    reads: AtomicU64,
    bytes: AtomicU64,
}

impl Source for Counted {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let fetched = self.inner.fetch(offset, scratch)?;
        if let Fetched::Data(data) = &fetched {
            // Relaxed: statistics only.
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Ok(fetched)
    }
    fn zero_ranges(&self) -> Vec<std::ops::Range<u64>> {
        self.inner.zero_ranges()
    }
    fn is_signal_safe(&self) -> bool {
        self.inner.is_signal_safe()
    }
}
