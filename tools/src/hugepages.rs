//! The 2 MiB hugetlb pool, grown by the CLI when a command needs it (`bench --kind
//! hugetlb`, `migrate dest --reserve-hugepages`, `migrate local --page-size 2m`): the
//! libraries only read it, the operator's tool decides to change a system setting.

use uffd_core::hugetlb;

/// The default huge page size's pool (2 MiB on x86-64).
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Tries to have `pages` free 2 MiB pages, growing the pool by the shortfall (needs
/// root); returns how many are free afterwards (0 if the pool cannot be read), which
/// the caller compares with what it needs.
pub fn reserve(pages: usize) -> usize {
    let Ok(free) = hugetlb::free() else {
        log::warn!("cannot read the 2 MiB hugetlb pool");
        return 0;
    };
    if free >= pages {
        return free;
    }
    let target = hugetlb::reserved().unwrap_or(0) + (pages - free);
    match std::fs::write(NR_HUGEPAGES, target.to_string()) {
        Ok(()) => log::info!("grew the 2 MiB hugetlb pool to {target} pages ({NR_HUGEPAGES})"),
        Err(e) => log::warn!("cannot grow {NR_HUGEPAGES} to {target}: {e} (needs root)"),
    }
    hugetlb::free().unwrap_or(0)
}
