//! The 2 MiB hugetlb pool for tests: libraries never grow it behind their user's back;
//! tests (as root) reserve what they need here, and skip loudly when they cannot.

use std::io;

const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

fn read(name: &str) -> io::Result<usize> {
    let text = std::fs::read_to_string(format!("{POOL}/{name}"))?;
    text.trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Makes at least `pages` 2 MiB pages free, growing the pool if allowed (root). Returns
/// the free count afterwards, which can still be short (fragmented memory, no privilege).
pub fn ensure_free(pages: usize) -> io::Result<usize> {
    let free = read("free_hugepages")?;
    if free >= pages {
        return Ok(free);
    }
    let want = read("nr_hugepages")? + (pages - free);
    std::fs::write(format!("{POOL}/nr_hugepages"), want.to_string())?;
    read("free_hugepages")
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
