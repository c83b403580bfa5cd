//! pager's integration tests, against the real kernel: one binary, a module per file.
//! `sigbus` keeps a binary of its own (its global allocator aborts inside the SIGBUS
//! handler, and it installs process-wide handlers), and so does `injected` (it needs the
//! `fault-injection` feature, which would change every other test's pager).

mod common;

mod balloon;
mod behaviour;
mod content;
mod embedding;
mod failure;
mod fatal;
#[cfg(feature = "firecracker")]
mod firecracker;
mod fork;
mod fork_shared;
mod minor;
mod moving;
mod regions;
mod stop;
mod takeover;
mod unprivileged;
mod waits;
