//! The CLI's integration tests: one binary, a module per file (one link, not one per
//! file). Each runs the `uffdkit` (or `uffdkit-vmm`) binary as a child; names in the
//! temporary directory are made unique per process by `common::temp`, so two modules must
//! not use the same one.

mod common;
/// The VMM library's test helpers (the KVM check, snapshot directories), for the
/// `uffdkit-vmm` program's test.
#[path = "../../vmm/tests/common/mod.rs"]
mod vmm_common;

mod attacker;
mod cli;
mod diff_layer;
mod fc_handler;
mod image;
mod instruments;
mod migrate;
mod output;
mod partial_outputs;
mod restore;
mod restore_failures;
mod snapshot;
mod tls;
mod vmm_two_processes;
