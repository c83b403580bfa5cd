//! postcopy's integration tests, against the real kernel and real sockets: one binary, a
//! module per file. `explore` (the fault-schedule explorer) keeps a binary of its own: it
//! parses its own arguments (`--seeds`, `--seed`, `--jobs`).

mod common;

mod admission;
mod device_state;
mod fault_path;
mod flood;
mod headway;
mod lost_acks;
mod migrate;
mod recovery;
mod serve;
mod strangers;
mod tls;
mod wire;
