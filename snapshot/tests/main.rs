//! snapshot's integration tests, against the real kernel: one binary, a module per file.

mod common;

mod chain;
mod layered;
mod live;
