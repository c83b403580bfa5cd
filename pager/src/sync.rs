//! The atomics of the lock-free parts model-checked with loom (`--cfg loom`): from loom
//! then, from std otherwise.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
