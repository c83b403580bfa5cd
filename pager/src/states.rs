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

    /// The present set (Received ∪ Zero) as a bitmap, 64 pages per word: what a migration
    /// destination reports on resume.
    pub fn export_present(&self) -> Vec<u64> {
        self.map.export_present()
    }
}
