//! The pager's threads: each is spawned named, with a panic caught and recorded as the
//! pager's fatal error, and settles the stop when it leaves. Below every file that starts
//! a thread (the builder, the prefetcher, the fork service).

use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::shared::Shared;

/// Spawns a named pager thread running `f`. A panic in it is caught and recorded as the
/// pager's fatal error ([`Error::ThreadPanicked`]), which stops the pager, poisons what
/// is not placed, and is returned by [`Pager::stop`](crate::Pager::stop); and a thread that leaves settles
/// the stop.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    name: String,
    f: impl FnOnce(&Arc<Shared>) + Send + 'static,
) -> Result<JoinHandle<()>> {
    let shared = shared.clone();
    let thread = name.clone();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let run = std::panic::AssertUnwindSafe(|| f(&shared));
            if let Err(panic) = std::panic::catch_unwind(run) {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(not a string)".into());
                shared.fail(Error::ThreadPanicked { thread, message });
            }
            shared.settle();
        })
        .map_err(|source| Error::Io {
            what: "spawn a pager thread",
            source,
        })
}
