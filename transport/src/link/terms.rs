//! The vocabulary of links, below any protocol: what a connection carries ([`Channel`]),
//! which end opened it ([`Role`]), why one is shut ([`ShutReason`]), the liveness and
//! admission policy ([`Timing`], [`Admission`]), and why a connection stopped working
//! ([`LinkError`]: always recoverable, a session pauses and resumes on a new pair).
//! The numbers of `Role`, `Channel` and `ShutReason` are their bytes on the wire.

use std::time::Duration;

/// Which end a connection's opener is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// The receiving end (a migration destination, a restore client of a page server).
    Destination = 1,
    /// The sending end (a migration source).
    Source = 2,
}

/// What a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Channel {
    /// Control messages and the background stream.
    Main = 1,
    /// Urgent traffic only (requested data), so it never queues behind the stream.
    Urgent = 2,
}

/// Why a peer shuts a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ShutReason {
    /// The session finished.
    Done = 1,
    /// The peer failed; see the detail text.
    Error = 2,
    /// Authentication failed.
    Auth = 3,
    /// The operator cancelled.
    Cancelled = 4,
    /// One side speaks TLS, the other plaintext with a pre-shared key.
    SecurityMismatch = 5,
    /// The listener serves as many sessions as it may; try again later.
    Busy = 6,
}

impl ShutReason {
    /// Every reason, in the order of their bytes on the wire (1 and up).
    pub const ALL: [ShutReason; 6] = [
        ShutReason::Done,
        ShutReason::Error,
        ShutReason::Auth,
        ShutReason::Cancelled,
        ShutReason::SecurityMismatch,
        ShutReason::Busy,
    ];
}

impl Channel {
    /// `main` or `urgent`.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Main => "main",
            Channel::Urgent => "urgent",
        }
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Liveness and retry policy, shared by every endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Each side sends a PING on every connection this often, so that silence means a
    /// dead link, never an idle one.
    pub heartbeat: Duration,
    /// A connection that brings nothing for this long, or a send that makes no progress
    /// for this long, is broken (as if reset). Also bounds connecting and handshakes.
    pub silence: Duration,
    /// First reconnection delay; doubled per failed attempt up to `max_backoff`.
    pub first_backoff: Duration,
    /// Largest reconnection delay.
    pub max_backoff: Duration,
    /// A side without a working connection for this long (paused, or never connected)
    /// gives up ([`crate::Error::GaveUp`]). A protocol may count from its last progress
    /// instead (postcopy's migration source and restore client do): pairs that connect
    /// and carry nothing then do not keep it going.
    pub give_up_after: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(500),
            silence: Duration::from_secs(3),
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            give_up_after: Duration::from_secs(60),
        }
    }
}

/// What a listener lets strangers hold, and how many sessions it serves: whatever
/// anyone opens, a listener's threads and memory stay bounded.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    /// A connection that has not completed its handshake (and sent everything it was
    /// answered) within this is closed.
    pub handshake_deadline: Duration,
    /// Most connections in their handshake at once; one more closes one of them: a silent
    /// one, else one of the address holding the most, drawn at random. So strangers,
    /// whatever they send, cannot keep an opener out for good: from other addresses they
    /// close their own; from its address, each of its connections survives `n` newcomers
    /// with a probability of about `(1 - 1/max_handshakes)^n`, and its retries get in.
    /// Each costs a socket and a few KiB, never a thread.
    pub max_handshakes: usize,
    /// Most sessions served at once (a page server's clients; a migration destination
    /// takes one). An opener beyond is refused as busy ([`LinkError::Busy`]) and retries;
    /// a session reconnecting is never refused.
    pub max_sessions: usize,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            handshake_deadline: Duration::from_secs(5),
            max_handshakes: 256,
            max_sessions: 64,
        }
    }
}

/// Why a connection of a session stopped working. Always recoverable: the session pauses
/// and resumes on a new connection pair.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Connecting failed (refused, unreachable, timed out).
    #[error("connect to {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing failed (reset, broken pipe, a write that made no progress for
    /// the silence deadline).
    #[error("{channel} connection")]
    Io {
        /// Which connection.
        channel: Channel,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("the peer closed the {channel} connection")]
    Closed {
        /// Which connection.
        channel: Channel,
    },
    /// Nothing arrived for the silence deadline although the peer sends heartbeats:
    /// a partition, a frozen peer, a dead proxy.
    #[error("the {channel} connection was silent for {after:?}")]
    Silent {
        /// Which connection.
        channel: Channel,
        /// The deadline.
        after: Duration,
    },
    /// A frame that does not decode (corrupted or cut in transit).
    #[error("malformed frame on the {channel} connection")]
    Malformed {
        /// Which connection.
        channel: Channel,
        /// What is wrong with it (the protocol's decoder says).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A newer authenticated connection pair of the same session took over.
    #[error("superseded by a newer connection of the same session")]
    Superseded,
    /// An expected answer did not come in time although the connection is alive.
    #[error("waited {after:?} for {expected}, in vain")]
    NoAnswer {
        /// What was awaited, as a noun phrase ("a source", "RECV_BITMAP").
        expected: &'static str,
        /// How long.
        after: Duration,
    },
    /// This side cut the pair (its other connection broke, or it is closing).
    #[error("connection pair cut by this side")]
    Cut,
    /// The listener serves as many sessions as it may (its session cap): try again later.
    #[error("the listener is busy: {detail}")]
    Busy {
        /// The listener's words.
        detail: String,
    },
}

impl LinkError {
    /// A frame on `channel` that the protocol's decoder refused.
    pub fn malformed(
        channel: Channel,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> LinkError {
        LinkError::Malformed {
            channel,
            source: Box::new(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn no_answer_reads_as_a_sentence_whatever_was_awaited() {
        let after = Duration::from_secs(5);
        for (expected, want) in [
            ("a source", "waited 5s for a source, in vain"),
            ("RECV_BITMAP", "waited 5s for RECV_BITMAP, in vain"),
            ("the verdict", "waited 5s for the verdict, in vain"),
        ] {
            assert_eq!(LinkError::NoAnswer { expected, after }.to_string(), want);
        }
    }
}
