//! Regions to snapshot, and the numbering of their pages: every page of every region has
//! one index (regions in address order, pages in order within each), which the saved and
//! claimed bitmaps are indexed by; and the image offset each page is saved at.

use uffd_core::MemoryKind;

use crate::error::{Error, Result};

/// A range of memory to snapshot and where it goes in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Start address, in the address space the snapshot reads (this process's or
    /// another's).
    pub addr: usize,
    /// Length in bytes: a multiple of the page size.
    pub len: usize,
    /// What backs it (sets the page size: 4 KiB, or 2 MiB for hugetlb).
    pub kind: MemoryKind,
    /// Offset of the region's first byte in the image.
    pub offset: u64,
}

impl Region {
    /// `len` bytes of `kind` memory at `addr`, saved at image offset `offset`.
    pub fn new(addr: usize, len: usize, kind: MemoryKind, offset: u64) -> Self {
        Self {
            addr,
            len,
            kind,
            offset,
        }
    }

    /// The page size.
    pub fn page_size(&self) -> usize {
        self.kind.page_size()
    }

    /// Pages in the region.
    pub fn pages(&self) -> usize {
        self.len / self.page_size()
    }
}

/// A region with the index of its first page.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Numbered {
    pub region: Region,
    pub first: usize,
}

/// A page by index: its address, image offset and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Page {
    pub index: usize,
    pub addr: usize,
    pub offset: u64,
    pub size: usize,
}

/// A run of pages of one region, saved together by a background worker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batch {
    pub region: usize,
    /// First page, as an index into the region.
    pub start: usize,
    pub count: usize,
}

/// The regions, numbered, in address order.
#[derive(Debug)]
pub(crate) struct Regions {
    list: Vec<Numbered>,
    pages: usize,
    image_len: u64,
}

impl Regions {
    /// Checks and numbers `regions`: each page aligned and non-empty, none overlapping
    /// another in memory or in the image.
    pub fn new(regions: &[Region]) -> Result<Regions> {
        if regions.is_empty() {
            return Err(Error::Region {
                index: 0,
                reason: "no region given",
            });
        }
        for (index, r) in regions.iter().enumerate() {
            let ps = r.page_size();
            let bad = |reason| Err(Error::Region { index, reason });
            if r.len == 0 {
                return bad("empty");
            }
            if r.addr % ps != 0 || r.len % ps != 0 || r.offset % ps as u64 != 0 {
                return bad("address, length and image offset must be multiples of its page size");
            }
            if r.addr.checked_add(r.len).is_none() {
                return bad("wraps around the address space");
            }
            if r.offset.checked_add(r.len as u64).is_none() {
                return bad("its image range passes 2^64 bytes");
            }
        }
        let mut sorted: Vec<(usize, Region)> = regions.iter().copied().enumerate().collect();
        sorted.sort_by_key(|(_, r)| r.addr);
        for w in sorted.windows(2) {
            if w[0].1.addr + w[0].1.len > w[1].1.addr {
                return Err(Error::Region {
                    index: w[1].0,
                    reason: "overlaps another region",
                });
            }
        }
        let mut by_offset = sorted.clone();
        by_offset.sort_by_key(|(_, r)| r.offset);
        for w in by_offset.windows(2) {
            if w[0].1.offset + w[0].1.len as u64 > w[1].1.offset {
                return Err(Error::Region {
                    index: w[1].0,
                    reason: "its image range overlaps another region's",
                });
            }
        }
        let mut first = 0;
        let list = sorted
            .into_iter()
            .map(|(_, region)| {
                let n = Numbered { region, first };
                first += region.pages();
                n
            })
            .collect::<Vec<_>>();
        let image_len = list
            .iter()
            .map(|n| n.region.offset + n.region.len as u64)
            .max()
            .unwrap_or(0);
        Ok(Regions {
            list,
            pages: first,
            image_len,
        })
    }

    /// The regions in address order.
    pub fn list(&self) -> &[Numbered] {
        &self.list
    }

    /// Pages in all regions.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Bytes in all regions.
    pub fn bytes(&self) -> u64 {
        self.list.iter().map(|n| n.region.len as u64).sum()
    }

    /// The image length the regions need (the furthest offset + length).
    pub fn image_len(&self) -> u64 {
        self.image_len
    }

    /// The largest page size.
    pub fn max_page_size(&self) -> usize {
        self.list
            .iter()
            .map(|n| n.region.page_size())
            .max()
            .unwrap_or(4096)
    }

    /// The page holding `addr`, if a region does.
    pub fn page_at(&self, addr: usize) -> Option<Page> {
        let i = self
            .list
            .partition_point(|n| n.region.addr + n.region.len <= addr);
        let n = self.list.get(i)?;
        if addr < n.region.addr {
            return None;
        }
        let ps = n.region.page_size();
        let k = (addr - n.region.addr) / ps;
        Some(self.page(i, k))
    }

    /// The page numbered `index` (below [`Regions::pages`]) and its region's position.
    pub fn locate(&self, index: usize) -> (usize, Page) {
        let i = self
            .list
            .partition_point(|n| n.first + n.region.pages() <= index);
        (i, self.page(i, index - self.list[i].first))
    }

    /// Page `k` of region `i`.
    pub fn page(&self, i: usize, k: usize) -> Page {
        let n = &self.list[i];
        let ps = n.region.page_size();
        Page {
            index: n.first + k,
            addr: n.region.addr + k * ps,
            offset: n.region.offset + (k * ps) as u64,
            size: ps,
        }
    }

    /// The regions cut into batches of at most `bytes` (at least one page each).
    pub fn batches(&self, bytes: usize) -> Vec<Batch> {
        let mut out = Vec::new();
        for (i, n) in self.list.iter().enumerate() {
            let per = (bytes / n.region.page_size()).max(1);
            let pages = n.region.pages();
            let mut start = 0;
            while start < pages {
                let count = per.min(pages - start);
                out.push(Batch {
                    region: i,
                    start,
                    count,
                });
                start += count;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_numbered_in_address_order_and_found_by_address() {
        let r = Regions::new(&[
            Region::new(0x20_0000, 0x3000, MemoryKind::Anon, 0x10_0000),
            Region::new(0x10_0000, 0x2000, MemoryKind::Anon, 0),
        ])
        .unwrap();
        assert_eq!(r.pages(), 5);
        assert_eq!(r.image_len(), 0x10_3000);
        let p = r.page_at(0x20_1234).unwrap();
        assert_eq!((p.index, p.addr, p.offset), (3, 0x20_1000, 0x10_1000));
        assert!(r.page_at(0x10_2000).is_none(), "between regions");
        assert!(r.page_at(0x20_3000).is_none(), "after the last");
        assert_eq!(r.locate(3), (1, p));
        assert_eq!(r.locate(1).1.addr, 0x10_1000);
        let b = r.batches(0x2000);
        assert_eq!(b.len(), 3, "2 pages, then 2 + 1");
    }

    /// An image range that passes 2^64 bytes is refused: its end was summed without a
    /// check (an overflow panic in debug builds; in release builds the image length
    /// wrapped and two regions' image ranges could overlap unseen).
    #[test]
    fn a_region_whose_image_range_wraps_around_is_refused() {
        let last = u64::MAX - 0xfff;
        let regions = [
            Region::new(0x1000, 0x2000, MemoryKind::Anon, last),
            Region::new(0x9000, 0x1000, MemoryKind::Anon, 0),
        ];
        match Regions::new(&regions) {
            Err(Error::Region { index: 0, reason }) => {
                assert!(reason.contains("image"), "{reason}")
            }
            other => panic!("accepted or refused otherwise: {other:?}"),
        }
    }

    #[test]
    fn bad_regions_are_refused_with_their_index() {
        let anon = MemoryKind::Anon;
        for (regions, index) in [
            (vec![Region::new(0x1000, 0, anon, 0)], 0),
            (vec![Region::new(0x1001, 0x1000, anon, 0)], 0),
            (
                vec![
                    Region::new(0x1000, 0x2000, anon, 0),
                    Region::new(0x2000, 0x1000, anon, 0x10000),
                ],
                1,
            ),
            (
                vec![
                    Region::new(0x1000, 0x2000, anon, 0),
                    Region::new(0x9000, 0x1000, anon, 0x1000),
                ],
                1,
            ),
        ] {
            match Regions::new(&regions) {
                Err(Error::Region { index: i, .. }) => assert_eq!(i, index, "{regions:?}"),
                other => panic!("{regions:?} accepted: {other:?}"),
            }
        }
    }
}
