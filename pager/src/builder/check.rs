//! What [`PagerBuilder::start`] refuses before anything starts — regions beyond the image,
//! a SIGBUS mode the source or kernel cannot serve, handler CPUs out of reach, a bad seeded
//! map — and what it prepares first (the MINOR regions' aliases).

use std::sync::Arc;

use page_state::{PageState, PageStateMap};
use uffd_core::{Features, Mapping, OpenPath};

use crate::cpu::allowed_cpus;
use crate::error::{Error, Result};
use crate::pager::DeliveryMode;
use crate::region::{RegionTable, Resolve};

use super::PagerBuilder;

impl PagerBuilder {
    /// Makes the aliases of the MINOR regions given as mappings; returns what the pager
    /// keeps alive (the mappings and the aliases).
    pub(super) fn make_aliases(&mut self) -> Result<Vec<Arc<Mapping>>> {
        let mut keep = std::mem::take(&mut self.keep_alive);
        for owned in &self.owned {
            keep.push(owned.memory.clone());
            if !owned.minor {
                continue;
            }
            let alias = owned.memory.alias().map_err(|source| Error::Io {
                what: "map an alias of a MINOR region's memory (shared memory only)",
                source,
            })?;
            self.regions[owned.region] = self.regions[owned.region].minor(alias.addr());
            keep.push(Arc::new(alias));
        }
        Ok(keep)
    }

    /// Refuses what cannot be served: a mapping with an adopted userfaultfd, regions beyond
    /// the image, a SIGBUS mode without the feature or a signal-safe source, handler CPUs
    /// this process may not use or that the mode does not use, a MINOR region whose alias
    /// is not its file's shared mapping.
    pub(super) fn check(&self, table: &RegionTable) -> Result<()> {
        // A Mapping is this process's memory; an adopted userfaultfd may serve another
        // process, whose memory at the mapping's addresses the pager would fill.
        if let Some(owned) = self.owned.first() {
            if self.uffd.open_path() == OpenPath::Adopted {
                let spec = &self.regions[owned.region];
                return Err(Error::BadRegion {
                    base: spec.base,
                    len: spec.len,
                    reason: "a Mapping needs a userfaultfd opened in this process, not one \
                             adopted (Uffd::from_fd), which may serve another process",
                });
            }
        }
        for r in table.regions() {
            let need = r.spec.image_offset + r.spec.len as u64;
            if need > self.source.len() {
                return Err(Error::ImageTooSmall {
                    need,
                    have: self.source.len(),
                });
            }
            if let Resolve::Continue { alias } = r.spec.resolve {
                crate::maps::check_alias(&r.spec, alias, table)?;
            }
        }
        if self.mode == DeliveryMode::Sigbus {
            if !self.uffd.features().contains(Features::SIGBUS) {
                return Err(Error::Mode {
                    mode: "sigbus",
                    reason: "the userfaultfd was not negotiated with the SIGBUS feature".into(),
                });
            }
            if self.source.signal_safe().is_none() {
                return Err(Error::Mode {
                    mode: "sigbus",
                    reason: "the source cannot answer inside a signal handler (use a memory \
                             or mmap source)"
                        .into(),
                });
            }
        }
        let mode = self.mode.name();
        let allowed = allowed_cpus();
        if let Some(cpus) = &self.handler_cpus {
            if self.mode != DeliveryMode::PerCpu {
                return Err(Error::Mode {
                    mode,
                    reason: "handler_cpus sets per-CPU handlers; this mode has one handler \
                             thread (use handler_cpu)"
                        .into(),
                });
            }
            if cpus.is_empty() {
                return Err(Error::Mode {
                    mode,
                    reason: "an empty set of handler CPUs".into(),
                });
            }
            if let Some(cpu) = cpus.iter().find(|c| !allowed.contains(c)) {
                return Err(Error::Mode {
                    mode,
                    reason: format!("CPU {cpu} is not in this process's allowed set {allowed:?}"),
                });
            }
        }
        if let Some(cpu) = self.handler_cpu {
            if self.mode == DeliveryMode::PerCpu {
                return Err(Error::Mode {
                    mode,
                    reason: "handler_cpu pins the one handler thread of the other modes; \
                             per-CPU handlers take handler_cpus"
                        .into(),
                });
            }
            if !allowed.contains(&cpu) {
                return Err(Error::Mode {
                    mode,
                    reason: format!(
                        "handler CPU {cpu} is not in this process's allowed set {allowed:?}"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The seeded map, checked, or a fresh one.
    pub(super) fn seeded_states(&mut self, pages: usize) -> Result<PageStateMap> {
        let Some(map) = self.states.take() else {
            return Ok(PageStateMap::new(pages));
        };
        if map.len() != pages {
            return Err(Error::StatesSize {
                pages: map.len(),
                want: pages,
            });
        }
        if let Some(page) = map.next_in_state_wrapping(PageState::Requested, 0) {
            return Err(Error::SeededState {
                page,
                state: PageState::Requested,
            });
        }
        Ok(map)
    }
}
