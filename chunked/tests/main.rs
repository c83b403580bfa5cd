//! chunked's integration tests: one binary, a module per file.

mod common;

mod layers;
mod s3;
mod sparse;
