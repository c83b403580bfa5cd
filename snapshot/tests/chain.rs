//! Incremental chains against the real kernel: a live base taken while writers write at
//! full speed, handed over to async dirty tracking, then five layers of changed chunks;
//! every snapshot of the chain restored through a real pager straight from its chain and
//! compared byte for byte with the memory captured while the writers were paused for it,
//! and checked against the writers' logs. 4 KiB and 2 MiB pages.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use chunked::{Image, PushOptions, SourceOptions, StoreOptions};
use common::{contents, memory, writers_at};
use snapshot::workload::Writers;
use snapshot::{Chain, FileSink, LiveSnapshot, Quiesce, QuiesceError, Region};
use uffd_core::{Mapping, MemoryKind};

/// A store root in a scratch directory, removed on drop.
struct Store(PathBuf);

impl Store {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("snapshot-chain-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Store(p)
    }

    fn url(&self, name: &str) -> String {
        format!("file://{}/{name}", self.0.display())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pauses the writers and copies the memory while they are paused: the reference each
/// layer must restore to.
struct Capturing<'a> {
    writers: &'a mut Writers,
    memory: &'a Mapping,
    captured: Vec<Vec<u8>>,
}

impl Quiesce for Capturing<'_> {
    fn pause(&mut self) -> Result<(), QuiesceError> {
        self.writers.pause()?;
        self.captured.push(contents(self.memory));
        Ok(())
    }

    fn resume(&mut self) -> Result<(), QuiesceError> {
        self.writers.resume()
    }
}

/// Restores image `url` into fresh `kind` memory through a pager, every page faulted.
fn restore(url: &str, kind: MemoryKind, len: usize) -> Vec<u8> {
    let image = Image::open(url, &StoreOptions::default()).expect("open");
    common::restore(
        Arc::new(image.source(None, SourceOptions::default()).unwrap()),
        kind,
        len,
    )
}

/// A live base and five layers of `kind` memory with `chunk`-byte chunks, each restored
/// and checked.
fn five_layers(test: &str, kind: MemoryKind, len: usize, chunk: u32, rate_mib: u64) {
    let store = Store::new(test);
    let (map, initial) = memory(kind, len);
    // Slow writers on the first half: each layer changes some chunks and inherits the rest
    // (the second half's always).
    let half = len / 2;
    let mut w = writers_at(&map, half, 2, rate_mib, 20);
    let base_raw = store.0.join("base.raw");
    let sink = Arc::new(FileSink::create(&base_raw, len as u64).unwrap());
    // SAFETY: the mapping outlives the snapshot and the chain.
    let live = unsafe {
        LiveSnapshot::builder()
            .region(Region::new(map.addr(), len, kind, 0))
            .track_writes(true)
            .start(sink)
    }
    .expect("live base");
    let (mut chain, base_report, handover) = Chain::from_live(live, &mut w).expect("hand over");
    assert_eq!(base_report.pages as usize, len / kind.page_size());
    assert!(handover < std::time::Duration::from_secs(10));
    let options = PushOptions {
        page_size: kind.page_size() as u32,
        chunk_size: chunk,
        ..PushOptions::default()
    };
    chunked::push(&base_raw, &store.url("vm.0"), &options).expect("push the base");
    let mut q = Capturing {
        writers: &mut w,
        memory: &map,
        captured: Vec::new(),
    };
    let mut reports = Vec::new();
    for k in 1..=5 {
        std::thread::sleep(std::time::Duration::from_millis(30)); // the writers write on
        let r = chain
            .layer(
                &store.url(&format!("vm.{k}")),
                &format!("vm.{}", k - 1),
                &StoreOptions::default(),
                &mut q,
            )
            .expect("layer");
        assert!(
            r.dirty_pages > 0 && r.dirty_chunks > 0,
            "layer {k}: nothing written?"
        );
        assert_eq!(
            r.push.inherited_chunks + r.dirty_chunks,
            r.push.chunks,
            "layer {k}: the chunks not written since are inherited"
        );
        reports.push(r);
    }
    let inherited: Vec<(u64, u64, u64)> = reports
        .iter()
        .map(|r| (r.push.inherited_chunks, r.dirty_chunks, r.dirty_pages))
        .collect();
    assert!(
        inherited.iter().map(|i| i.0).sum::<u64>() > 0,
        "unchanged chunks are inherited: {inherited:?}"
    );
    let captured = std::mem::take(&mut q.captured);
    drop(q);
    let log = w.stop();
    // The base holds the live cut; each layer the memory of its pause, byte for byte.
    let mut cuts = Vec::new();
    let base = std::fs::read(&base_raw).unwrap();
    // The writers' half holds an instant of their logs; the other half never changes.
    let cut = |memory: &[u8]| {
        assert!(
            memory[half..] == initial[half..],
            "the half no one writes is unchanged"
        );
        log.check_cut(&mut initial[..half].to_vec(), &memory[..half])
    };
    cuts.push(cut(&base).expect("base"));
    for (k, want) in captured.iter().enumerate() {
        let url = store.url(&format!("vm.{}", k + 1));
        let got = restore(&url, kind, len);
        assert!(got == *want, "layer {} restores byte for byte", k + 1);
        cuts.push(cut(&got).expect("a layer's cut"));
    }
    for pair in cuts.windows(2) {
        let (a, b) = (&pair[0].included, &pair[1].included);
        assert!(
            a.iter().zip(b).all(|(a, b)| b.0 >= a.0),
            "no snapshot loses a write of the one before: {a:?} then {b:?}"
        );
        assert!(
            b.iter().map(|x| x.0).sum::<u64>() > a.iter().map(|x| x.0).sum::<u64>(),
            "each snapshot holds writes the one before did not: {a:?} then {b:?}"
        );
    }
    let top = Image::open(&store.url("vm.5"), &StoreOptions::default()).unwrap();
    assert_eq!(top.chain().depth(), 6);
}

#[test]
fn a_live_base_and_five_layers_of_4k_pages_restore_each_instant_byte_for_byte() {
    five_layers("chain4k", MemoryKind::Anon, 16 << 20, 64 << 10, 4);
}

#[test]
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn a_live_base_and_five_layers_of_2m_pages_restore_each_instant_byte_for_byte() {
    let test = "a_live_base_and_five_layers_of_2m_pages_restore_each_instant_byte_for_byte";
    if !testkit::hugepages::available(test, 24) {
        return;
    }
    five_layers("chain2m", MemoryKind::HugetlbPrivate, 24 << 20, 2 << 20, 1);
}

#[test]
fn a_layer_over_an_image_of_another_shape_is_refused() {
    let store = Store::new("shape");
    let (map, _) = memory(MemoryKind::Anon, 1 << 20);
    let raw = store.0.join("small.raw");
    std::fs::write(&raw, vec![1u8; 512 << 10]).unwrap();
    chunked::push(&raw, &store.url("small"), &PushOptions::default()).unwrap();
    // SAFETY: the mapping outlives the chain; nothing writes it.
    let mut chain =
        unsafe { Chain::start(&[Region::new(map.addr(), map.len(), MemoryKind::Anon, 0)]) }
            .expect("track");
    let err = chain
        .layer(
            &store.url("l1"),
            "small",
            &StoreOptions::default(),
            &mut snapshot::Stopped,
        )
        .expect_err("512 KiB image under 1 MiB of memory");
    assert!(
        matches!(err, snapshot::Error::Chunked(chunked::Error::Geometry(_))),
        "{err}"
    );
}

/// A layer that fails after its scan (here the store cannot take its manifest) loses no
/// write: the scan protected the written pages again, so only the chain remembers them,
/// and the retried layer holds them.
#[test]
fn a_layer_retried_after_a_store_failure_still_holds_what_the_failed_one_found_written() {
    const PS: usize = 4096;
    let store = Store::new("retry");
    let len = 1 << 20;
    let (map, _) = memory(MemoryKind::Anon, len);
    let base = store.0.join("base.raw");
    std::fs::write(&base, contents(&map)).unwrap();
    let opts = PushOptions {
        chunk_size: 64 << 10,
        ..PushOptions::default()
    };
    chunked::push(&base, &store.url("vm.0"), &opts).unwrap();
    // SAFETY: the mapping outlives the chain; only this test writes it, between layers.
    let mut chain = unsafe { Chain::start(&[Region::new(map.addr(), len, MemoryKind::Anon, 0)]) }
        .expect("track");
    let written = [0, 17 * PS, len - PS];
    for &at in &written {
        // SAFETY: inside the mapping; nothing else touches it now.
        unsafe { *map.as_ptr().add(at) ^= 0xff };
    }
    // A directory where the layer's manifest goes: the push fails at its last step.
    std::fs::create_dir_all(store.0.join("bad").join("manifest")).unwrap();
    let layer = |chain: &mut Chain, name: &str| {
        chain.layer(
            &store.url(name),
            "vm.0",
            &StoreOptions::default(),
            &mut snapshot::Stopped,
        )
    };
    layer(&mut chain, "bad").expect_err("the store cannot take the manifest");
    // One of them written again since: still one page to the retried layer.
    // SAFETY: as above.
    unsafe { *map.as_ptr().add(written[1]) ^= 0x0f };
    let retried = layer(&mut chain, "vm.1").expect("retried");
    assert_eq!(retried.dirty_pages, written.len() as u64, "{retried:?}");
    assert_eq!(
        restore(&store.url("vm.1"), MemoryKind::Anon, len),
        contents(&map),
        "the retried layer restores the memory as it is"
    );
}
