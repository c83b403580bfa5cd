//! `uffdkit snapshot chain`: a live base, incremental layers, and the same memory as a
//! full image, with the figures.

use super::*;

fn layer_json(k: u32, r: &LayerReport) -> serde_json::Value {
    json!({
        "layer": k, "chunks": r.push.chunks, "dirty_pages": r.dirty_pages, "dirty_chunks": r.dirty_chunks,
        "find_ms": r.find.as_secs_f64() * 1e3, "copy_ms": r.copy.as_secs_f64() * 1e3,
        "paused_ms": r.paused.as_secs_f64() * 1e3, "write_ms": r.write.as_secs_f64() * 1e3,
        "uploaded_bytes": r.push.uploaded_bytes, "inherited_chunks": r.push.inherited_chunks,
    })
}

pub(super) fn chain(args: &ChainArgs) -> Result<()> {
    let w = &args.workload;
    let (root, name) = args
        .url
        .rsplit_once('/')
        .filter(|(_, n)| !n.is_empty())
        .context("--url must end with the image's name")?;
    let layer_url = |k: u32| format!("{root}/{name}.{k}");
    let layer_name = |k: u32| {
        if k == 0 {
            name.to_owned()
        } else {
            format!("{name}.{k}")
        }
    };
    let map = w.region()?;
    let mut writers = w.writers(&map, false);
    std::thread::sleep(Duration::from_millis(500));
    let sink = Arc::new(scratch(&args.work_dir, "base", map.len() as u64)?);
    let base_raw = sink.path().to_owned();
    let live = take_live(&map, sink, None, 2, snapshot::DEFAULT_BATCH, true)?;
    let (mut chain, base, handover) =
        Chain::from_live(live, &mut writers).context("hand the memory over to dirty tracking")?;
    let options = chunked::PushOptions {
        page_size: map.page_size() as u32,
        chunk_size: args.chunk_kib * 1024,
        ..chunked::PushOptions::default()
    };
    let pushed = Instant::now();
    let base_push = chunked::push(&base_raw, &args.url, &options)
        .with_context(|| format!("push the base to {}", args.url))?;
    let base_push_time = pushed.elapsed();
    let _ = std::fs::remove_file(&base_raw);
    let mut layers = Vec::new();
    let mut writers = Some(writers);
    for k in 1..=args.layers {
        std::thread::sleep(Duration::from_secs_f64(args.interval));
        // The last layers are taken with the writers stopped, so that the reference and
        // the full image below hold exactly the last one's memory.
        if args.layers - k < args.still_layers {
            if let Some(w) = writers.take() {
                w.stop();
            }
        }
        let quiesce: &mut dyn Quiesce = match writers.as_mut() {
            Some(w) => w,
            None => &mut Stopped,
        };
        let r = chain
            .layer(
                &layer_url(k),
                &layer_name(k - 1),
                &chunked::StoreOptions::default(),
                quiesce,
            )
            .with_context(|| format!("layer {k}"))?;
        log::info!(
            "layer {k}: {} dirty pages in {} chunks, paused {:.1} ms, {} uploaded",
            r.dirty_pages,
            r.dirty_chunks,
            r.paused.as_secs_f64() * 1e3,
            units::bytes(r.push.uploaded_bytes)
        );
        layers.push(r);
    }
    // The same memory as one full image (no deduplication), to compare.
    let dumped = Instant::now();
    let sink = scratch(&args.work_dir, "full", map.len() as u64)?;
    let full_raw = sink.path().to_owned();
    // SAFETY: the writers are stopped; the mapping is ours.
    unsafe { snapshot::dump(&[region_of(&map)], &sink, 2) }.context("dump the full memory")?;
    let full_options = chunked::PushOptions {
        dedupe_with_store: false,
        ..options.clone()
    };
    let full = chunked::push(&full_raw, &format!("{root}/{name}.full"), &full_options)
        .context("push the full image")?;
    let full_time = dumped.elapsed();
    match &args.reference {
        Some(path) => std::fs::rename(&full_raw, path)
            .or_else(|_| std::fs::copy(&full_raw, path).map(drop))
            .with_context(|| format!("keep the reference at {}", path.display()))?,
        None => std::fs::remove_file(&full_raw).context("remove the scratch file")?,
    }
    let v = json!({
        "region_bytes": map.len(), "page_size": map.page_size(), "dirty_rate_mib": w.dirty_rate,
        "workload": w.workload, "chunk_size": args.chunk_kib * 1024, "interval_s": args.interval,
        "base": { "live": snapshot_json(&base), "handover_pause_ms": handover.as_secs_f64() * 1e3,
                  "push_ms": base_push_time.as_secs_f64() * 1e3, "uploaded_bytes": base_push.uploaded_bytes },
        "layers": layers.iter().zip(1..).map(|(r, k)| layer_json(k, r)).collect::<Vec<_>>(),
        "full": { "uploaded_bytes": full.uploaded_bytes, "ms": full_time.as_secs_f64() * 1e3 },
        "top": layer_url(args.layers),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("snapshot chain of {} at {}:", w.describe(), args.url);
    println!(
        "  base: live snapshot in {:.0} ms, hand-over to dirty tracking paused the workload {:.1} ms, pushed {} in {:.0} ms",
        base.elapsed.as_secs_f64() * 1e3,
        handover.as_secs_f64() * 1e3,
        units::bytes(base_push.uploaded_bytes),
        base_push_time.as_secs_f64() * 1e3
    );
    for (r, k) in layers.iter().zip(1..) {
        println!(
            "  layer {k}: {} dirty pages in {} of {} chunks; paused {:.1} ms (find {:.1} ms, copy {:.1} ms); written in {:.0} ms, {} stored",
            r.dirty_pages,
            r.dirty_chunks,
            r.push.chunks,
            r.paused.as_secs_f64() * 1e3,
            r.find.as_secs_f64() * 1e3,
            r.copy.as_secs_f64() * 1e3,
            r.write.as_secs_f64() * 1e3,
            units::bytes(r.push.uploaded_bytes)
        );
    }
    println!(
        "  the same memory as a full image: {} stored in {:.0} ms",
        units::bytes(full.uploaded_bytes),
        full_time.as_secs_f64() * 1e3
    );
    println!("  top of the chain: {}", layer_url(args.layers));
    Ok(())
}

/// A new scratch file of `len` bytes in `dir` (shared, like `/var/tmp`): 0600, an
/// unguessable name, `O_EXCL` — never a name another user could plant a link at.
fn scratch(dir: &Path, what: &str, len: u64) -> Result<FileSink> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let (file, path) =
        uffd_core::private_fs::create_temp_in(dir, &format!("uffdkit-snapshot-{what}."))
            .with_context(|| format!("create a scratch file in {}", dir.display()))?;
    Ok(FileSink::from_file(file, path, len)?)
}
