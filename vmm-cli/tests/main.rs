//! The `uffdkit-vmm` program's tests, against the real kernel and /dev/kvm: the library's
//! test helpers (the KVM check, snapshot directories) are shared with `vmm/tests`.

#[path = "../../vmm/tests/common/mod.rs"]
mod common;

mod two_processes;
