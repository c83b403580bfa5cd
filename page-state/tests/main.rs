//! page-state's integration tests: one binary, a module per file. `loom` keeps its own
//! (built only with `--cfg loom`, by scripts/test).

mod model;
mod threads;
