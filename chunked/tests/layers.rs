//! Layers: images that name a parent and hold only their changed chunks. Written with
//! `ImageWriter` and `push --parent`, resolved and flattened at open, served lazily to a
//! real pager straight from the chain, merged without copying chunk data, and refused
//! when malformed (a missing or replaced parent, a different geometry, a chain too deep).

use crate::common;

use std::sync::Arc;

use chunked::{
    Chain, ChainError, Chunk, Error, Image, ImageWriter, Manifest, Parent, PushOptions,
    SourceOptions, StoreOptions, MAX_CHAIN_DEPTH,
};
use pager::{DeliveryMode, Pager, Prefetch};
use testkit::s3::S3Server;

use common::TempDir;
use uffd_core::{Features, Mapping, MemoryKind, Uffd};

const PS: usize = 4096;
const CHUNK: u32 = 64 << 10;

/// Fills `page` with a pattern of (generation, page index); generation 0 of every 5th page
/// is zero.
fn fill(page: &mut [u8], generation: u64, index: usize) {
    if generation == 0 && index % 5 == 4 {
        page.fill(0);
        return;
    }
    let seed = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (generation << 48);
    for (w, c) in page.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(seed ^ w as u64).to_ne_bytes());
    }
}

fn base_image(pages: usize, page_size: usize) -> Vec<u8> {
    let mut out = vec![0u8; pages * page_size];
    for (i, p) in out.chunks_exact_mut(page_size).enumerate() {
        fill(p, 0, i);
    }
    out
}

/// What one layer changes: pages rewritten with its generation's pattern, pages zeroed,
/// and chunks handed to the writer although nothing in them changed.
struct Change {
    rewritten: Vec<usize>,
    zeroed: Vec<usize>,
    untouched_chunks: Vec<usize>,
}

/// Applies `change` to `memory` and writes it as layer `name` over `parent`, handing the
/// writer only the chunks holding changed pages (and the untouched ones named).
fn write_layer(
    store: &TempDir,
    name: &str,
    parent: &str,
    memory: &mut [u8],
    page_size: usize,
    generation: u64,
    change: &Change,
) -> chunked::PushReport {
    let options = PushOptions {
        parent: Some(parent.to_owned()),
        ..PushOptions::default()
    };
    let mut writer =
        ImageWriter::create(&store.url(name), memory.len() as u64, &options).expect("create layer");
    let g = writer.geometry();
    let mut chunks: std::collections::BTreeSet<usize> =
        change.untouched_chunks.iter().copied().collect();
    for (&p, zero) in change
        .rewritten
        .iter()
        .map(|p| (p, false))
        .chain(change.zeroed.iter().map(|p| (p, true)))
    {
        let page = &mut memory[p * page_size..(p + 1) * page_size];
        if zero {
            page.fill(0);
        } else {
            fill(page, generation, p);
        }
        chunks.insert(g.chunk_of((p * page_size) as u64));
    }
    for c in chunks {
        let r = g.chunk_range(c);
        writer
            .write_chunk(c, &memory[r.start as usize..r.end as usize])
            .expect("write chunk");
    }
    writer.finish().expect("finish layer")
}

/// Pushes `memory` as base image `name`.
fn push_base(store: &TempDir, name: &str, memory: &[u8], page_size: u32, chunk: u32) {
    let raw = store.path(&format!("{name}.raw"));
    std::fs::write(&raw, memory).unwrap();
    let options = PushOptions {
        page_size,
        chunk_size: chunk,
        ..PushOptions::default()
    };
    chunked::push(&raw, &store.url(name), &options).expect("push base");
    std::fs::remove_file(raw).unwrap();
}

/// Restores the image at `url` into fresh memory of `kind` through a pager, touching every
/// page from two threads, and asserts that the memory is `want` (`what` says why).
fn assert_restores(url: &str, options: &StoreOptions, kind: MemoryKind, want: &[u8], what: &str) {
    let len = want.len();
    let image = Image::open(url, options).expect("open");
    let source = Arc::new(
        image
            .source(None, SourceOptions::default())
            .expect("source"),
    );
    let memory = Arc::new(Mapping::new(kind, len).unwrap());
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_REMOVE)
        .optional(Features::MISSING_HUGETLBFS)
        .open()
        .unwrap();
    let pager = Pager::builder(uffd, source)
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::Thread)
        .prefetch(Prefetch::None)
        .start()
        .expect("start pager");
    let ps = kind.page_size();
    let pages = len / ps;
    let halves: Vec<_> = [false, true]
        .into_iter()
        .map(|rev| {
            let addr = memory.addr();
            std::thread::spawn(move || {
                let order: Vec<usize> = if rev {
                    (pages / 2..pages).rev().collect()
                } else {
                    (0..pages / 2).collect()
                };
                for p in order {
                    // SAFETY: the mapping outlives the joined thread; the pager serves it.
                    unsafe { std::ptr::read_volatile((addr + p * ps) as *const u8) };
                }
            })
        })
        .collect();
    for h in halves {
        h.join().unwrap();
    }
    // SAFETY: every page was faulted in above.
    let got = unsafe { std::slice::from_raw_parts(memory.as_ptr(), len) }.to_vec();
    pager.stop().expect("stop");
    assert!(got == want, "{url}: {what}");
}

#[test]
fn a_five_layer_chain_is_served_lazily_byte_for_byte_and_stores_only_changes() {
    let store = TempDir::new("five");
    let pages = 512; // 2 MiB, 32 chunks of 64 KiB
    let per_chunk = CHUNK as usize / PS;
    let mut memory = base_image(pages, PS);
    push_base(&store, "vm", &memory, PS as u32, CHUNK);
    let mut states = vec![memory.clone()];
    for layer in 1..=5usize {
        let change = Change {
            rewritten: (0..6).map(|k| (k * 97 + layer * 31) % pages).collect(),
            zeroed: vec![(layer * 53 + 3) % pages],
            untouched_chunks: vec![31],
        };
        let parent = if layer == 1 {
            "vm".to_owned()
        } else {
            format!("vm.{}", layer - 1)
        };
        let before = memory.clone();
        let r = write_layer(
            &store,
            &format!("vm.{layer}"),
            &parent,
            &mut memory,
            PS,
            layer as u64,
            &change,
        );
        let changed = (0..32)
            .filter(|c| {
                before[c * CHUNK as usize..(c + 1) * CHUNK as usize]
                    != memory[c * CHUNK as usize..(c + 1) * CHUNK as usize]
            })
            .count();
        assert!(changed > 0 && !change.rewritten.iter().any(|p| p / per_chunk == 31));
        assert_eq!(
            r.inherited_chunks as usize,
            32 - changed,
            "layer {layer}: unchanged chunks (the untouched one handed in too) are inherited"
        );
        assert_eq!(
            r.manifest.parent().map(|p| p.name.as_str()),
            Some(parent.as_str())
        );
        assert!(
            r.uploaded_bytes <= (changed * CHUNK as usize) as u64,
            "layer {layer}: only changed chunks stored"
        );
        states.push(memory.clone());
    }
    let top = Image::open(&store.url("vm.5"), &StoreOptions::default()).expect("open top");
    assert_eq!(top.chain().depth(), 6, "the base and five layers");
    let flat = top.flattened();
    assert!(flat.parent().is_none());
    assert!(!flat.chunks().contains(&Chunk::Inherited));
    for (layer, want) in states.iter().enumerate() {
        let name = if layer == 0 {
            "vm".to_owned()
        } else {
            format!("vm.{layer}")
        };
        assert_restores(
            &store.url(&name),
            &StoreOptions::default(),
            MemoryKind::Anon,
            want,
            "a layer restores its own instant byte for byte",
        );
    }
}

#[test]
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn a_chain_of_two_mib_pages_restores_into_hugetlb_memory() {
    if !testkit::hugepages::available("a_chain_of_two_mib_pages_restores_into_hugetlb_memory", 8) {
        return;
    }
    const HUGE: usize = 2 << 20;
    let store = TempDir::new("huge");
    let pages = 4; // 8 MiB: four 2 MiB pages, one chunk each
    let mut memory = base_image(pages, HUGE);
    push_base(&store, "vm", &memory, HUGE as u32, HUGE as u32);
    for layer in 1..=5usize {
        let parent = if layer == 1 {
            "vm".to_owned()
        } else {
            format!("vm.{}", layer - 1)
        };
        let change = Change {
            rewritten: vec![layer % pages],
            zeroed: if layer == 3 { vec![0] } else { vec![] },
            untouched_chunks: vec![],
        };
        let r = write_layer(
            &store,
            &format!("vm.{layer}"),
            &parent,
            &mut memory,
            HUGE,
            layer as u64,
            &change,
        );
        assert_eq!(
            r.manifest.geometry().page_size,
            HUGE as u32,
            "a layer takes its parent's geometry"
        );
    }
    assert_restores(
        &store.url("vm.5"),
        &StoreOptions::default(),
        MemoryKind::HugetlbPrivate,
        &memory,
        "five layers of 2 MiB pages restore byte for byte",
    );
}

#[test]
fn merge_flattens_a_chain_without_copying_chunk_data_and_pull_writes_it_raw() {
    let store = TempDir::new("merge");
    let pages = 256;
    let mut memory = base_image(pages, PS);
    push_base(&store, "vm", &memory, PS as u32, CHUNK);
    for layer in 1..=3usize {
        let parent = if layer == 1 {
            "vm".to_owned()
        } else {
            format!("vm.{}", layer - 1)
        };
        let change = Change {
            rewritten: vec![layer * 40, layer * 40 + 1],
            zeroed: vec![layer],
            untouched_chunks: vec![],
        };
        write_layer(
            &store,
            &format!("vm.{layer}"),
            &parent,
            &mut memory,
            PS,
            layer as u64,
            &change,
        );
    }
    let packs_before = std::fs::read_dir(store.path("packs")).unwrap().count();
    let merged = chunked::merge(
        &store.url("vm.3"),
        &store.url("flat"),
        &StoreOptions::default(),
    )
    .expect("merge");
    assert!(merged.parent().is_none());
    assert_eq!(
        std::fs::read_dir(store.path("packs")).unwrap().count(),
        packs_before,
        "merging writes a manifest only"
    );
    let flat = Image::open(&store.url("flat"), &StoreOptions::default()).unwrap();
    assert_eq!(flat.chain().depth(), 1);
    assert_eq!(
        flat.manifest(),
        Image::open(&store.url("vm.3"), &StoreOptions::default())
            .unwrap()
            .flattened()
    );
    let raw = store.path("pulled.raw");
    flat.pull(&raw, None, chunked::RetryPolicy::default(), 4)
        .expect("pull");
    assert!(
        std::fs::read(&raw).unwrap() == memory,
        "the merged image is the top's memory"
    );
    let layer_raw = store.path("pulled-layer.raw");
    Image::open(&store.url("vm.3"), &StoreOptions::default())
        .unwrap()
        .pull(&layer_raw, None, chunked::RetryPolicy::default(), 4)
        .expect("pull a layer");
    assert!(
        std::fs::read(&layer_raw).unwrap() == memory,
        "pulling a layer writes its chain merged"
    );
    let elsewhere = TempDir::new("merge-elsewhere");
    let err = chunked::merge(
        &store.url("vm.3"),
        &elsewhere.url("flat"),
        &StoreOptions::default(),
    )
    .expect_err("a merged manifest outside the chain's store root");
    assert!(matches!(err, Error::Url { .. }), "{err}");
    let err = chunked::merge(
        &store.url("vm.3"),
        &store.url("vm.1"),
        &StoreOptions::default(),
    )
    .expect_err("merging over a layer of the chain");
    assert!(
        matches!(
            err,
            Error::Chain {
                source: ChainError::Cycle(_),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn push_with_a_parent_stores_only_the_chunks_that_differ() {
    let store = TempDir::new("push-parent");
    let pages = 256; // 16 chunks
    let mut memory = base_image(pages, PS);
    push_base(&store, "vm", &memory, PS as u32, CHUNK);
    fill(&mut memory[100 * PS..101 * PS], 9, 100);
    memory[192 * PS..208 * PS].fill(0); // chunk 12, all zero now
    let raw = store.path("next.raw");
    std::fs::write(&raw, &memory).unwrap();
    let options = PushOptions {
        parent: Some("vm".into()),
        page_size: 2 << 20, // ignored: a layer takes its parent's geometry
        ..PushOptions::default()
    };
    let r = chunked::push(&raw, &store.url("vm.1"), &options).expect("push a layer");
    assert_eq!(r.inherited_chunks, 14, "two chunks changed");
    assert_eq!((r.new_chunks, r.zero_chunks), (1, 1));
    assert_eq!(
        r.uploaded_bytes, CHUNK as u64,
        "one changed data chunk uploaded"
    );
    assert_eq!(r.manifest.geometry().page_size, PS as u32);
    assert_restores(
        &store.url("vm.1"),
        &StoreOptions::default(),
        MemoryKind::Anon,
        &memory,
        "the image restores byte for byte",
    );
    let short = store.path("short.raw");
    std::fs::write(&short, &memory[..memory.len() / 2]).unwrap();
    let err =
        chunked::push(&short, &store.url("vm.2"), &options).expect_err("a layer of another length");
    assert!(matches!(err, Error::Geometry(_)), "{err}");
}

/// Writes a hand-made manifest straight into the store root.
fn put(store: &TempDir, name: &str, m: &Manifest) {
    std::fs::write(store.path(name), m.encode()).unwrap();
}

/// The chain error `e` is (or the test fails).
fn chain_error(e: &Error) -> &ChainError {
    match e {
        Error::Chain { source, .. } => source,
        other => panic!("not a chain error: {other}"),
    }
}

fn open_err(store: &TempDir, name: &str) -> Error {
    Image::open(&store.url(name), &StoreOptions::default()).expect_err("must be refused")
}

#[test]
fn malformed_layers_are_refused_with_the_reason() {
    let store = TempDir::new("malformed");
    let memory = base_image(64, PS);
    push_base(&store, "vm", &memory, PS as u32, CHUNK);
    let base = Image::open(&store.url("vm"), &StoreOptions::default()).unwrap();
    let g = base.manifest().geometry();
    let layer = |parent: &str, digest, geometry: chunked::Geometry| {
        let n = geometry.chunk_count() as usize;
        Manifest::new(
            geometry,
            Some(Parent {
                name: parent.into(),
                digest,
            }),
            vec![],
            vec![Chunk::Inherited; n],
        )
        .unwrap()
    };
    let digest = base.manifest().digest();

    put(&store, "orphan", &layer("gone", digest, g));
    let e = open_err(&store, "orphan");
    assert!(
        matches!(chain_error(&e), ChainError::ParentMissing { parent } if parent == "gone"),
        "{e}"
    );

    put(
        &store,
        "stale",
        &layer("vm", chunked::Digest::of(b"another vm"), g),
    );
    let e = open_err(&store, "stale");
    assert!(
        matches!(chain_error(&e), ChainError::ParentChanged { .. }),
        "{e}"
    );
    assert!(
        common::error_chain(&e).contains("changed since the layer was made"),
        "{}",
        common::error_chain(&e)
    );

    let other = chunked::Geometry {
        chunk_size: CHUNK / 2,
        ..g
    };
    put(&store, "reshaped", &layer("vm", digest, other));
    let e = open_err(&store, "reshaped");
    assert!(
        matches!(chain_error(&e), ChainError::Geometry { .. }),
        "{e}"
    );

    // b has no parent; a is made on b; then b is replaced by a layer naming a.
    let b = Manifest::new(g, None, vec![], vec![Chunk::Zero; g.chunk_count() as usize]).unwrap();
    put(&store, "b", &b);
    let a = layer("b", b.digest(), g);
    put(&store, "a", &a);
    put(&store, "b", &layer("a", a.digest(), g));
    let e = open_err(&store, "b");
    assert!(
        matches!(chain_error(&e), ChainError::Cycle(name) if name == "b"),
        "{e}"
    );
    let e = open_err(&store, "a");
    assert!(
        matches!(chain_error(&e), ChainError::ParentChanged { .. }),
        "{e}"
    );

    // A chain one deeper than the limit.
    let mut parent = ("vm".to_owned(), digest);
    for i in 1..MAX_CHAIN_DEPTH {
        let m = layer(&parent.0, parent.1, g);
        let name = format!("deep{i}");
        put(&store, &name, &m);
        parent = (name, m.digest());
    }
    let deepest = format!("deep{}", MAX_CHAIN_DEPTH - 1);
    let ok =
        Image::open(&store.url(&deepest), &StoreOptions::default()).expect("a chain at the limit");
    assert_eq!(ok.chain().depth(), MAX_CHAIN_DEPTH);
    put(&store, "too-deep", &layer(&parent.0, parent.1, g));
    let e = open_err(&store, "too-deep");
    assert!(matches!(chain_error(&e), ChainError::TooDeep), "{e}");

    // A layer's bytes corrupted in the store: the manifest decoder refuses it.
    let mut bytes = std::fs::read(store.path("orphan")).unwrap();
    let n = bytes.len();
    bytes[n - 40] ^= 1;
    std::fs::write(store.path("corrupt"), bytes).unwrap();
    let e = open_err(&store, "corrupt");
    assert!(
        matches!(
            &e,
            Error::Manifest {
                source: chunked::ManifestError::Checksum,
                ..
            }
        ),
        "{e}"
    );

    // A writer refuses to write a layer over itself, or a base with chunks missing.
    let options = PushOptions {
        parent: Some("vm".into()),
        ..PushOptions::default()
    };
    let e = ImageWriter::create(&store.url("vm"), memory.len() as u64, &options)
        .expect_err("self-parent");
    assert!(matches!(chain_error(&e), ChainError::Cycle(_)), "{e}");
    // … nor over any image of its parent's chain: pushed, it would replace a manifest the
    // chain stands on (the images above it broken, the old one gone).
    let options = PushOptions {
        parent: Some("deep3".into()),
        ..PushOptions::default()
    };
    let e = ImageWriter::create(&store.url("deep1"), memory.len() as u64, &options)
        .expect_err("an ancestor of its parent");
    assert!(
        matches!(chain_error(&e), ChainError::Cycle(name) if name == "deep1"),
        "{e}"
    );
    Image::open(&store.url("deep3"), &StoreOptions::default()).expect("the chain stands");
    let base_options = PushOptions {
        chunk_size: CHUNK,
        ..PushOptions::default()
    };
    let mut w =
        ImageWriter::create(&store.url("partial"), memory.len() as u64, &base_options).unwrap();
    w.write_chunk(0, &memory[..CHUNK as usize]).unwrap();
    let e = w
        .write_chunk(4, &memory[..CHUNK as usize])
        .expect_err("chunk beyond the image");
    assert!(
        matches!(
            e,
            Error::ChunkOutOfRange {
                index: 4,
                chunks: 4
            }
        ),
        "{e}"
    );
    let e = w.write_chunk(1, &memory[..PS]).expect_err("short chunk");
    assert!(matches!(e, Error::ChunkLength { .. }), "{e}");
    let e = w.finish().expect_err("a base with chunks never written");
    assert!(
        matches!(
            e,
            Error::Incomplete {
                first: 1,
                more: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        !store.path("partial").exists(),
        "no manifest for an incomplete image"
    );
}

#[test]
#[ignore = "needs s3s-fs: scripts/test installs it and runs the ignored tests"]
fn a_chain_in_s3_is_served_from_the_store() {
    let Some(server) = S3Server::start("a_chain_in_s3_is_served_from_the_store", "images") else {
        return;
    };
    let options = StoreOptions {
        config: server.config(),
        request_timeout: std::time::Duration::from_secs(5),
        ..StoreOptions::default()
    };
    let scratch = TempDir::new("s3");
    let pages = 512;
    let mut memory = base_image(pages, PS);
    let raw = scratch.path("base.raw");
    std::fs::write(&raw, &memory).unwrap();
    let push = |raw: &std::path::Path, name: &str, parent: Option<&str>| {
        let o = PushOptions {
            chunk_size: CHUNK,
            parent: parent.map(str::to_owned),
            store: options.clone(),
            ..PushOptions::default()
        };
        chunked::push(raw, &format!("s3://images/vm/{name}"), &o).expect("push")
    };
    push(&raw, "base", None);
    for layer in 1..=3usize {
        for p in [layer * 11, layer * 11 + 200] {
            fill(&mut memory[p * PS..(p + 1) * PS], layer as u64, p);
        }
        std::fs::write(&raw, &memory).unwrap();
        let parent = if layer == 1 {
            "base".to_owned()
        } else {
            format!("l{}", layer - 1)
        };
        let r = push(&raw, &format!("l{layer}"), Some(&parent));
        assert!(r.inherited_chunks >= 30);
    }
    assert_restores(
        "s3://images/vm/l3",
        &options,
        MemoryKind::Anon,
        &memory,
        "a three-layer chain restores from S3 byte for byte",
    );
    let chain: &Chain = &Image::open("s3://images/vm/l3", &options)
        .unwrap()
        .chain()
        .clone();
    let names: Vec<&str> = chain.layers().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["l3", "l2", "l1", "base"]);
}

#[test]
fn patches_are_completed_from_the_parent_and_checked() {
    let store = TempDir::new("patches");
    let pages = 64; // 4 chunks of 64 KiB; page 4 (chunk 0) of the base is zero
    let mut memory = base_image(pages, PS);
    memory[16 * PS..32 * PS].fill(0); // chunk 1 all zero: a zero chunk in the parent
    push_base(&store, "vm", &memory, PS as u32, CHUNK);
    let options = PushOptions {
        parent: Some("vm".into()),
        ..PushOptions::default()
    };
    let mut w = ImageWriter::create(&store.url("vm.1"), memory.len() as u64, &options).unwrap();
    let patches = vec![
        chunked::Patch {
            chunk: 0,
            pieces: vec![(3 * PS, &[7u8; PS][..]), (9 * PS + 100, &[8u8; 10][..])],
        },
        chunked::Patch {
            chunk: 1,
            pieces: vec![(PS, &[9u8; 2 * PS][..])],
        },
        // Chunk 3 patched with what it already holds: inherited, not stored.
        chunked::Patch {
            chunk: 3,
            pieces: vec![(0, &memory[48 * PS..49 * PS])],
        },
    ];
    w.write_patches(&patches).expect("patch");
    let r = w.finish().expect("finish");
    memory[3 * PS..4 * PS].fill(7);
    memory[9 * PS + 100..9 * PS + 110].fill(8);
    memory[17 * PS..19 * PS].fill(9);
    assert_eq!(r.inherited_chunks, 2, "chunks 2 and 3");
    assert_eq!(r.new_chunks, 2);
    assert_restores(
        &store.url("vm.1"),
        &StoreOptions::default(),
        MemoryKind::Anon,
        &memory,
        "patched chunks hold the parent's bytes around the patches",
    );
    let mut w = ImageWriter::create(&store.url("vm.2"), memory.len() as u64, &options).unwrap();
    let beyond = chunked::Patch {
        chunk: 0,
        pieces: vec![(CHUNK as usize - 4, &[1u8; 8][..])],
    };
    let e = w
        .write_patches(&[beyond])
        .expect_err("a piece past the chunk's end");
    assert!(matches!(e, Error::ChunkLength { index: 0, .. }), "{e}");
}
