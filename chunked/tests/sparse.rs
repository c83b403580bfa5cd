//! Sparse input: a Firecracker diff snapshot's memory file (holes where nothing changed)
//! pushed as a layer. Unsaid, it is refused; said to inherit, its holes are the parent's
//! pages (checked by pulling the layer, byte for byte); said to be zeros, they are zeros.

use crate::common;

use std::os::unix::fs::FileExt;

use chunked::{Error, Holes, Image, PushOptions, StoreOptions};
use common::TempDir;

const PS: usize = 4096;
const CHUNK: u32 = 64 << 10;
const PAGES: usize = 256; // 1 MiB: 16 chunks of 16 pages

/// Page `i` of generation `g`: never zero.
fn page(i: usize, g: u8) -> Vec<u8> {
    let mut p = vec![g; PS];
    p[..8].copy_from_slice(&(i as u64).to_le_bytes());
    p
}

/// The base image, pushed as `base`; returns its bytes.
fn push_base(store: &TempDir) -> Vec<u8> {
    let base: Vec<u8> = (0..PAGES).flat_map(|i| page(i, 1)).collect();
    let raw = store.path("base.mem");
    std::fs::write(&raw, &base).expect("write");
    let options = PushOptions {
        chunk_size: CHUNK,
        ..PushOptions::default()
    };
    chunked::push(&raw, &store.url("base"), &options).expect("push base");
    base
}

/// A Firecracker diff over `base`: only `changed` pages written (generation 2), the rest a
/// hole; returns the file and the memory it describes over `base`.
fn diff_file(store: &TempDir, base: &[u8], changed: &[usize]) -> (std::path::PathBuf, Vec<u8>) {
    let path = store.path("diff.mem");
    let file = std::fs::File::create(&path).expect("create");
    file.set_len((PAGES * PS) as u64)
        .expect("a hole the size of memory");
    let mut merged = base.to_vec();
    for &i in changed {
        let p = page(i, 2);
        file.write_all_at(&p, (i * PS) as u64).expect("write");
        merged[i * PS..(i + 1) * PS].copy_from_slice(&p);
    }
    (path, merged)
}

/// Changed pages: a whole chunk (16..32), single pages inside chunks, a chunk's last page.
fn changed() -> Vec<usize> {
    let mut pages: Vec<usize> = (16..32).collect();
    pages.extend([3, 40, 41, 100, 255]);
    pages
}

fn pulled(store: &TempDir, name: &str) -> Vec<u8> {
    let out = store.path(&format!("{name}.pulled"));
    let image = Image::open(&store.url(name), &StoreOptions::default()).expect("open");
    image
        .pull(&out, None, chunked::RetryPolicy::default(), 4)
        .expect("pull");
    std::fs::read(out).expect("read")
}

#[test]
fn a_sparse_file_pushed_as_a_layer_without_saying_what_its_holes_mean_is_refused() {
    let store = TempDir::new("sparse-refused");
    let base = push_base(&store);
    let (diff, _) = diff_file(&store, &base, &changed());
    let options = PushOptions {
        parent: Some("base".into()),
        ..PushOptions::default()
    };
    let err = chunked::push(&diff, &store.url("layer"), &options).expect_err("refused");
    assert!(
        matches!(err, Error::SparseLayer { hole_bytes, .. } if hole_bytes == ((PAGES - changed().len()) * PS) as u64),
        "{err}"
    );
    assert!(
        Image::open(&store.url("layer"), &StoreOptions::default()).is_err(),
        "no manifest written"
    );
}

#[test]
fn a_firecracker_diff_pushed_with_inheriting_holes_is_its_parent_with_the_changes() {
    let store = TempDir::new("sparse-inherit");
    let base = push_base(&store);
    let (diff, merged) = diff_file(&store, &base, &changed());
    let options = PushOptions {
        parent: Some("base".into()),
        holes: Holes::Inherit,
        ..PushOptions::default()
    };
    let r = chunked::push(&diff, &store.url("layer"), &options).expect("push layer");
    // Chunks 0, 2, 6 and 15 hold changed pages beside holes, chunk 1 is all new: five
    // chunks of the sixteen are the layer's own.
    assert_eq!(r.inherited_chunks, 11, "{r:?}");
    assert!(
        pulled(&store, "layer") == merged,
        "the layer is the parent with the diff's pages"
    );
}

#[test]
fn holes_said_to_be_zeros_are_zeros_and_inheriting_needs_a_parent() {
    let store = TempDir::new("sparse-zero");
    let base = push_base(&store);
    let (diff, _) = diff_file(&store, &base, &changed());
    let options = PushOptions {
        parent: Some("base".into()),
        holes: Holes::Zero,
        ..PushOptions::default()
    };
    chunked::push(&diff, &store.url("layer"), &options).expect("push layer");
    assert!(
        pulled(&store, "layer") == std::fs::read(&diff).expect("read"),
        "the layer reads as the file does"
    );
    let options = PushOptions {
        holes: Holes::Inherit,
        ..PushOptions::default()
    };
    let err = chunked::push(&diff, &store.url("alone"), &options).expect_err("no parent");
    assert!(matches!(err, Error::InheritWithoutParent { .. }), "{err}");
}
