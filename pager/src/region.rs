//! Regions: the registered address ranges a pager serves, and the mapping between an
//! address, a page index in the pager's state map, and an offset in the image.

use uffd_core::MemoryKind;

use crate::error::{Error, Result};

/// How faults in a region are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// MISSING mode: pages are placed with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`.
    Copy,
    /// MINOR mode on shared memory (registered MISSING | MINOR): the page is written into
    /// the page cache through an unregistered alias mapping of the same file at `alias`
    /// (in this process), then mapped with `UFFDIO_CONTINUE`.
    Continue {
        /// Start of the alias mapping.
        alias: usize,
    },
}

/// One region to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Start address (in the address space the uffd serves).
    pub base: usize,
    /// Length in bytes, a multiple of `page_size`.
    pub len: usize,
    /// 4 KiB, or 2 MiB for hugetlb.
    pub page_size: usize,
    /// The memory behind the region.
    pub kind: MemoryKind,
    /// Offset of the region's first byte in the image.
    pub image_offset: u64,
    /// Copy (MISSING) or continue (MINOR).
    pub resolve: Resolve,
}

impl RegionSpec {
    /// A region of `kind` memory at `base`, resolved by copy, with the kind's page size.
    pub fn new(base: usize, len: usize, kind: MemoryKind, image_offset: u64) -> Self {
        Self {
            base,
            len,
            page_size: kind.page_size(),
            kind,
            image_offset,
            resolve: Resolve::Copy,
        }
    }

    /// The same region resolved in MINOR mode through an alias mapping at `alias`.
    pub fn minor(mut self, alias: usize) -> Self {
        self.resolve = Resolve::Continue { alias };
        self
    }

    /// Pages in the region.
    pub fn pages(&self) -> usize {
        self.len / self.page_size
    }
}

/// A region as the pager tracks it: the spec plus its first index in the state map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// What was asked for (`base` follows REMAP events).
    pub spec: RegionSpec,
    /// Index of the region's first page in the pager's page state map.
    pub first_page: usize,
    /// Cleared by an UNMAP event: the range is gone, its pages are never served again.
    pub mapped: bool,
}

/// Where a page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef {
    /// Index in the state map.
    pub page: usize,
    /// Page-aligned address.
    pub addr: usize,
    /// Page size.
    pub size: usize,
    /// Offset of the page in the image.
    pub offset: u64,
    /// How to place it.
    pub resolve: Resolve,
    /// The page's offset from its region's base (for alias addressing).
    pub in_region: usize,
    /// Memory kind.
    pub kind: MemoryKind,
}

/// The regions of one pager, with lookups by address, page index and image offset.
#[derive(Debug, Clone, Default)]
pub struct RegionTable {
    regions: Vec<Region>,
    pages: usize,
}

impl RegionTable {
    /// Builds the table, checking alignment and overlaps.
    pub fn new(specs: &[RegionSpec]) -> Result<Self> {
        let mut regions = Vec::with_capacity(specs.len());
        let mut pages = 0;
        for spec in specs {
            let ps = spec.page_size;
            if !ps.is_power_of_two() || spec.len == 0 || spec.len % ps != 0 || spec.base % ps != 0 {
                return Err(Error::BadRegion {
                    base: spec.base,
                    len: spec.len,
                    reason: "base and length must be non-zero multiples of the page size",
                });
            }
            if spec.image_offset % ps as u64 != 0 {
                return Err(Error::BadRegion {
                    base: spec.base,
                    len: spec.len,
                    reason: "image offset must be page aligned",
                });
            }
            if let Some(other) = regions.iter().find(|r: &&Region| {
                spec.base < r.spec.base + r.spec.len && r.spec.base < spec.base + spec.len
            }) {
                return Err(Error::BadRegion {
                    base: spec.base,
                    len: spec.len,
                    reason: if other.spec.base == spec.base {
                        "region listed twice"
                    } else {
                        "regions overlap"
                    },
                });
            }
            regions.push(Region {
                spec: *spec,
                first_page: pages,
                mapped: true,
            });
            pages += spec.pages();
        }
        Ok(Self { regions, pages })
    }

    /// Total pages across regions.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    fn page_ref(region: &Region, index_in_region: usize) -> PageRef {
        let spec = &region.spec;
        let in_region = index_in_region * spec.page_size;
        PageRef {
            page: region.first_page + index_in_region,
            addr: spec.base + in_region,
            size: spec.page_size,
            offset: spec.image_offset + in_region as u64,
            resolve: spec.resolve,
            in_region,
            kind: spec.kind,
        }
    }

    /// The page containing `addr`, if a mapped region holds it.
    #[inline]
    pub fn by_addr(&self, addr: usize) -> Option<PageRef> {
        let region = self
            .regions
            .iter()
            .find(|r| r.mapped && addr >= r.spec.base && addr - r.spec.base < r.spec.len)?;
        Some(Self::page_ref(
            region,
            (addr - region.spec.base) / region.spec.page_size,
        ))
    }

    /// Page `page` of the state map, if its region is still mapped.
    #[inline]
    pub fn by_page(&self, page: usize) -> Option<PageRef> {
        let region = self
            .regions
            .iter()
            .find(|r| page >= r.first_page && page - r.first_page < r.spec.pages())?;
        region
            .mapped
            .then(|| Self::page_ref(region, page - region.first_page))
    }

    /// The page holding image offset `offset`, if a mapped region covers it.
    pub fn by_offset(&self, offset: u64) -> Option<PageRef> {
        let region = self.regions.iter().find(|r| {
            r.mapped
                && offset >= r.spec.image_offset
                && offset - r.spec.image_offset < r.spec.len as u64
        })?;
        let index = ((offset - region.spec.image_offset) / region.spec.page_size as u64) as usize;
        Some(Self::page_ref(region, index))
    }

    /// Page-index ranges of the mapped parts of `[start, end)` (for REMOVE).
    pub fn page_ranges(&self, start: usize, end: usize) -> Vec<std::ops::Range<usize>> {
        self.regions
            .iter()
            .filter(|r| r.mapped)
            .filter_map(|r| {
                let lo = start.max(r.spec.base);
                let hi = end.min(r.spec.base + r.spec.len);
                (lo < hi).then(|| {
                    let ps = r.spec.page_size;
                    // Only whole pages were dropped.
                    let first = (lo - r.spec.base).div_ceil(ps);
                    let last = (hi - r.spec.base) / ps;
                    r.first_page + first..r.first_page + last
                })
            })
            .filter(|range| !range.is_empty())
            .collect()
    }

    /// Applies a REMAP: regions inside `[from, from + len)` move by `to - from`.
    pub fn remap(&mut self, from: usize, to: usize, len: usize) {
        for r in &mut self.regions {
            if r.mapped && r.spec.base >= from && r.spec.base + r.spec.len <= from + len {
                r.spec.base = r.spec.base - from + to;
            }
        }
    }

    /// Applies an UNMAP of `[start, end)`: regions it touches stop being served.
    pub fn unmap(&mut self, start: usize, end: usize) {
        for r in &mut self.regions {
            if r.spec.base < end && start < r.spec.base + r.spec.len {
                r.mapped = false;
            }
        }
    }
}
