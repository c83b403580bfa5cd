//! `uffdkit image push|pull|inspect|merge`: chunked, content-addressed images in an object
//! store (and layers of them), and the one hook the serving commands share to open one as
//! a pager source ([`open_source`]). `merge` also folds a Firecracker diff-snapshot chain
//! into one memory file, as `rebase-snap` does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chunked::{
    Background, Chunk, ChunkCache, ChunkedSource, Image, PushOptions, RetryPolicy, SourceOptions,
    StoreOptions,
};
use serde_json::json;

/// `uffdkit image` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Args {
    /// Chunk a raw memory file, upload the chunks the store lacks, write the manifest,
    /// and print the dedupe ratio.
    Push(PushArgs),
    /// Download an image into a raw file (zero chunks as holes), every chunk verified.
    Pull(PullArgs),
    /// Show an image's manifest (and, for a layer, its chain).
    Inspect(InspectArgs),
    /// Fold a chain into one image: a layer's chain into a plain image beside it (a
    /// manifest only, no chunk data copied) or into a raw file; or a Firecracker memory
    /// file and its diff snapshots into one memory file (what rebase-snap makes).
    Merge(MergeArgs),
}

/// How much an image may declare, as a command-line option.
#[derive(clap::Args, Debug, Clone)]
pub struct BoundArgs {
    /// The longest image accepted (K, M, G suffixes). A manifest declaring more — or more
    /// chunks than one per 256 KiB of it — is refused before anything is allocated for it:
    /// a manifest is input from a store others may write.
    #[arg(long, value_name = "SIZE", default_value = "1024G", value_parser = crate::migrate::parse_size)]
    pub max_image: usize,
}

impl BoundArgs {
    /// Store options carrying the bound.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            max_image: self.max_image as u64,
            ..StoreOptions::default()
        }
    }
}

/// The host chunk cache, as command-line options.
#[derive(clap::Args, Debug, Clone)]
pub struct CacheArgs {
    /// The host's shared chunk cache directory [default: /var/cache/uffdkit for root,
    /// $XDG_CACHE_HOME/uffdkit or ~/.cache/uffdkit otherwise]. It must be ours: a
    /// directory another user owns or can write (or one on such a path) is refused.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Bound of the cache in MiB (least recently used chunks go first).
    #[arg(long, default_value_t = 8192)]
    pub cache_mib: u64,
    /// Do not use a cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Empty the cache first (a cold restore on a fresh host).
    #[arg(long)]
    pub cold_cache: bool,
}

impl CacheArgs {
    /// Opens the cache as asked (emptied first with `--cold-cache`).
    pub fn open(&self) -> Result<Option<Arc<ChunkCache>>> {
        if self.no_cache {
            return Ok(None);
        }
        let dir = match &self.cache {
            Some(dir) => dir.clone(),
            None => ChunkCache::default_dir()
                .context("no cache directory: give --cache DIR (or --no-cache), or set HOME")?,
        };
        let cache = ChunkCache::open(&dir, self.cache_mib << 20)
            .with_context(|| format!("open the chunk cache {}", dir.display()))?;
        if self.cold_cache {
            // Through the checked cache, never by a path another user could redirect.
            cache
                .clear()
                .with_context(|| format!("empty the cache {}", dir.display()))?;
        }
        Ok(Some(Arc::new(cache)))
    }
}

/// Options of `uffdkit image push`.
#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// The raw memory file.
    file: PathBuf,
    /// Where the image goes: s3://bucket/dir/NAME, gs://…, az://…, file:///dir/NAME.
    url: String,
    /// Chunk size in KiB (a multiple of the page size).
    #[arg(long, default_value_t = chunked::DEFAULT_CHUNK_SIZE / 1024)]
    chunk_kib: u32,
    /// Page size of the memory the image is for.
    #[arg(long, default_value_t = 4096)]
    page_size: u32,
    /// Do not deduplicate against the other images in the store root.
    #[arg(long)]
    no_dedupe: bool,
    /// Push as a layer over this image of the same store root (its name): chunks equal to
    /// the parent's are inherited, not stored; page and chunk size are the parent's.
    #[arg(long, value_name = "NAME")]
    parent: Option<String>,
    /// With --parent, what a sparse FILE's holes mean: inherit (unchanged since the
    /// parent: a Firecracker diff snapshot) or zero (a full memory file copied sparse).
    /// A sparse layer without it is refused.
    #[arg(long, requires = "parent", value_parser = ["inherit", "zero"])]
    holes: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Options of `uffdkit image merge`.
#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// A layer's URL; or a Firecracker memory file followed by its diff snapshots, oldest
    /// first.
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<String>,
    /// Where the merged image goes: a URL in the layer's store root, or a raw file.
    #[arg(long, short)]
    out: String,
}

/// Options of `uffdkit image pull`.
#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// The image.
    url: String,
    /// The raw file to write.
    file: PathBuf,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    bound: BoundArgs,
    /// Ranged reads in flight.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Give up on a chunk after this many seconds of failed attempts (or of waiting for
    /// another process fetching it).
    #[arg(long, default_value_t = 60)]
    retry_secs: u64,
}

/// Options of `uffdkit image inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The image.
    url: String,
    /// List every chunk.
    #[arg(long)]
    chunks: bool,
    #[command(flatten)]
    bound: BoundArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `uffdkit image …`.
pub fn run(args: &Args) -> Result<()> {
    match args {
        Args::Push(a) => push(a),
        Args::Pull(a) => pull(a),
        Args::Inspect(a) => inspect(a),
        Args::Merge(a) => merge(a),
    }
}

fn push(args: &PushArgs) -> Result<()> {
    let options = PushOptions {
        page_size: args.page_size,
        chunk_size: args.chunk_kib * 1024,
        dedupe_with_store: !args.no_dedupe,
        parent: args.parent.clone(),
        holes: match args.holes.as_deref() {
            Some("inherit") => chunked::Holes::Inherit,
            Some(_) => chunked::Holes::Zero,
            None => chunked::Holes::Refuse,
        },
        ..PushOptions::default()
    };
    let started = Instant::now();
    let r = chunked::push(&args.file, &args.url, &options)
        .with_context(|| format!("push {} to {}", args.file.display(), args.url))?;
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "url": args.url, "chunks": r.chunks, "zero_chunks": r.zero_chunks,
                "repeated_chunks": r.repeated_chunks, "existing_chunks": r.existing_chunks,
                "new_chunks": r.new_chunks, "inherited_chunks": r.inherited_chunks,
                "data_bytes": r.data_bytes,
                "uploaded_bytes": r.uploaded_bytes, "dedupe_ratio": r.dedupe_ratio(),
                "manifests_indexed": r.manifests_indexed, "seconds": secs,
            }))?
        );
        return Ok(());
    }
    if let Some(parent) = &args.parent {
        println!(
            "layer over {parent}: {} of {} chunks unchanged (inherited, not stored)",
            r.inherited_chunks, r.chunks
        );
    }
    println!(
        "pushed {} to {} in {:.2} s: {} chunks of {} KiB — {} zero (not stored), {} repeated within the image, \
         {} already in the store ({} images indexed), {} new ({} MiB uploaded); dedupe ratio {:.2}",
        args.file.display(),
        args.url,
        secs,
        r.chunks,
        r.manifest.geometry().chunk_size / 1024,
        r.zero_chunks,
        r.repeated_chunks,
        r.existing_chunks,
        r.manifests_indexed,
        r.new_chunks,
        r.uploaded_bytes >> 20,
        r.dedupe_ratio()
    );
    Ok(())
}

fn pull(args: &PullArgs) -> Result<()> {
    // Before any thread: an interrupted pull leaves no file that looks whole.
    crate::partial::remove_on_termination()?;
    let started = Instant::now();
    let image = Image::open(&args.url, &args.bound.store_options())?;
    let (file, out) = crate::partial::PartialOutput::create(&args.file)?;
    let r = image.pull_into(
        file,
        out.temp_path(),
        args.cache.open()?,
        RetryPolicy::within(Duration::from_secs(args.retry_secs)),
        args.in_flight,
    )?;
    out.commit()?;
    println!(
        "pulled {} to {} in {:.2} s: {} MiB, {} chunks fetched in {} reads ({} MiB), {} from the cache, \
         {} overtaken from a stalled peer",
        args.url,
        args.file.display(),
        started.elapsed().as_secs_f64(),
        r.bytes >> 20,
        r.fetch.chunks_fetched,
        r.fetch.reads,
        r.fetch.bytes_fetched >> 20,
        r.fetch.cache_hits,
        r.fetch.overtaken
    );
    Ok(())
}

fn inspect(args: &InspectArgs) -> Result<()> {
    let image = Image::open(&args.url, &args.bound.store_options())?;
    let m = image.manifest();
    let g = m.geometry();
    let mut data = 0u64;
    let mut zero = 0u64;
    let mut inherited = 0u64;
    let mut unique = std::collections::HashSet::new();
    for c in m.chunks() {
        match c {
            Chunk::Data { digest, .. } => {
                data += 1;
                unique.insert(*digest);
            }
            Chunk::Zero => zero += 1,
            Chunk::Inherited => inherited += 1,
        }
    }
    let chunks: Vec<serde_json::Value> = if args.chunks {
        m.chunks()
            .iter()
            .enumerate()
            .map(|(i, c)| match c {
                Chunk::Data {
                    digest,
                    pack,
                    offset,
                } => json!({"index": i, "kind": "data", "digest": digest.to_hex(),
                            "pack": m.packs()[*pack as usize].to_hex(), "offset": offset}),
                Chunk::Zero => json!({"index": i, "kind": "zero"}),
                Chunk::Inherited => json!({"index": i, "kind": "inherited"}),
            })
            .collect()
    } else {
        Vec::new()
    };
    let v = json!({
        "url": args.url, "version": chunked::manifest::VERSION, "hash": m.hash_algorithm().name(),
        "digest": m.digest().to_hex(), "page_size": g.page_size, "chunk_size": g.chunk_size,
        "length": g.len, "chunks": m.chunks().len(), "data_chunks": data, "zero_chunks": zero,
        "unique_chunks": unique.len(), "packs": m.packs().iter().map(|p| p.to_hex()).collect::<Vec<_>>(),
        "parent": m.parent().map(|p| json!({"name": p.name, "digest": p.digest.to_hex()})),
        "inherited_chunks": inherited,
        "chain": image.chain().layers().iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
    });
    if args.json {
        let mut v = v;
        if args.chunks {
            v["chunk_list"] = chunks.into();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{}\n  manifest v{} ({} {})\n  {} bytes in {} chunks of {} KiB, {} KiB pages\n  {} data ({} unique), {} zero\n  {} pack(s)",
        args.url,
        chunked::manifest::VERSION,
        m.hash_algorithm().name(),
        m.digest(),
        g.len,
        m.chunks().len(),
        g.chunk_size / 1024,
        g.page_size / 1024,
        data,
        unique.len(),
        zero,
        m.packs().len()
    );
    if let Some(p) = m.parent() {
        let names: Vec<&str> = image
            .chain()
            .layers()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        println!(
            "  a layer over {} ({}): {inherited} chunks inherited; chain of {}: {}",
            p.name,
            p.digest,
            names.len(),
            names.join(" → ")
        );
    }
    for c in &chunks {
        println!("  {c}");
    }
    Ok(())
}

fn merge(args: &MergeArgs) -> Result<()> {
    let started = Instant::now();
    let out_is_url = is_url(&args.out);
    match args.inputs.as_slice() {
        [url] if is_url(url) => {
            if out_is_url {
                let m = chunked::merge(url, &args.out, &StoreOptions::default())
                    .with_context(|| format!("merge {url} into {}", args.out))?;
                println!(
                    "merged {url} into {} in {:.2} s: a manifest of {} chunks naming {} pack(s), no chunk data copied",
                    args.out,
                    started.elapsed().as_secs_f64(),
                    m.chunks().len(),
                    m.packs().len()
                );
            } else {
                let image = Image::open(url, &StoreOptions::default())
                    .with_context(|| format!("open {url}"))?;
                let r = image.pull(
                    std::path::Path::new(&args.out),
                    None,
                    RetryPolicy::default(),
                    16,
                )?;
                println!(
                    "merged {url} (a chain of {}) into {} in {:.2} s: {} MiB",
                    image.chain().depth(),
                    args.out,
                    started.elapsed().as_secs_f64(),
                    r.bytes >> 20
                );
            }
        }
        [base, diffs @ ..] if !args.inputs.iter().any(|i| is_url(i)) => {
            if out_is_url {
                return Err(crate::exit::usage(
                    "a Firecracker chain merges into a file; push that file to store it",
                ));
            }
            let diffs: Vec<PathBuf> = diffs.iter().map(PathBuf::from).collect();
            let source = snapshot::LayeredSource::open(base, &diffs)
                .with_context(|| format!("open the chain of {base}"))?;
            let r = source.merge_into(std::path::Path::new(&args.out))?;
            println!(
                "merged {base} and {} diff(s) into {} in {:.2} s: {} of data in {} extents, the rest holes",
                diffs.len(),
                args.out,
                started.elapsed().as_secs_f64(),
                crate::units::bytes(r.data_bytes),
                r.extents
            );
        }
        _ => {
            return Err(crate::exit::usage(
                "give one image URL, or a memory file and its diff files (no URLs among them)",
            ))
        }
    }
    Ok(())
}

/// Whether an `--image` argument names a chunked image in a store (a URL) rather than a
/// local file.
pub fn is_url(image: &str) -> bool {
    image.contains("://")
}

/// Tuning of a chunked source from the command line.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    /// Chunks fetched at once, at most.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// Give up on a chunk after this many seconds of failed attempts.
    #[arg(long, default_value_t = 60)]
    pub retry_secs: u64,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub bound: BoundArgs,
}

impl SourceArgs {
    /// The source options, with `background` as the plan.
    pub fn options(&self, background: Background) -> SourceOptions {
        SourceOptions {
            max_in_flight: self.in_flight.max(1),
            reserved_for_faults: (self.in_flight / 4).max(1),
            background,
            // A VMM touches memory first; the background plan starts at its first fault.
            background_after_first_fault: true,
            // One bound, the user's: the attempts follow from it.
            retry: RetryPolicy::within(Duration::from_secs(self.retry_secs)),
            ..SourceOptions::default()
        }
    }
}

/// Opens the chunked image at `url` as a pager source through the host cache: the hook
/// `restore --image URL` and `fc-handler --image URL` share.
pub fn open_source(
    url: &str,
    args: &SourceArgs,
    background: Background,
) -> Result<Arc<ChunkedSource>> {
    let image = Image::open(url, &args.bound.store_options())
        .with_context(|| format!("open image {url}"))?;
    let source = image.source(args.cache.open()?, args.options(background))?;
    Ok(Arc::new(source))
}
