//! Test hooks (feature `fault-injection`, for the pager's own tests): kernel calls the
//! kernel never fails for the pager in practice, made to fail on purpose.

use std::sync::atomic::{AtomicUsize, Ordering};

static FAILING_WAKES: AtomicUsize = AtomicUsize::new(0);

/// The next `n` wakes the pager makes fail with EINVAL.
pub fn fail_wakes(n: usize) {
    FAILING_WAKES.store(n, Ordering::SeqCst);
}

/// Whether this wake is one to fail (counts it down).
pub(crate) fn wake_fails() -> bool {
    FAILING_WAKES
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}
