//! The opening side of a session: both connections of one generation, authenticated, and
//! the retry loop that ends a pause in a new pair or in a bounded give-up.

use std::time::{Duration, Instant};

use super::{Channel, Failure, LinkError, Role, Timing};
use crate::handshake::{self, Hello};
use crate::wire::Protocol;
use crate::{Addr, Conn, Error, Security, Socket};

/// Opens connection pairs of one session, each attempt a newer generation (so the
/// listener lets it supersede whatever pair of the session it still holds).
pub struct Dialer {
    /// Where.
    pub addr: Addr,
    protocol: Protocol,
    security: Security,
    role: Role,
    /// The session id.
    pub session: u64,
    generation: u32,
    /// Deadlines and backoff.
    pub timing: Timing,
    /// The delay before the next connection: nothing at first and after progress
    /// ([`Dialer::progressed`]), else where the last [`Dialer::connect`] left it.
    backoff: Duration,
}

impl Dialer {
    /// A dialer for a new session of `protocol` with the listener at `addr`.
    pub fn new(
        addr: Addr,
        (protocol, security): (Protocol, Security),
        role: Role,
        timing: Timing,
    ) -> Result<Dialer, Error> {
        Ok(Dialer {
            addr,
            protocol,
            security,
            role,
            session: crate::key::session_id()?,
            generation: 0,
            timing,
            backoff: Duration::ZERO,
        })
    }

    /// Both connections of the next generation, authenticated, with the silence deadline.
    pub fn attempt(&mut self) -> Result<(Conn, Conn), Error> {
        self.generation = self.generation.wrapping_add(1);
        Ok((self.open(Channel::Main)?, self.open(Channel::Urgent)?))
    }

    fn open(&self, channel: Channel) -> Result<Conn, Error> {
        let connect = |source| LinkError::Connect {
            addr: self.addr.to_string(),
            source,
        };
        let silence = self.timing.silence;
        let socket = Socket::connect(&self.addr, silence).map_err(connect)?;
        socket
            .set_deadlines(Some(silence), Some(silence))
            .map_err(connect)?;
        let hello = Hello {
            role: self.role,
            channel,
            session: self.session,
            generation: self.generation,
        };
        let security = (&self.protocol, &self.security);
        let mut conn = handshake::open(socket, security, hello, &self.addr, silence)?;
        conn.set_deadline(silence).map_err(connect)?;
        Ok(conn)
    }

    /// The last pair got somewhere (pages landed): the next connection is tried at once.
    pub fn progressed(&mut self) {
        self.backoff = Duration::ZERO;
    }

    /// Connects and greets until `greet` succeeds. A broken link (connecting, the
    /// handshake, or the greeting) is retried after a delay that doubles from
    /// [`Timing::first_backoff`] up to [`Timing::max_backoff`]. It starts at nothing, and
    /// after a pair that broke without progress ([`Dialer::progressed`] not called since
    /// the last connection) where the last connection left it: pairs that connect and
    /// break at once are not remade in a tight loop; `wait(d)`
    /// spends each delay and says whether to try now (it may end a delay early, hold
    /// attempts back until an operator says so, or fail to abort). Gives up once
    /// [`Timing::give_up_after`] has passed since `since`; any error other than a broken
    /// link (a refusal, a wrong key) ends it at once. `E` is the protocol's error, which
    /// takes the transport's.
    pub fn connect<T, E: Failure + From<Error>>(
        &mut self,
        since: Instant,
        mut wait: impl FnMut(Duration) -> Result<bool, E>,
        mut greet: impl FnMut(Conn, Conn) -> Result<T, E>,
    ) -> Result<T, E> {
        let t = self.timing;
        let next = |d: Duration| (d * 2).clamp(t.first_backoff, t.max_backoff.max(t.first_backoff));
        let mut delay = self.backoff;
        let mut last = None;
        loop {
            loop {
                let left = t.give_up_after.saturating_sub(since.elapsed());
                if left.is_zero() {
                    let last = last.unwrap_or(LinkError::NoAnswer {
                        expected: "a connection",
                        after: t.give_up_after,
                    });
                    log::warn!(
                        "giving up on {} after {:?}: {}",
                        self.addr,
                        t.give_up_after,
                        crate::chain(&last)
                    );
                    return Err(E::from(Error::GaveUp {
                        after: t.give_up_after,
                        last,
                    }));
                }
                if wait(delay.min(left))? {
                    break;
                }
            }
            let attempt = self.attempt().map_err(E::from);
            match attempt.and_then(|(main, urgent)| greet(main, urgent)) {
                Ok(done) => {
                    self.backoff = next(delay);
                    return Ok(done);
                }
                Err(e) => match e.into_link() {
                    Ok(e) => {
                        // The first failure is news; the retries after it are detail.
                        let level = match last {
                            None => log::Level::Info,
                            Some(_) => log::Level::Debug,
                        };
                        let (addr, n, why) = (&self.addr, self.generation, crate::chain(&e));
                        log::log!(level, "connecting to {addr} (attempt {n}): {why}; retrying");
                        last = Some(e);
                    }
                    Err(e) => return Err(e),
                },
            }
            delay = next(delay);
        }
    }
}
