//! `uffdkit serve`: a page server many destinations restore one image from at once.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use pager::FileSource;
use postcopy::auth::Key;
use postcopy::net::Addr;
use postcopy::server::PageServer;

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
    let source = Arc::new(
        FileSource::mmap(&args.image).with_context(|| format!("open {}", args.image.display()))?,
    );
    let server = PageServer::bind(&addr, source, key).context("bind")?;
    eprintln!(
        "serve: {} on {:?}",
        args.image.display(),
        server.local_addr()?
    );
    server.run()?;
    Ok(())
}
