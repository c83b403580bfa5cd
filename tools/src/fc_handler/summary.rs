//! The guest memory Firecracker described, and the exit summary.

use super::*;

/// The guest memory Firecracker described.
pub(super) struct Geometry {
    pub(super) regions: usize,
    pub(super) pages: u64,
    pub(super) bytes: u64,
    /// The page size, if every region has the same.
    pub(super) page_size: Option<u64>,
    /// Bytes of the memory file the regions need (the furthest `offset + size`).
    pub(super) extent: u64,
}

impl Geometry {
    /// Of a handshake's regions (validated by the handshake: page sizes are known).
    pub(super) fn of(regions: &[GuestRegion]) -> Geometry {
        let sizes: Vec<u64> = regions
            .iter()
            .map(|r| r.page_size().map_or(4096, |s| s as u64))
            .collect();
        Geometry {
            regions: regions.len(),
            pages: regions.iter().zip(&sizes).map(|(r, s)| r.size / s).sum(),
            bytes: regions.iter().map(|r| r.size).sum(),
            page_size: sizes
                .iter()
                .all(|s| Some(s) == sizes.first())
                .then(|| sizes[0]),
            extent: regions
                .iter()
                .map(|r| r.offset.saturating_add(r.size))
                .max()
                .unwrap_or(0),
        }
    }

    pub(super) fn describe(&self) -> String {
        let pages = match self.page_size {
            Some(size) => format!("{} pages of {}", self.pages, units::bytes(size)),
            None => format!("{} pages of mixed sizes", self.pages),
        };
        format!(
            "{} region(s), {pages} ({} of guest memory)",
            self.regions,
            units::bytes(self.bytes)
        )
    }
}

/// The exit summary: what was served, in pages and bytes, naming only what was used.
pub(super) fn summary(
    who: &str,
    elapsed: Duration,
    geometry: &Geometry,
    memory: &Memory,
    args: &Args,
    stats: &StatsSnapshot,
) -> Vec<String> {
    let of = |pages: u64| match geometry.page_size {
        Some(size) => units::bytes(pages * size),
        None => "mixed page sizes".into(),
    };
    let mut lines = vec![format!(
        "fc-handler: {who} exited after {:.2} s; it had {}.",
        elapsed.as_secs_f64(),
        geometry.describe()
    )];
    let faults = stats.faults();
    if memory.file.is_some() {
        lines.push(format!(
            "  on fault:   {} pages ({}) for {faults} faults",
            stats.placed_fault,
            of(stats.placed_fault)
        ));
        // The pager counts fault-around and readahead runs with the prefetcher's pages:
        // without a prefetcher they are all read ahead beside faults.
        let background = args.prefetch.prefetch != "none" || args.prefetch.replay.is_some();
        let beside = args.prefetch.fault_around > 0 || !args.prefetch.no_readahead;
        let label = match (background, beside) {
            (true, true) => Some("prefetched or read ahead beside faults"),
            (true, false) => Some("prefetched"),
            (false, true) => Some("read ahead beside faults"),
            (false, false) => None,
        };
        if let Some(label) = label {
            lines.push(format!(
                "  {label}: {} pages ({})",
                stats.placed_prefetch,
                of(stats.placed_prefetch)
            ));
        }
    } else {
        let reconnects = match &memory.client {
            Some(client) => format!("; {} reconnections", client.reconnects()),
            None => String::new(),
        };
        lines.push(format!(
            "  from {}: {} pages ({}), requested on fault or streamed; {faults} faults{}",
            memory.remote,
            stats.placed_arrival,
            of(stats.placed_arrival),
            reconnects
        ));
    }
    if faults != stats.placed_fault {
        let remote_answer = format!("by {} (a request, or the stream)", memory.remote);
        let answered = if memory.file.is_some() {
            "with a zero page"
        } else {
            remote_answer.as_str()
        };
        lines.push(format!(
            "  (faults are touches the kernel reported, not pages: a fault may be answered \
             {answered}, or find its page already on its way ({}) or already placed ({}) and \
             need only a wake)",
            stats.faults_duplicate, stats.faults_wake_only
        ));
    }
    if stats.placed_zero > 0 || stats.events_remove > 0 {
        lines.push(format!(
            "  zero pages: {} placed with UFFDIO_ZEROPAGE (nothing copied){}, {} REMOVE event(s) (balloon or free-page reporting dropped pages)",
            stats.placed_zero,
            zero_origin(memory),
            stats.events_remove
        ));
    }
    if stats.gone_silently > 0 {
        lines.push(format!(
            "  taken back by Firecracker without an event: {} pages (memory mapped over them, as its balloon does before 1.11: left to it, not placed)",
            stats.gone_silently
        ));
    }
    if let Some(path) = &args.prefetch.record {
        lines.push(format!("  working set recorded to {}", path.display()));
    }
    lines
}

/// Where the memory file's zero pages were found: its holes, and the check of what was
/// read.
fn zero_origin(memory: &Memory) -> String {
    match &memory.zero {
        Some(zero) => format!(
            ": the file's holes ({}, never read) and pages found all zero when read ({})",
            units::bytes(zero.hole_bytes()),
            units::bytes(zero.found_bytes())
        ),
        None => String::new(),
    }
}
