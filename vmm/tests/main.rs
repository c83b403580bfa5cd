//! The VMM's integration tests, against the real kernel and /dev/kvm: one binary, a module
//! per file (one link, not one per file). The SIGBUS restores still get a process of their
//! own (`testkit::isolated`: one SIGBUS-mode pager per process).

mod common;

mod migrate;
mod restore;
mod sources;
