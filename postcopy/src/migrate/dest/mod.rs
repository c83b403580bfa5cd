//! The migration destination: precopy → LISTEN → RUN → postcopy → verdict, each its own
//! function, each resumed on the next connection pair of the session after a break.
//!
//! Before LISTEN, arriving pages are copied straight into the memory (a fresh mapping, or
//! the embedder's guest memory: [`Destination::with_memory`]; no userfaultfd yet; precopy
//! rounds may overwrite them) and their states written into the map the pager will start
//! with; DISCARD (applied by the receiver, in order with the pages) drops the ones the
//! source dirtied after sending. At LISTEN a pager registers the memory with the receiver
//! as its source: a fault asks on the urgent connection and returns at once, and the
//! connection readers place what arrives. At RUN
//! the embedder gets the memory and the source's device state, and resumes its workload.
//! Every page landed is digested as it lands (`placed.rs`): the digests the source checks
//! at the end are of what was placed, whatever the workload wrote since.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::{DeliveryMode, PageStateMap, Pager, Prefetch};
use uffd_core::{Features as UffdFeatures, Mapping, MemoryKind, Uffd};

use transport::{Addr, Listener};

use super::{first_cause, step, BoxError, LinkStatus, Timing};
use crate::endpoint::receiver::{read_advise, Land, Receiver};
use crate::endpoint::RecvStats;
use crate::error::{unexpected, LinkError, Refusal};
use crate::link::{self, Acceptor, Admission, Admit, Arrival, Messages, Pair};
use crate::wire::{Advise, Message, Role, ShutReason, PAGES_DATA_AT, PROTOCOL};
use crate::Error;
use crate::Security;

mod headway;
mod placed;
mod run;
use placed::Placed;
use run::DestRun;

/// Digests per DIGESTS frame.
const DIGESTS_PER_FRAME: usize = 8192;

/// How the destination runs.
#[derive(Debug, Clone, Copy)]
pub struct DestOptions {
    /// How the pager receives faults.
    pub mode: DeliveryMode,
    /// Liveness, and the bound on waiting for the source (first, and since the last
    /// progress: [`Destination::run_with_state`]).
    pub timing: Timing,
    /// What strangers may hold while the destination listens (one session is served).
    pub admission: Admission,
    /// Transparent huge pages for the workload (anonymous memory): the memory is advised
    /// `MADV_HUGEPAGE` from LISTEN on, and where it lies on 2 MiB boundaries the stream's
    /// whole blocks are moved in from the receive buffer as huge pages, uncopied
    /// ([`Destination::with_memory`] says more). What it costs: the kernel zeroes each huge
    /// page before the connection's reader receives into it. Beside two busy loops the
    /// stream first ran ~10 % slower; with that zeroing moved off the reader it measured
    /// within the noise of copying (README, "The network data path"). Not settled, so it
    /// is off by default.
    /// Off, the memory stays advised `MADV_NOHUGEPAGE` from ADVISE on, as QEMU's postcopy
    /// destination leaves it, and every page is copied in.
    pub huge_pages: bool,
}

impl Default for DestOptions {
    fn default() -> Self {
        Self {
            mode: DeliveryMode::PerCpu,
            timing: Timing::default(),
            admission: Admission::default(),
            huge_pages: false,
        }
    }
}

/// Destination phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DestPhase {
    /// Waiting for the source.
    #[default]
    Waiting,
    /// ADVISE received; precopy pages arriving.
    Precopy,
    /// Registered; waiting for RUN.
    Listening,
    /// The workload runs; pages arrive on demand and in the background.
    Running,
    /// Every page arrived; digests sent, waiting for the verdict.
    Verifying,
    /// Verified.
    Done,
}

/// Live counters of a running destination.
#[derive(Debug, Default)]
pub struct DestControl {
    phase: std::sync::Mutex<DestPhase>,
    /// Pages copied in and placed, pages requested.
    pub received: Arc<RecvStats>,
    /// Paused or not, and reconnections.
    pub link: LinkStatus,
    #[cfg(feature = "fault-injection")]
    faults: Arc<crate::fault::Faults>,
}

impl DestControl {
    /// The current phase.
    pub fn phase(&self) -> DestPhase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, p: DestPhase) {
        let was = std::mem::replace(
            &mut *self.phase.lock().unwrap_or_else(|p| p.into_inner()),
            p,
        );
        if was != p {
            log::debug!("destination: {p:?}");
        }
    }

    /// Plans `fault` (a stall of the readers) once `after_pages` pages arrived.
    #[cfg(feature = "fault-injection")]
    pub fn inject(&self, fault: crate::fault::Fault, after_pages: u64) {
        self.faults.inject(fault, after_pages);
    }
}

/// The migrated memory, handed to the workload at RUN.
#[derive(Debug, Clone, Copy)]
pub struct RunningMemory {
    /// First byte.
    pub base: usize,
    /// Bytes.
    pub len: usize,
    /// Page size.
    pub page_size: usize,
}

/// The destination's share of the switch, step by step (the last attempt's, if a break
/// made a step repeat).
#[derive(Debug, Clone, Copy, Default)]
pub struct DestSwitchSteps {
    /// Applying DISCARD (every message of it, including any before the source's stop).
    pub discard: Duration,
    /// LISTEN: the userfaultfd opened, the memory registered, the pager started.
    pub listen: Duration,
    /// RUN: the embedder's callback (device state loaded, workload resumed).
    pub run: Duration,
}

/// What a finished destination did. Holds the migrated memory.
#[derive(Debug)]
pub struct DestReport {
    /// The migrated memory (still mapped; the workload may go on using it): the
    /// embedder's own ([`Destination::with_memory`]) or the destination's.
    pub memory: Arc<Mapping>,
    /// Page size.
    pub page_size: usize,
    /// Pages.
    pub pages: u64,
    /// Pages copied in during precopy (with re-sends).
    pub precopy_pages: u64,
    /// Pages dropped by DISCARD.
    pub discarded: u64,
    /// Pages placed in postcopy.
    pub postcopy_pages: u64,
    /// Pages requested by faults.
    pub requested: u64,
    /// Reconnections.
    pub reconnects: u64,
    /// RUN → every page present.
    pub postcopy: Duration,
    /// Its share of the switch.
    pub switch: DestSwitchSteps,
    /// The pager's counters, its fault latency among them (`pager.latency`: the pager
    /// read the fault → its page placed, requested pages' round trips included) and their
    /// sum (`pager.blocktime`: what faulting threads waited, as QEMU's postcopy blocktime).
    pub pager: pager::StatsSnapshot,
    /// The source's verdict.
    pub verdict: String,
}

/// A migration destination listening for its source.
pub struct Destination {
    acceptor: Acceptor,
    opts: DestOptions,
    control: Arc<DestControl>,
    /// The embedder's memory to receive into, if it gave one.
    memory: Option<Arc<Mapping>>,
}

impl Destination {
    /// Listens on `addr` for a source that passes `security` (a
    /// [`TlsConfig`](transport::TlsConfig), or a pre-shared [`Key`](transport::Key) on
    /// trusted links). The first session to authenticate is the one served; any other is
    /// refused.
    pub fn bind(
        addr: &Addr,
        security: impl Into<Security>,
        opts: DestOptions,
    ) -> Result<Destination, Error> {
        let listener = Listener::bind(addr).map_err(Error::io("bind the destination"))?;
        let admission = Admission {
            max_sessions: 1,
            ..opts.admission
        };
        let acceptor = Acceptor::start(
            listener,
            (PROTOCOL, security.into()),
            (opts.timing, admission),
            (Role::Source, Admit::OneSession),
            None,
        )?;
        Ok(Destination {
            acceptor,
            opts,
            control: Arc::default(),
            memory: None,
        })
    }

    /// Receives into `memory` — the embedder's guest memory, already given to its
    /// hypervisor (a KVM memory slot) — instead of a mapping of the destination's own: the
    /// pager registers and serves it, and [`DestReport::memory`] is this `Arc`.
    ///
    /// It must be private memory of the advised size and page size: anonymous for 4 KiB
    /// pages, private hugetlb for 2 MiB (DISCARD drops pages with `MADV_DONTNEED`, which a
    /// shared mapping would keep in its page cache); else the session is refused with
    /// [`Refusal::Geometry`], before anything lands. What it holds is dropped at ADVISE.
    /// From then until `on_run` its content is the destination's: the embedder runs
    /// nothing on it (its bytes are a mix of versions until the switch), and it must not
    /// be registered with another userfaultfd.
    ///
    /// Anonymous memory is advised `MADV_NOHUGEPAGE` at ADVISE (khugepaged could otherwise
    /// fill pages DISCARD dropped with zeros before a userfaultfd guards them) and, with
    /// [`DestOptions::huge_pages`], `MADV_HUGEPAGE` at LISTEN, once registered. On 2 MiB
    /// boundaries, and with a kernel that has `UFFDIO_MOVE`, the stream's whole 2 MiB
    /// blocks are then moved in from the receive buffer, uncopied, as transparent huge
    /// pages (the destination's own memory is mapped so).
    pub fn with_memory(mut self, memory: Arc<Mapping>) -> Destination {
        self.memory = Some(memory);
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<Addr, Error> {
        Ok(self.acceptor.local_addr()?)
    }

    /// The socket file of a Unix listener (its path and identity: remove it only while
    /// it is still this one); `None` on TCP.
    pub fn socket_file(&self) -> Option<transport::socket_file::SocketFile> {
        self.acceptor.socket_file()
    }

    /// Progress.
    pub fn control(&self) -> Arc<DestControl> {
        self.control.clone()
    }

    /// Runs the destination to the end. `on_run` is called at RUN with the memory (start
    /// the workload there; it runs while pages are still arriving). A device state the
    /// source sent is dropped (see [`run_with_state`](Self::run_with_state)).
    pub fn run(self, on_run: impl FnOnce(RunningMemory)) -> Result<DestReport, Error> {
        self.run_with_state(|memory, device_state| {
            if !device_state.is_empty() {
                log::warn!(
                    "destination: {} bytes of device state dropped",
                    device_state.len()
                );
            }
            on_run(memory);
            Ok::<(), std::convert::Infallible>(())
        })
    }

    /// Runs the destination to the end. At RUN, `on_run` gets the memory and the device
    /// state the source's workload left ([`Migration::run_with_state`]), exactly once and
    /// before the source hears that RUN is done: load the state and resume the workload
    /// there (it runs while pages are still arriving). If it returns an error, the
    /// migration fails before RUN completes — the source hears why and, since nothing ran
    /// here, may resume its own workload — with [`Error::DeviceState`].
    ///
    /// A broken or silent connection pauses (after RUN the pager keeps the workload's
    /// faults waiting) until the source reconnects, or fails once [`Timing::give_up_after`]
    /// has passed since the last progress — however many pairs the source opened
    /// meanwhile. Progress is what lands here (pages copied in, placed or dropped, a step
    /// taken) and a pair that was up two silence deadlines after its greeting (the source
    /// idle, or stopping its workload). If the migration fails after RUN, the memory is left
    /// mapped (the workload may still use it) and every page that never arrived is
    /// poisoned: a touch raises SIGBUS, never reads zeros.
    ///
    /// [`Migration::run_with_state`]: super::Migration::run_with_state
    pub fn run_with_state<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
        self,
        on_run: impl FnOnce(RunningMemory, Vec<u8>) -> Result<(), E>,
    ) -> Result<DestReport, Error> {
        let mut d = DestRun::start(&self)?;
        let mut on_run =
            Some(|memory, state| on_run(memory, state).map_err(|e| -> BoxError { e.into() }));
        while d.step != step::VERIFIED {
            let done = match d.step {
                step::ADVISED => d.precopy(),
                step::LISTENING => d.await_run(&mut on_run),
                _ => d.postcopy(),
            };
            match done {
                Ok(()) => {}
                Err(e) if e.is_link() => d.resume(e)?,
                Err(e) => return Err(d.fail(e)),
            }
        }
        d.linger();
        self.control.set_phase(DestPhase::Done);
        d.report()
    }
}
