//! Which connection at the gate makes room for a newcomer: the rule the gate's module
//! doc argues, as a function of what the gate knows of each connection (where it comes
//! from, how far it got) and of draws no stranger can predict.

use std::collections::HashMap;
use std::net::IpAddr;

use sha2::{Digest, Sha256};

use crate::{Error, Socket};

/// Where a connection comes from, as far as its peer cannot choose it: TCP's handshake
/// proves the address (an IPv4 address; an IPv6 /64, which one host or site gets whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Source {
    /// An IPv4 address.
    V4([u8; 4]),
    /// An IPv6 /64.
    V6([u8; 8]),
    /// A Unix socket's peer (local: one source for all), or an address unread.
    Other,
}

impl Source {
    /// The source of an accepted connection.
    pub(super) fn of(socket: &Socket) -> Source {
        let Socket::Tcp(s) = socket else {
            return Source::Other;
        };
        match s.peer_addr().map(|a| a.ip().to_canonical()) {
            Ok(IpAddr::V4(a)) => Source::V4(a.octets()),
            Ok(IpAddr::V6(a)) => {
                let o = a.octets();
                Source::V6(o[..8].try_into().expect("8 of 16 bytes"))
            }
            Err(_) => Source::Other,
        }
    }
}

/// How far a connection at the gate got, in the order connections are closed to make
/// room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    /// Refused: only its last words are left to send.
    Refused,
    /// In its handshake, and the gate has polled it since it came and heard nothing.
    Silent,
    /// In its handshake, and it has sent something (which proves nothing).
    Unproven,
    /// Authenticated and admitted: its answer is being sent.
    Admitted,
}

/// Which of `pending` (oldest first: each one's source and standing) to close to make
/// room, if any: the oldest refused; else, among the connections in their handshake of
/// the sources holding the most of them, the oldest silent one or else one drawn
/// uniformly at random; else the oldest.
pub(super) fn victim(pending: &[(Source, Standing)], draw: &mut Draw) -> Option<usize> {
    if let Some(i) = pending.iter().position(|p| p.1 == Standing::Refused) {
        return Some(i);
    }
    let shaking = |s: Standing| matches!(s, Standing::Silent | Standing::Unproven);
    let mut held: HashMap<Source, usize> = HashMap::new();
    for (source, _) in pending.iter().filter(|p| shaking(p.1)) {
        *held.entry(*source).or_default() += 1;
    }
    let Some(&most) = held.values().max() else {
        return (!pending.is_empty()).then_some(0);
    };
    let theirs = |p: &(Source, Standing)| shaking(p.1) && held[&p.0] == most;
    if let Some(i) = (pending.iter()).position(|p| theirs(p) && p.1 == Standing::Silent) {
        return Some(i);
    }
    let drawn = draw.below(pending.iter().filter(|p| theirs(p)).count());
    let mut candidates = pending.iter().enumerate().filter(|(_, p)| theirs(p));
    candidates.nth(drawn).map(|(i, _)| i)
}

/// Draws no stranger can predict: SHA-256 of a secret seed and a counter, so one that
/// watches which of its connections are closed learns nothing of the next draw.
pub(super) struct Draw {
    seed: [u8; 32],
    count: u64,
}

impl Draw {
    /// Seeded from the system's randomness.
    pub(super) fn new() -> Result<Draw, Error> {
        Ok(Draw {
            seed: crate::key::nonce()?,
            count: 0,
        })
    }

    /// Uniform in `0..n` (0 when `n` is 0); a 64-bit draw modulo `n`, biased by less than
    /// `n / 2^64`.
    pub(super) fn below(&mut self, n: usize) -> usize {
        self.count += 1;
        let h = Sha256::new()
            .chain_update(self.seed)
            .chain_update(self.count.to_le_bytes())
            .finalize();
        let x = u64::from_le_bytes(h[..8].try_into().expect("8 of 32 bytes"));
        (x % n.max(1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::{victim, Draw, Source, Standing};
    use Standing::{Admitted, Refused, Silent, Unproven};

    const FLOOD: Source = Source::V4([192, 0, 2, 1]);
    const CLIENT: Source = Source::V4([198, 51, 100, 7]);

    fn draw() -> Draw {
        Draw {
            seed: [7; 32],
            count: 0,
        }
    }

    #[test]
    fn a_refused_connection_goes_first_then_the_oldest_silent_one() {
        let pending = [
            (CLIENT, Unproven),
            (FLOOD, Silent),
            (FLOOD, Refused),
            (FLOOD, Silent),
        ];
        assert_eq!(victim(&pending, &mut draw()), Some(2));
        assert_eq!(victim(&pending[..2], &mut draw()), Some(1));
    }

    #[test]
    fn the_source_holding_the_most_makes_room_whatever_its_connections_sent() {
        let mut pending = vec![(CLIENT, Unproven), (CLIENT, Silent)];
        pending.extend([(FLOOD, Unproven); 3]);
        let mut d = draw();
        for _ in 0..1000 {
            let i = victim(&pending, &mut d).expect("a victim");
            assert_eq!(pending[i].0, FLOOD, "{i}");
        }
    }

    #[test]
    fn among_equals_the_draw_is_uniform_and_the_oldest_is_not_singled_out() {
        let pending = [(FLOOD, Unproven); 4];
        let mut d = draw();
        let mut hits = [0u32; 4];
        for _ in 0..8000 {
            hits[victim(&pending, &mut d).expect("a victim")] += 1;
        }
        // 2 000 each expected; a standard deviation is ~39.
        assert!(hits.iter().all(|&h| (1700..2300).contains(&h)), "{hits:?}");
    }

    #[test]
    fn an_admitted_connection_goes_only_when_nothing_else_is_left() {
        let pending = [(CLIENT, Admitted), (FLOOD, Unproven)];
        assert_eq!(victim(&pending, &mut draw()), Some(1));
        assert_eq!(victim(&pending[..1], &mut draw()), Some(0));
        assert_eq!(victim(&[], &mut draw()), None);
    }

    #[test]
    fn an_ipv4_mapped_peer_is_its_ipv4_source() {
        let l = std::net::TcpListener::bind("[::]:0").expect("a dual-stack listener");
        let port = l.local_addr().expect("addr").port();
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (s, _) = l.accept().expect("accept");
        let source = Source::of(&crate::Socket::Tcp(s));
        assert_eq!(source, Source::V4([127, 0, 0, 1]));
    }
}
