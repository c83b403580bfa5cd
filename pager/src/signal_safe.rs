//! The promise, made with `unsafe`, that lets the SIGBUS delivery mode call a source
//! inside a signal handler.

/// A source's promise that its `fetch` and `prioritize` are async-signal-safe: they answer
/// from memory, without allocating, taking a lock, or making any call that is not
/// async-signal-safe (`signal-safety(7)`), anywhere they reach. In the SIGBUS delivery mode
/// the pager calls them inside the faulting thread's SIGBUS handler, which may have
/// interrupted that thread anywhere: inside the allocator (an allocation then re-enters
/// it, and can corrupt the heap the interrupted code was changing), or holding a lock the
/// source takes (a deadlock). So the promise is made with `unsafe`, like `signal-hook`'s
/// `register`, and never by a safe method returning `true`:
///
/// ```compile_fail,E0407
/// use pager::{Fetched, Source, SourceError};
///
/// struct Allocating;
///
/// impl Source for Allocating {
///     fn len(&self) -> u64 { 4096 }
///     fn fetch<'a>(&'a self, _: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
///         scratch.copy_from_slice(&vec![7u8; scratch.len()]); // allocates
///         Ok(Fetched::Data(scratch))
///     }
///     fn is_signal_safe(&self) -> bool { true } // a safe claim: gone
/// }
/// ```
///
/// ```compile_fail,E0133
/// use pager::{Fetched, SignalSafe, Source, SourceError};
///
/// struct Allocating;
///
/// impl Source for Allocating {
///     fn len(&self) -> u64 { 4096 }
///     fn fetch<'a>(&'a self, _: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
///         scratch.copy_from_slice(&vec![7u8; scratch.len()]); // allocates
///         Ok(Fetched::Data(scratch))
///     }
///     fn signal_safe(&self) -> Option<SignalSafe> {
///         Some(SignalSafe::promise()) // only with `unsafe`, and a SAFETY argument
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalSafe(());

impl SignalSafe {
    /// The promise.
    ///
    /// # Safety
    ///
    /// The source returning it from [`Source::signal_safe`](crate::Source::signal_safe) keeps its `fetch` and
    /// `prioritize` async-signal-safe (see [`SignalSafe`]) for as long as it is used.
    pub const unsafe fn promise() -> SignalSafe {
        SignalSafe(())
    }
}
