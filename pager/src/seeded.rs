//! The debug check of a seeded page-state map ([`PagerBuilder::check_seeded`]): a page
//! seeded Received is one the pager will never serve, so if it is not in memory it reads
//! as zeros forever. `PAGEMAP_SCAN` (Linux 6.7) finds the pages of each region that are
//! neither present nor swapped out; none of them may be seeded Received.
//!
//! [`PagerBuilder::check_seeded`]: crate::PagerBuilder::check_seeded

use page_state::PageState;
use uffd_core::{PageCategories, PageRegion, Pagemap, ScanFlags, ScanQuery};

use crate::error::{Error, Result};
use crate::region::Resolve;
use crate::shared::Shared;

/// Refuses a seeded map with a Received page that is not in memory. Regions resolved in
/// MINOR mode are skipped (their pages live in the page cache, mapped or not).
pub(crate) fn check_received(shared: &Shared) -> Result<()> {
    if shared.states.count(PageState::Received) == 0 {
        return Ok(());
    }
    let pagemap = match Pagemap::open() {
        Ok(p) => p,
        Err(e) => {
            log::debug!("seeded page states not checked: {e}");
            return Ok(());
        }
    };
    // Pages that are neither present nor swapped: invert both, require both.
    let absent = PageCategories::PRESENT | PageCategories::SWAPPED;
    let query = ScanQuery {
        flags: ScanFlags::empty(),
        inverted: absent,
        mask: absent,
        any_of: PageCategories::empty(),
        report: PageCategories::empty(),
        max_pages: 0,
    };
    let mut out = vec![PageRegion::default(); 256];
    for r in shared.regions.regions() {
        if r.spec.resolve != Resolve::Copy {
            continue;
        }
        let (mut at, end) = (r.spec.base, r.spec.base + r.spec.len);
        while at < end {
            let (n, walked) = match pagemap.scan(at, end, &query, &mut out) {
                Ok(done) => done,
                Err(e) => {
                    log::debug!("seeded page states not checked: {e}");
                    return Ok(());
                }
            };
            for run in &out[..n] {
                let (lo, hi) = (run.start as usize, run.end as usize);
                let ps = r.spec.page_size;
                for addr in (lo - lo % ps..hi).step_by(ps) {
                    let page = r.first_page + (addr - r.spec.base) / ps;
                    if shared.states.get(page) == Ok(PageState::Received) {
                        return Err(Error::SeededNotPresent { page, addr });
                    }
                }
            }
            if walked <= at {
                break;
            }
            at = walked;
        }
    }
    Ok(())
}
