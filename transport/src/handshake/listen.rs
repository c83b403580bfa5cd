//! The listener's side of the handshake as a state machine that does no I/O: it is fed
//! the bytes a socket brought and says what to send back, so one thread can take many
//! connections through it at once, each costing a buffer, never a thread.
//!
//! What a stranger can make it hold is bounded: a plaintext frame before admission is at
//! most [`MAX_HANDSHAKE_FRAME`] bytes (HELLO, AUTH), rustls bounds its handshake buffers,
//! and plaintext inside TLS before the repeated HELLO is at most a frame.

use std::io::{Read, Write};

use rustls::ServerConnection;
use sha2::{Digest, Sha256};

use super::{other, unexpected, Hello};
use crate::error::Refusal;
use crate::key::{nonce, Transcript};
use crate::link::{Channel, LinkError, Role, ShutReason};
use crate::tls::handshake_error;
use crate::wire::{Control, Protocol};
use crate::{Conn, Error, Security, Socket};

/// The largest body of a frame an opener may send before it is admitted.
pub const MAX_HANDSHAKE_FRAME: usize = 256;

/// What a handshake has come to after the bytes fed so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More bytes are needed (send [`Listening::output`] first).
    More,
    /// The opener proved who it is and said this: now [`Listening::admit`] or
    /// [`Listening::refuse`] it.
    Authenticated(Hello),
}

enum Stage {
    /// Waiting for the opener's HELLO.
    Hello,
    /// Pre-shared key: CHALLENGE sent, AUTH awaited; what was said so far.
    Challenged {
        hello: Hello,
        transcript: Transcript,
    },
    /// TLS: START_TLS sent; the TLS handshake, then the HELLO repeated inside it.
    Tls {
        hello: Hello,
        outer: Control,
        tls: Box<ServerConnection>,
    },
    /// Authenticated; waiting for the verdict. `proof_for` is what was said up to the
    /// opener's AUTH (PSK), which our proof covers.
    Authenticated {
        hello: Hello,
        proof_for: Option<Transcript>,
        tls: Option<Box<ServerConnection>>,
    },
    /// Admitted: [`Listening::into_conn`] once the output is sent.
    Admitted { tls: Option<Box<ServerConnection>> },
    /// Refused or failed.
    Over,
}

/// The listener's side of one connection's handshake.
pub struct Listening {
    protocol: Protocol,
    security: Security,
    peer: Role,
    /// Plaintext frames not yet decoded: the socket's bytes before TLS, the session's
    /// inside it.
    input: Vec<u8>,
    output: Vec<u8>,
    stage: Stage,
    identity: Option<[u8; 32]>,
}

impl std::fmt::Debug for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listening")
            .field("security", &self.security.kind())
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Listening {
    /// A handshake with an opener that must be a `peer` speaking `protocol`, secured as
    /// `security` says.
    pub fn new(protocol: Protocol, security: Security, peer: Role) -> Listening {
        Listening {
            protocol,
            security,
            peer,
            input: Vec::new(),
            output: Vec::new(),
            stage: Stage::Hello,
            identity: None,
        }
    }

    /// Bytes to send to the opener (remove what was sent with [`Listening::sent`]).
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// `n` bytes of the output were sent.
    pub fn sent(&mut self, n: usize) {
        self.output.drain(..n.min(self.output.len()));
    }

    /// With TLS, once authenticated: the SHA-256 of the opener's certificate.
    pub fn identity(&self) -> Option<[u8; 32]> {
        self.identity
    }

    /// The channel the opener named, once it did.
    fn channel(&self) -> Channel {
        match &self.stage {
            Stage::Challenged { hello, .. }
            | Stage::Tls { hello, .. }
            | Stage::Authenticated { hello, .. } => hello.channel,
            _ => Channel::Main,
        }
    }

    /// Takes bytes the socket brought. An error ends the handshake; the output may then
    /// hold the words that tell the opener why (send them, then close).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Progress, Error> {
        let progress = self.step(bytes);
        if progress.is_err() {
            self.stage = Stage::Over;
        }
        progress
    }

    fn step(&mut self, bytes: &[u8]) -> Result<Progress, Error> {
        match &mut self.stage {
            Stage::Tls { .. } => return self.tls_bytes(bytes),
            Stage::Hello | Stage::Challenged { .. } => self.input.extend_from_slice(bytes),
            Stage::Authenticated { .. } | Stage::Admitted { .. } if bytes.is_empty() => {}
            Stage::Authenticated { .. } | Stage::Admitted { .. } => {
                return Err(self.early("nothing before admission"));
            }
            Stage::Over => return Err(LinkError::Cut.into()),
        }
        while let Some(msg) = self.next_frame()? {
            match std::mem::replace(&mut self.stage, Stage::Over) {
                Stage::Hello => self.hello(msg)?,
                Stage::Challenged { hello, transcript } => {
                    return self.auth(hello, transcript, msg);
                }
                _ => unreachable!("only plaintext stages decode here"),
            }
            if let Stage::Tls { .. } = self.stage {
                let rest = std::mem::take(&mut self.input);
                return self.tls_bytes(&rest);
            }
        }
        Ok(Progress::More)
    }

    /// An opener that spoke out of turn.
    fn early(&self, expected: &'static str) -> Error {
        Error::Unexpected {
            expected,
            got: "bytes",
            channel: self.channel(),
        }
    }

    /// The next whole plaintext frame of the input.
    fn next_frame(&mut self) -> Result<Option<Control>, Error> {
        let channel = self.channel();
        match Control::decode_frame(&self.input, MAX_HANDSHAKE_FRAME) {
            Ok(Some((msg, used))) => {
                self.input.drain(..used);
                Ok(Some(msg))
            }
            Ok(None) => Ok(None),
            Err(source) => Err(LinkError::malformed(channel, source).into()),
        }
    }

    /// The opener's HELLO: the role and the security must be ours.
    fn hello(&mut self, msg: Control) -> Result<(), Error> {
        let (hello, theirs) = match Hello::of(&msg, &self.protocol) {
            Some(Ok(said)) => said,
            Some(Err(e)) => return Err(LinkError::malformed(Channel::Main, e).into()),
            None => return Err(unexpected(msg, "HELLO", Channel::Main)),
        };
        let ours = self.security.kind();
        if theirs != ours {
            let detail = format!("this listener speaks {ours}, not {}", other(ours));
            self.shut(ShutReason::SecurityMismatch, &detail);
            return Err(Error::refused(Refusal::SecurityMismatch {
                ours,
                peer: theirs,
            }));
        }
        if hello.role != self.peer {
            let refusal = Refusal::WrongRole {
                got: hello.role,
                want: self.peer,
            };
            self.shut(ShutReason::Error, &refusal.to_string());
            return Err(Error::refused(refusal));
        }
        match &self.security {
            Security::PreSharedKey(_) => {
                let challenge = Control::Challenge { nonce: nonce()? };
                challenge.encode(&mut self.output);
                let mut transcript = Transcript::new();
                transcript.said(&msg);
                transcript.said(&challenge);
                self.stage = Stage::Challenged { hello, transcript };
            }
            Security::Tls(config) => {
                let tls = ServerConnection::new(config.server()).map_err(|source| Error::Tls {
                    what: "start a session",
                    source,
                })?;
                Control::StartTls.encode(&mut self.output);
                self.stage = Stage::Tls {
                    hello,
                    outer: msg,
                    tls: Box::new(tls),
                };
            }
        }
        Ok(())
    }

    /// The opener's AUTH: its proof of the key over what was said (its HELLO as we read
    /// it, our challenge).
    fn auth(
        &mut self,
        hello: Hello,
        mut transcript: Transcript,
        msg: Control,
    ) -> Result<Progress, Error> {
        let Security::PreSharedKey(key) = &self.security else {
            unreachable!("a challenge is only sent with a pre-shared key");
        };
        let Control::Auth { proof, .. } = msg else {
            return Err(unexpected(msg, "AUTH", hello.channel));
        };
        if !key.verify(b"open", &transcript, &proof) {
            self.shut(ShutReason::Auth, "authentication failed: wrong key");
            return Err(Error::refused(Refusal::WrongKey));
        }
        if !self.input.is_empty() {
            return Err(self.early("nothing before AUTH_OK"));
        }
        transcript.said(&msg);
        self.stage = Stage::Authenticated {
            hello,
            proof_for: Some(transcript),
            tls: None,
        };
        Ok(Progress::Authenticated(hello))
    }

    /// Bytes of the TLS session: the handshake, then the repeated HELLO.
    fn tls_bytes(&mut self, mut bytes: &[u8]) -> Result<Progress, Error> {
        let Stage::Tls { hello, outer, tls } = &mut self.stage else {
            unreachable!("called in the TLS stage");
        };
        let channel = hello.channel;
        let expected = match &self.security {
            Security::Tls(config) => config.required_peer_name().unwrap_or_default(),
            Security::PreSharedKey(_) => String::new(),
        };
        let malformed = |what| Error::Unexpected {
            expected: what,
            got: "bytes",
            channel,
        };
        while !bytes.is_empty() {
            let Ok(n) = tls.read_tls(&mut bytes) else {
                return Err(malformed("a TLS record"));
            };
            let processed = tls.process_new_packets();
            let _ = tls.write_tls(&mut self.output); // alerts go out before we close
            if let Err(e) = processed {
                return Err(handshake_error(e, || expected.clone()));
            }
            if n == 0 {
                return Err(LinkError::Closed { channel }.into());
            }
            let mut chunk = [0u8; 1024];
            loop {
                match tls.reader().read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                    Err(_) => break,
                }
                if self.input.len() > MAX_HANDSHAKE_FRAME * 2 {
                    return Err(malformed("a HELLO"));
                }
            }
        }
        let _ = tls.write_tls(&mut self.output);
        if tls.is_handshaking() {
            return Ok(Progress::More);
        }
        let inner = match Control::decode_frame(&self.input, MAX_HANDSHAKE_FRAME) {
            Ok(Some((msg, used))) => {
                self.input.drain(..used);
                msg
            }
            Ok(None) => return Ok(Progress::More),
            Err(source) => return Err(LinkError::malformed(channel, source).into()),
        };
        if &inner != outer || !self.input.is_empty() {
            return Err(malformed("the HELLO sent before TLS, again"));
        }
        self.identity = tls
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|cert| Sha256::digest(cert.as_ref()).into());
        let hello = *hello;
        let Stage::Tls { tls, .. } = std::mem::replace(&mut self.stage, Stage::Over) else {
            unreachable!("in the TLS stage");
        };
        self.stage = Stage::Authenticated {
            hello,
            proof_for: None,
            tls: Some(tls),
        };
        Ok(Progress::Authenticated(hello))
    }

    /// Queues a SHUT for the opener (sealed, once inside TLS).
    fn shut(&mut self, reason: ShutReason, detail: &str) {
        let mut frame = Vec::new();
        let detail = detail.into();
        Control::Shut { reason, detail }.encode(&mut frame);
        self.send(&frame);
    }

    /// Queues `frame` for the opener, through the session once there is one.
    fn send(&mut self, frame: &[u8]) {
        let tls = match &mut self.stage {
            Stage::Tls { tls, .. } => Some(tls),
            Stage::Authenticated { tls, .. } | Stage::Admitted { tls } => tls.as_mut(),
            _ => None,
        };
        match tls {
            Some(tls) => {
                let _ = tls.writer().write_all(frame);
                let _ = tls.write_tls(&mut self.output);
            }
            None => self.output.extend_from_slice(frame),
        }
    }

    /// Admits the authenticated opener: AUTH_OK (with our proof of the key) or ADMITTED.
    pub fn admit(&mut self) -> Result<(), Error> {
        let Stage::Authenticated { proof_for, tls, .. } =
            std::mem::replace(&mut self.stage, Stage::Over)
        else {
            return Err(LinkError::Cut.into());
        };
        let mut frame = Vec::new();
        match (&self.security, proof_for) {
            (Security::PreSharedKey(key), Some(transcript)) => Control::AuthOk {
                proof: key.proof(b"listen", &transcript),
            }
            .encode(&mut frame),
            _ => Control::Admitted.encode(&mut frame),
        }
        self.stage = Stage::Admitted { tls };
        self.send(&frame);
        Ok(())
    }

    /// Refuses the authenticated opener with a SHUT saying why.
    pub fn refuse(&mut self, reason: ShutReason, detail: &str) {
        self.shut(reason, detail);
        self.stage = Stage::Over;
    }

    /// The admitted connection, over `socket` (in blocking mode; the output sent).
    pub fn into_conn(self, socket: Socket) -> Result<Conn, Error> {
        let Stage::Admitted { tls } = self.stage else {
            return Err(LinkError::Cut.into());
        };
        let failed = |source| LinkError::Io {
            channel: Channel::Main,
            source,
        };
        match tls {
            Some(tls) => Conn::tls(socket, (*tls).into()).map_err(failed),
            None => Conn::plain(socket).map_err(failed),
        }
        .map_err(Error::from)
    }
}
