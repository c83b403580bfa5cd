//! uffd-core's integration tests, against the real kernel: one binary, a module per
//! file. `sigbus` keeps a binary of its own (it installs a process-wide SIGBUS handler).

mod common;

mod events;
mod fd_passing;
mod handshake;
mod layout;
mod pagemap;
mod placement;
mod register;
mod stress;
