//! The transport's integration tests, one binary: the link's messages, the listener's
//! handshake fed by hand, and connection pairs over real sockets.

mod handshake;
mod pair;
mod rewrite;
mod wire;
