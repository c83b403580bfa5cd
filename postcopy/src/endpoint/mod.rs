//! The two halves every postcopy connection pair has, each written once: the
//! `sender::Sender` (page server sessions, migration source) and the
//! `receiver::Receiver` (page server clients, migration destination).

mod land;
pub(crate) mod receiver;
pub(crate) mod sender;

pub use land::RecvStats;
pub use sender::SendStats;
