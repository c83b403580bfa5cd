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

/// How many of the 4 KiB pages of `m` transparent huge pages hold.
pub fn transparent_in(m: &uffd_core::Mapping) -> u64 {
    let end = m.addr() + m.len();
    let bytes = uffd_core::Pagemap::open()
        .and_then(|p| p.huge_bytes(m.addr(), end))
        .expect("PAGEMAP_SCAN");
    bytes / 4096
}

/// Whether every 4 KiB page of `m` is held by a transparent huge page.
pub fn all_transparent(m: &uffd_core::Mapping) -> bool {
    transparent_in(m) == (m.len() / 4096) as u64
}
