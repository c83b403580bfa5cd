//! Connection pairs that notice when they die, and the listeners and dialers that make them.
//!
//! A session runs over a [`Pair`] of authenticated connections: *main* (control and the
//! background stream) and *urgent* (requested data, so it never queues behind the
//! stream). While a pair lives, one thread reads each connection and one sends a PING on
//! both every [`Timing::heartbeat`]; every read and write has the [`Timing::silence`]
//! deadline. So a connection that breaks *or goes silent* (a partition: both ends
//! established, nothing flowing) is noticed on both sides within the deadline, and the
//! side that notices cuts both connections, which tells a reachable peer at once.
//!
//! Readers hand the protocol's frames to its [`Inbound`] on their own thread (data is
//! used where it arrives, without a hop) and queue the messages it returns for the
//! protocol's phase logic, which reads the queue with [`Pair::next`]. A broken pair ends
//! in one [`LinkError`]: the first cause.
//!
//! Pairs are made by a [`Dialer`] (with backoff, bounded) or an [`Acceptor`] (which pairs
//! the two connections of one session generation and lets a newer generation supersede
//! the older pair), behind a gate that strangers cannot exhaust.

mod accept;
mod chan;
mod dial;
mod evict;
mod forward;
mod gate;
mod notes;
mod pair;
mod sessions;
mod status;
mod terms;

pub use accept::Acceptor;
pub use chan::{Chan, Sending};
pub use dial::Dialer;
pub use pair::{CutOnDrop, Cutter, Failing, Failure, Inbound, Pair};
pub use sessions::{AcceptStats, Admit, Arrival};
pub use status::LinkStatus;
pub use terms::{Admission, Channel, LinkError, Role, ShutReason, Timing};
