//! Live migration of a memory region: iterative precopy with dirty tracking, the switch to
//! postcopy, and postcopy with an urgent channel and recovery.
//!
//! The [`source`] owns the memory and a running, writing workload. It connects to the
//! [`dest`]ination with two authenticated connections of one session: *main* (control
//! messages and the background stream) and *urgent* (the destination's page requests and
//! their answers, so a requested page never queues behind the stream).
//!
//! ```text
//! source                                   destination
//!   ADVISE ─────────────────────────────▶  map the region          (state ADVISE)
//!   precopy rounds: PAGES / ZERO_RUN ───▶  copied in, no uffd yet
//!     (round k sends what round k-1's
//!      dirty scan found written)
//!   stop the workload; final dirty scan
//!   DISCARD (sent ∧ dirty) ─────────────▶  drop those pages
//!   LISTEN ─────────────────────────────▶  register uffd, start the pager (LISTEN)
//!                               ◀────────  ACK
//!   RUN ────────────────────────────────▶  start the workload      (RUNNING)
//!                               ◀────────  ACK   (downtime = stop → this ACK)
//!   stream what is still needed ────────▶  receivers place arrivals
//!   urgent: ◀─ REQ_PAGES ── PAGES ─▶       faults become requests
//!   END ────────────────────────────────▶  wait for the last pages  (END)
//!                               ◀────────  DIGESTS (every page's digest)
//!   SHUT (verified / mismatch) ─────────▶
//! ```
//!
//! **Recovery.** A connection that breaks during postcopy (closed, reset, a frame cut in
//! half, a peer that stops reading for longer than the I/O timeout) pauses both sides;
//! nothing is lost, because the destination's page-state map says what it has. The
//! source reconnects (automatically with exponential backoff, or at once on
//! [`SourceControl::resume`]); the destination answers the new main connection with
//! RECV_BITMAP, the source marks everything else needed again, the destination re-sends
//! its outstanding requests (pages still Requested), and the migration goes on.
//!
//! **Dirty tracking** is userfaultfd async write-protect plus `PAGEMAP_SCAN`; see
//! [`dirty`] for why it beats soft-dirty bits.
//!
//! ## Example: migrate 1 MiB within one process
//!
//! ```
//! use postcopy::auth::Key;
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

pub mod dest;
pub mod dirty;
pub mod source;

pub use dest::{DestControl, DestOptions, DestReport, Destination, RunningMemory};
pub use source::{Fault, Migration, Phase, SourceControl, SourceOptions, SourceReport};

use std::time::Duration;

/// The 64-bit digest of one page (FNV-1a over 64-bit words, then a final mix): what the
/// destination sends in DIGESTS and the source checks against its final content.
pub fn digest(page: &[u8]) -> u64 {
    // SAFETY: a slice is readable for its length.
    unsafe { digest_raw(page.as_ptr(), page.len()) }
}

/// [`digest`] of `len` bytes at `ptr`, read with volatile loads (the memory may be
/// another thread's, e.g. a workload doing content-preserving atomic writes).
///
/// # Safety
/// `ptr..ptr + len` must be readable.
pub unsafe fn digest_raw(ptr: *const u8, len: usize) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let words = len / 8;
    for i in 0..words {
        // SAFETY: within the readable range (caller); unaligned read.
        let w = unsafe { std::ptr::read_volatile(ptr.add(i * 8).cast::<[u8; 8]>()) };
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(PRIME);
    }
    for i in words * 8..len {
        // SAFETY: as above.
        h = (h ^ u64::from(unsafe { std::ptr::read_volatile(ptr.add(i)) })).wrapping_mul(PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Timeouts and retry policy shared by both endpoints.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A send or handshake that makes no progress for this long breaks the connection
    /// (a peer that stopped reading).
    pub io_timeout: Duration,
    /// First reconnection delay; doubled per failed attempt up to `max_backoff`.
    pub first_backoff: Duration,
    /// Largest reconnection delay.
    pub max_backoff: Duration,
    /// A side paused for this long gives up and fails the migration.
    pub give_up_after: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_secs(5),
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            give_up_after: Duration::from_secs(60),
        }
    }
}
