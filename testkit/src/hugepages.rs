//! The 2 MiB hugetlb pool for tests: libraries never grow it behind their user's back;
//! tests (as root) reserve what they need here, and skip loudly when they cannot.

use std::io;

use uffd_core::hugetlb;

/// Makes at least `pages` 2 MiB pages free, growing the pool if allowed (root). Returns
/// the free count afterwards, which can still be short (fragmented memory, no privilege).
pub fn ensure_free(pages: usize) -> io::Result<usize> {
    let free = hugetlb::free()?;
    if free >= pages {
        return Ok(free);
    }
    let want = hugetlb::reserved()? + (pages - free);
    std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string())?;
    hugetlb::free()
}

/// Whether `pages` free 2 MiB pages can be had for `test` (reserving them as root);
/// if not, reports the skip loudly (see [`crate::skip`]) and returns false.
pub fn available(test: &str, pages: usize) -> bool {
    match ensure_free(pages) {
        Ok(free) if free >= pages => true,
        Ok(free) => {
            crate::skip(
                test,
                &format!("only {free} free 2 MiB huge pages, {pages} needed"),
            );
            false
        }
        Err(e) => {
            crate::skip(
                test,
                &format!("cannot reserve {pages} 2 MiB huge pages: {e}"),
            );
            false
        }
    }
}

/// Pages of the 4 KiB pages of `m` that transparent huge pages hold (`PAGEMAP_SCAN`, which
/// reports each page of a PMD-mapped huge page as huge).
pub fn transparent_in(m: &uffd_core::Mapping) -> u64 {
    use uffd_core::{PageCategories, PageRegion, Pagemap, ScanFlags, ScanQuery};
    let huge = ScanQuery {
        flags: ScanFlags::empty(),
        inverted: PageCategories::empty(),
        mask: PageCategories::HUGE,
        any_of: PageCategories::empty(),
        report: PageCategories::HUGE,
        max_pages: 0,
    };
    let (mut at, end, mut pages) = (m.addr(), m.addr() + m.len(), 0);
    let mut out = vec![PageRegion::default(); 1024];
    while at < end {
        let (found, walked) = Pagemap::open()
            .and_then(|p| p.scan(at, end, &huge, &mut out))
            .expect("PAGEMAP_SCAN");
        pages += out[..found]
            .iter()
            .map(|r| (r.end - r.start) / 4096)
            .sum::<u64>();
        at = walked;
    }
    pages
}

/// Whether every 4 KiB page of `m` is held by a transparent huge page.
pub fn all_transparent(m: &uffd_core::Mapping) -> bool {
    transparent_in(m) == (m.len() / 4096) as u64
}
