//! Live migration of a memory region: iterative precopy with dirty tracking, the switch to
//! postcopy, and postcopy with an urgent channel — each surviving broken and silent
//! connections.
//!
//! The [`source`] owns the memory and a running, writing workload; the [`dest`]ination
//! receives it and runs the workload from RUN on. They talk over a connection pair of one
//! session ([`transport::link::Pair`]): *main* (control and the background stream) and *urgent*
//! (the destination's page requests and their answers).
//!
//! ```text
//! source                                   destination
//!   ADVISE ─────────────────────────────▶  map the region
//!                               ◀────────  RECV_BITMAP, ACK(step)   (on every pair)
//!   precopy rounds: PAGES / ZERO_RUN ───▶  copied in, no uffd yet           (step 0)
//!     (round k sends what round k-1's
//!      dirty scan found written)
//!   SYNC(n) every 16 KiB–4 MiB, per round ▶  (spaced by how fast SYNCED comes)
//!                               ◀────────  SYNCED(n): every page before it landed
//!   DISCARD (sent ∧ dirty), SYNC(n) ────▶  drop those pages (in order with pages)
//!                               ◀────────  SYNCED(n): dropped; the workload still runs
//!   stop the workload (it gives its device state); final dirty scan
//!   DISCARD (sent ∧ dirty since) ───────▶  drop those pages
//!   LISTEN ─────────────────────────────▶  register uffd, start the pager
//!   RUN (device state), not waiting ────▶
//!                               ◀────────  ACK(1)                          (step 1)
//!                                          embedder loads it, resumes the workload
//!                               ◀────────  ACK(2)   (downtime: stop → here) (step 2)
//!   stream what is still needed ────────▶  readers place arrivals
//!   urgent: ◀─ REQ_PAGES ── PAGES ─▶       faults become requests
//!   END ────────────────────────────────▶  wait for the last pages
//!                               ◀────────  DIGESTS (of what each page was placed with)
//!   SHUT (verified / mismatch) ─────────▶
//!                               ◀────────  ACK(3)                          (step 3)
//!   ACK(3) (heard: the destination may go) ▶
//! ```
//!
//! What each side guarantees, in one line each — the README's `uffdkit migrate` section
//! argues every one of them at length, and `tests/explore.rs` checks them under seeded
//! fault schedules:
//!
//! - **Recovery in every phase.** A connection that breaks or goes silent ([`Timing`])
//!   pauses both sides; the source reconnects with a newer generation of the session
//!   (with backoff, or on [`SourceControl::resume`]), the destination answers with what it
//!   has (RECV_BITMAP) and its *step*, and the source re-plans from those. The source
//!   gives up after [`Timing::give_up_after`] without progress, however many pairs
//!   connect meanwhile ([`Migration::run_with_state`] says what counts); the destination
//!   likewise, from what lands there ([`Destination::run_with_state`]; [`Error::GaveUp`]).
//! - **Delivery.** A page counts as delivered only once confirmed: SYNCED in precopy (after
//!   a break every unconfirmed page counts as dirty), the ACK of LISTEN for all of precopy,
//!   the present-set after the switch; nothing a superseded pair carries is applied; a page
//!   is placed once after the switch, so no older version overwrites a newer one.
//! - **Downtime** holds only what must wait for the stop (the stop, the last dirty scan,
//!   the DISCARD of what was rewritten since the last round, LISTEN and RUN in one round
//!   trip); the bulk of DISCARD goes, confirmed, before it. [`SourceReport::switch`] and
//!   [`DestReport::switch`] time each step.
//! - **The device state** ([`Migration::run_with_state`]) rides in RUN and is handed to the
//!   destination's embedder exactly once, before the workload resumes, whatever breaks.
//! - **The verdict** compares the source's final content with digests of what the
//!   destination *placed* in each page (`dest/placed.rs`), not of its live memory: it holds
//!   while the destination's workload runs.
//!
//! Dirty tracking is userfaultfd async write-protect plus `PAGEMAP_SCAN`
//! ([`uffd_core::DirtyTracker`]).
//!
//! ## Example: migrate 1 MiB within one process
//!
//! ```
//! use transport::Key;
//! use postcopy::migrate::{DestOptions, Destination, Migration, SourceOptions};
//! use uffd_core::{Mapping, MemoryKind};
//!
//! let key = Key::new(*b"sixteen-bytes-or-more")?;
//! let dest = Destination::bind(&"127.0.0.1:0".parse()?, key.clone(), DestOptions::default())?;
//! let addr = dest.local_addr()?;
//! // The destination runs on its own thread; `on_run` would start its workload.
//! let receiving = std::thread::spawn(move || dest.run(|_memory| {}));
//!
//! let memory = Mapping::new(MemoryKind::Anon, 1 << 20)?;
//! // SAFETY (example): our own mapping, alive until `run` returns; nothing else writes it.
//! unsafe { std::ptr::write_bytes(memory.as_ptr(), 7, memory.len()) };
//! let migration = unsafe {
//!     Migration::new(addr, key, memory.addr(), memory.len(), SourceOptions::default())?
//! };
//! let report = migration.run(|| { /* stop the workload here */ })?;
//! assert_eq!(report.verified, 256); // every page's digest matched at the destination
//! let arrived = receiving.join().unwrap()?;
//! // SAFETY (example): the destination's memory is mapped for as long as the report.
//! assert_eq!(unsafe { *arrived.memory.as_ptr().add(4096) }, 7);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`Error::GaveUp`]: transport::Error::GaveUp

pub mod dest;
pub mod source;

pub use dest::{
    DestControl, DestOptions, DestPhase, DestReport, DestSwitchSteps, Destination, RunningMemory,
};
pub use source::{
    Migration, Phase, Progress, Round, SourceControl, SourceOptions, SourceReport, SwitchReason,
    SwitchSteps,
};
pub use transport::link::{LinkStatus, Timing};

use crate::link::Pair;
use crate::Error;

/// What an embedder's device-state callback may fail with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How far the destination got, as it reports it in ACK on every connection pair.
pub(crate) mod step {
    /// Advised: precopy pages are copied in.
    pub const ADVISED: u64 = 0;
    /// LISTEN done: the pager runs.
    pub const LISTENING: u64 = 1;
    /// RUN done: the workload runs.
    pub const RUNNING: u64 = 2;
    /// The source's verdict arrived.
    pub const VERIFIED: u64 = 3;
}

/// What a side reports when `cause` breaks off its phase on `pair`: the pair's first
/// cause where `cause` is only a send failing on a pair cut before ([`Pair::cause`]).
fn first_cause(pair: &Pair, cause: Error) -> Error {
    match cause {
        Error::Link(e) => Error::Link(pair.cause(e)),
        other => other,
    }
}

/// The 64-bit digest of one page (XXH3-64): what the destination sends in DIGESTS and the
/// source checks against its final content. The destination takes it from every page it
/// lands, on the stream's path, so it must run near memory speed.
pub fn digest(page: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(page)
}

/// Copies `dst.len()` bytes from `src` with volatile loads: memory a workload is writing
/// while we read it, which a `&[u8]` must not cover (a torn copy is harmless where the
/// write that tore it is tracked and the page sent again). 32 bytes a load where the CPU
/// has AVX2 and the range is 32-byte aligned (pages are), as fast as `memcpy` from cold
/// memory; 8 bytes otherwise, ~30 % slower (124 against 95 ms per GiB here).
///
/// # Safety
/// `src..src + dst.len()` must be readable and 8-byte aligned; `dst.len()` a multiple
/// of 8.
unsafe fn copy_raw(src: *const u8, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if (src as usize | dst.len()) % 32 == 0 && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the caller's range, 32-byte aligned; the CPU has AVX2.
        return unsafe { copy_raw_avx2(src, dst) };
    }
    for (i, out) in dst.chunks_exact_mut(8).enumerate() {
        // SAFETY: within the readable, aligned range (caller).
        let word = unsafe { std::ptr::read_volatile(src.add(i * 8).cast::<u64>()) };
        out.copy_from_slice(&word.to_ne_bytes());
    }
}

/// [`copy_raw`] 32 bytes a load.
///
/// # Safety
/// As [`copy_raw`], with `src` and `dst.len()` 32-byte aligned, on a CPU with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_raw_avx2(src: *const u8, dst: &mut [u8]) {
    use std::arch::x86_64::{__m256i, _mm256_storeu_si256};
    for (i, out) in dst.chunks_exact_mut(32).enumerate() {
        // SAFETY: within the readable range, 32-byte aligned (caller); `out` is 32 bytes.
        unsafe {
            let block = std::ptr::read_volatile(src.add(i * 32).cast::<__m256i>());
            _mm256_storeu_si256(out.as_mut_ptr().cast(), block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::copy_raw;

    #[test]
    fn copy_raw_copies_aligned_and_unaligned_ranges_alike() {
        let words: Vec<u64> = (0..1024u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        // From a 32-byte boundary (the vector loop where the CPU has it), from one that is
        // only 8-byte aligned, and a length that is no multiple of 32.
        let base = words.as_ptr() as usize;
        let at32 = (base.next_multiple_of(32) - base) / 8;
        for (from, len) in [(at32, 4096), (at32 + 1, 4096), (at32, 4096 - 8), (0, 8)] {
            let mut out = vec![0u8; len];
            // SAFETY: within `words`, 8-byte aligned, `len` a multiple of 8.
            unsafe { copy_raw(words.as_ptr().add(from).cast(), &mut out) };
            assert_eq!(
                out,
                bytes[from * 8..from * 8 + len],
                "from word {from}, {len} bytes"
            );
        }
    }
}
