//! Regions: the registered address ranges a pager serves, and the mapping between an
//! address, a page index in the pager's state map, and an offset in the image.
//!
//! The table is fixed in size at start; only a region's base (REMAP) and whether it is
//! still mapped (UNMAP) change, and both are atomics. Lookups therefore take no lock and
//! allocate nothing: the fault path, placements and the SIGBUS handler all use them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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

/// A region as the pager tracks it. Orderings: `base` and `mapped` carry no other data
/// (page content is ordered by the page states), so Relaxed would do; Acquire/Release
/// keep a REMAP's new base visible to a thread that saw the REMAP's later effects.
#[derive(Debug)]
pub(crate) struct Region {
    /// What was asked for (`spec.base` is the base at start; see `base`).
    pub spec: RegionSpec,
    /// Index of the region's first page in the pager's page state map.
    pub first_page: usize,
    /// The region's index in its table (what `PageRef::region` names).
    index: usize,
    /// The current base: follows REMAP events.
    base: AtomicUsize,
    /// Cleared by an UNMAP event: the range is gone, its pages are never served again.
    mapped: AtomicBool,
}

impl Region {
    fn base(&self) -> usize {
        self.base.load(Ordering::Acquire)
    }

    fn mapped(&self) -> bool {
        self.mapped.load(Ordering::Acquire)
    }
}

/// Where a page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageRef {
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
    /// The index of the page's region in the table: a run never spans two.
    pub region: usize,
    /// Memory kind.
    pub kind: MemoryKind,
}

impl PageRef {
    /// Whether `other` is the page right after this one in the same region. Adjacency alone
    /// is not enough: the next region may start where this one ends, with other image
    /// offsets, another alias and perhaps another VMA.
    pub fn is_followed_by(&self, other: &PageRef) -> bool {
        other.region == self.region
            && other.page == self.page + 1
            && other.addr == self.addr + self.size
    }
}

/// The regions of one pager, with lock-free lookups by address, page index and offset.
#[derive(Debug)]
pub(crate) struct RegionTable {
    regions: Box<[Region]>,
    pages: usize,
}

impl RegionTable {
    /// Builds the table, checking alignment and overlaps.
    pub fn new(specs: &[RegionSpec]) -> Result<Self> {
        let mut regions: Vec<Region> = Vec::with_capacity(specs.len());
        let mut pages = 0;
        for (index, spec) in specs.iter().enumerate() {
            check(spec, &regions)?;
            regions.push(Region {
                spec: *spec,
                first_page: pages,
                index,
                base: AtomicUsize::new(spec.base),
                mapped: AtomicBool::new(true),
            });
            pages += spec.pages();
        }
        Ok(Self {
            regions: regions.into_boxed_slice(),
            pages,
        })
    }

    /// Total pages across regions.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The smallest page size.
    pub fn min_page_size(&self) -> usize {
        self.regions
            .iter()
            .map(|r| r.spec.page_size)
            .min()
            .unwrap_or(4096)
    }

    /// The largest page size.
    pub fn max_page_size(&self) -> usize {
        self.regions
            .iter()
            .map(|r| r.spec.page_size)
            .max()
            .unwrap_or(4096)
    }

    fn page_ref(region: &Region, base: usize, index_in_region: usize) -> PageRef {
        let spec = &region.spec;
        let in_region = index_in_region * spec.page_size;
        PageRef {
            page: region.first_page + index_in_region,
            addr: base + in_region,
            size: spec.page_size,
            offset: spec.image_offset + in_region as u64,
            resolve: spec.resolve,
            in_region,
            kind: spec.kind,
            region: region.index,
        }
    }

    /// The page containing `addr`, if a mapped region holds it.
    #[inline]
    pub fn by_addr(&self, addr: usize) -> Option<PageRef> {
        self.regions.iter().find_map(|r| {
            let base = r.base();
            (r.mapped() && addr >= base && addr - base < r.spec.len)
                .then(|| Self::page_ref(r, base, (addr - base) / r.spec.page_size))
        })
    }

    /// Whether any region (mapped or not: its range may be mapped again) overlaps
    /// `[start, start + len)`.
    pub fn overlaps(&self, start: usize, len: usize) -> bool {
        self.regions.iter().any(|r| {
            let base = r.base();
            start < base + r.spec.len && base < start + len
        })
    }

    /// Page `page` of the state map, if its region is still mapped.
    #[inline]
    pub fn by_page(&self, page: usize) -> Option<PageRef> {
        let region = self
            .regions
            .iter()
            .find(|r| page >= r.first_page && page - r.first_page < r.spec.pages())?;
        region
            .mapped()
            .then(|| Self::page_ref(region, region.base(), page - region.first_page))
    }

    /// The page holding image offset `offset`, if a mapped region covers it.
    pub fn by_offset(&self, offset: u64) -> Option<PageRef> {
        let region = self.regions.iter().find(|r| {
            r.mapped()
                && offset >= r.spec.image_offset
                && offset - r.spec.image_offset < r.spec.len as u64
        })?;
        let index = ((offset - region.spec.image_offset) / region.spec.page_size as u64) as usize;
        Some(Self::page_ref(region, region.base(), index))
    }

    /// The page range (in the state map) of the region holding page `page`.
    pub fn pages_of_region(&self, page: usize) -> Option<std::ops::Range<usize>> {
        self.regions
            .iter()
            .find(|r| page >= r.first_page && page - r.first_page < r.spec.pages())
            .map(|r| r.first_page..r.first_page + r.spec.pages())
    }

    /// The regions as they are now: each still mapped region's spec at its current base
    /// (after REMAP events), for a forked child, whose address space is the parent's now.
    pub fn current_specs(&self) -> Vec<RegionSpec> {
        self.regions
            .iter()
            .filter(|r| r.mapped())
            .map(|r| RegionSpec {
                base: r.base(),
                ..r.spec
            })
            .collect()
    }

    /// The page ranges of the regions an UNMAP took away.
    pub fn unmapped(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.regions
            .iter()
            .filter(|r| !r.mapped())
            .map(|r| r.first_page..r.first_page + r.spec.pages())
    }

    /// Calls `f(kind of region, page range)` for the whole pages of the mapped parts of
    /// `[start, end)` (a REMOVE), allocating nothing.
    pub fn for_each_page_range(
        &self,
        start: usize,
        end: usize,
        mut f: impl FnMut(&Region, std::ops::Range<usize>),
    ) {
        for r in self.regions.iter().filter(|r| r.mapped()) {
            let base = r.base();
            let lo = start.max(base);
            let hi = end.min(base + r.spec.len);
            if lo >= hi {
                continue;
            }
            let ps = r.spec.page_size;
            // Only whole pages were dropped.
            let first = (lo - base).div_ceil(ps);
            let last = (hi - base) / ps;
            if first < last {
                f(r, r.first_page + first..r.first_page + last);
            }
        }
    }

    /// Applies a REMAP: regions inside `[from, from + len)` move by `to - from`.
    pub fn remap(&self, from: usize, to: usize, len: usize) {
        for r in self.regions.iter().filter(|r| r.mapped()) {
            let base = r.base();
            if base >= from && base + r.spec.len <= from + len {
                r.base.store(base - from + to, Ordering::Release);
            }
        }
    }

    /// Applies an UNMAP of `[start, end)`: regions it touches stop being served.
    pub fn unmap(&self, start: usize, end: usize) {
        for r in self.regions.iter() {
            let base = r.base();
            if base < end && start < base + r.spec.len {
                r.mapped.store(false, Ordering::Release);
            }
        }
    }
}

/// Refuses a spec that is misaligned or overlaps one already in `regions`.
fn check(spec: &RegionSpec, regions: &[Region]) -> Result<()> {
    let bad = |reason| {
        Err(Error::BadRegion {
            base: spec.base,
            len: spec.len,
            reason,
        })
    };
    let ps = spec.page_size;
    if !ps.is_power_of_two() || spec.len == 0 || spec.len % ps != 0 || spec.base % ps != 0 {
        return bad("base and length must be non-zero multiples of the page size");
    }
    if spec.image_offset % ps as u64 != 0 {
        return bad("image offset must be page aligned");
    }
    // Every later sum of a base or an image offset with a length stays below these.
    if spec.base.checked_add(spec.len).is_none() {
        return bad("wraps around the address space");
    }
    if spec.image_offset.checked_add(spec.len as u64).is_none() {
        return bad("its image range passes 2^64 bytes");
    }
    if let Some(other) = regions
        .iter()
        .find(|r| spec.base < r.spec.base + r.spec.len && r.spec.base < spec.base + spec.len)
    {
        return bad(if other.spec.base == spec.base {
            "region listed twice"
        } else {
            "regions overlap"
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RegionTable {
        RegionTable::new(&[
            RegionSpec::new(0x10_0000, 4 * 4096, MemoryKind::Anon, 0),
            RegionSpec::new(0x20_0000, 2 * 4096, MemoryKind::Anon, 4 * 4096),
        ])
        .expect("valid")
    }

    #[test]
    fn lookups_by_address_page_and_offset_agree() {
        let t = table();
        let p = t.by_addr(0x20_0000 + 4097).expect("in the second region");
        assert_eq!((p.page, p.addr, p.offset), (5, 0x20_1000, 5 * 4096));
        assert_eq!(t.by_page(5), Some(p));
        assert_eq!(t.by_offset(5 * 4096 + 12), Some(p));
        assert!(t.by_addr(0x20_0000 + 2 * 4096).is_none());
        assert!(t.by_page(6).is_none());
    }

    #[test]
    fn the_last_page_of_a_region_is_not_followed_by_the_first_of_an_adjacent_one() {
        let t = RegionTable::new(&[
            RegionSpec::new(0x10_0000, 2 * 4096, MemoryKind::Anon, 0),
            RegionSpec::new(0x10_2000, 2 * 4096, MemoryKind::Anon, 8 * 4096),
        ])
        .expect("valid");
        let (last, next) = (t.by_page(1).expect("page 1"), t.by_page(2).expect("page 2"));
        assert_eq!(
            last.addr + last.size,
            next.addr,
            "adjacent in the address space"
        );
        assert!(!last.is_followed_by(&next));
        assert!(t.by_page(0).expect("page 0").is_followed_by(&last));
    }

    #[test]
    fn remap_moves_and_unmap_hides_a_region() {
        let t = table();
        t.remap(0x10_0000, 0x40_0000, 4 * 4096);
        assert_eq!(t.by_page(1).map(|p| p.addr), Some(0x40_1000));
        assert!(t.by_addr(0x10_1000).is_none());
        t.unmap(0x40_0000, 0x40_1000);
        assert!(
            t.by_page(1).is_none(),
            "a region touched by UNMAP is gone whole"
        );
        let mut seen = Vec::new();
        t.for_each_page_range(0, usize::MAX, |_, r| seen.push(r));
        assert_eq!(seen, vec![4..6]);
        let now: Vec<_> = t.current_specs().iter().map(|s| s.base).collect();
        assert_eq!(
            now,
            vec![0x20_0000],
            "a child gets the regions still mapped, where they are"
        );
    }

    #[test]
    fn overlapping_or_misaligned_regions_are_refused() {
        let overlap = RegionTable::new(&[
            RegionSpec::new(0x10_0000, 2 * 4096, MemoryKind::Anon, 0),
            RegionSpec::new(0x10_1000, 2 * 4096, MemoryKind::Anon, 0),
        ]);
        assert!(matches!(
            overlap,
            Err(Error::BadRegion {
                reason: "regions overlap",
                ..
            })
        ));
        let misaligned = RegionTable::new(&[RegionSpec::new(0x10_0001, 4096, MemoryKind::Anon, 0)]);
        assert!(misaligned.is_err());
    }
}
