//! The read-only view of the page states an embedder and a remote source get
//! ([`Pager::states`](crate::Pager::states), [`Placer::states`](crate::Placer::states)).

use page_state::{PageState, PageStateMap};

/// A read-only view of a pager's page states (see [`Pager::states`](crate::Pager::states)): the engine owns
/// the map, and only it changes states.
#[derive(Debug, Clone, Copy)]
pub struct PageStates<'a> {
    pub(crate) map: &'a PageStateMap,
}

impl PageStates<'_> {
    /// Pages served, across regions in order.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no page is served.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Page `page`'s state; `None` beyond the end.
    pub fn get(&self, page: usize) -> Option<PageState> {
        self.map.get(page).ok()
    }

    /// Pages in `state`.
    pub fn count(&self, state: PageState) -> usize {
        self.map.count(state)
    }

    /// Every page's state, in order.
    pub fn iter(&self) -> impl Iterator<Item = PageState> + '_ {
        self.map.states()
    }

    /// The runs of consecutive pages in `state`, in order: what a remote source asks for
    /// again on a new connection (its Requested runs), say.
    pub fn runs(&self, state: PageState) -> Vec<std::ops::Range<usize>> {
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, _) in self.iter().enumerate().filter(|&(_, s)| s == state) {
            match runs.last_mut() {
                Some(r) if r.end == i => r.end += 1,
                _ => runs.push(i..i + 1),
            }
        }
        runs
    }

    /// The present set (Received ∪ Zero) as a bitmap, 64 pages per word: what a migration
    /// destination reports on resume.
    pub fn export_present(&self) -> Vec<u64> {
        self.map.export_present()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_the_maximal_stretches_of_one_state_in_order() {
        let map = PageStateMap::new(10);
        for p in [0, 1, 4, 5, 6, 9] {
            map.request(p).unwrap();
        }
        map.mark_received(5).unwrap();
        let states = PageStates { map: &map };
        assert_eq!(states.runs(PageState::Requested), [0..2, 4..5, 6..7, 9..10]);
        assert_eq!(states.runs(PageState::Received), vec![5..6usize]);
        assert_eq!(states.runs(PageState::Missing), [2..4, 7..9]);
        assert!(states.runs(PageState::Zero).is_empty());
    }
}
