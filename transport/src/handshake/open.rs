//! The opener's side of the handshake, with blocking I/O on the dialling thread (each
//! read and write bounded by the socket's deadlines).

use std::io::{self, Read, Write};
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::{refused_by_listener, unexpected, Hello};
use crate::conn::{link_error, Conn};
use crate::error::SecurityKind;
use crate::link::{Channel, LinkError};
use crate::tls::{handshake_error, rustls, rustls_error, TlsConfig};
use crate::wire::{frame_len, Control, Protocol, WireError, HEADER_LEN, MAX_DETAIL};
use crate::{Addr, Error, Security, Socket};

/// Opens `socket` (connected to `addr`, its reads and writes bounded by `deadline`) as
/// the connection `hello` describes, speaking `protocol`, secured as `security` says.
pub(crate) fn open(
    socket: Socket,
    (protocol, security): (&Protocol, &Security),
    hello: Hello,
    addr: &Addr,
    deadline: Duration,
) -> Result<Conn, Error> {
    let failed = |source| LinkError::Io {
        channel: hello.channel,
        source,
    };
    match security {
        Security::PreSharedKey(key) => {
            let mut conn = Conn::plain(socket).map_err(failed)?;
            super::psk::open(
                &mut conn,
                key,
                hello.message(protocol, SecurityKind::PreSharedKey),
            )?;
            Ok(conn)
        }
        Security::Tls(config) => {
            let said = hello.message(protocol, SecurityKind::Tls);
            open_tls(socket, config, (hello.channel, said), (addr, deadline))
        }
    }
}

/// HELLO outside, START_TLS back, the TLS handshake, HELLO inside, ADMITTED back.
fn open_tls(
    mut socket: Socket,
    config: &TlsConfig,
    (channel, said): (Channel, Control),
    (addr, deadline): (&Addr, Duration),
) -> Result<Conn, Error> {
    let mut frame = Vec::new();
    said.encode(&mut frame);
    let io = |e| Error::Link(link_error(channel, deadline, e));
    socket.write_all(&frame).map_err(io)?;
    match read_frame(&mut socket, channel, deadline)? {
        Control::StartTls => {}
        Control::Shut { reason, detail } => {
            return Err(refused_by_listener(SecurityKind::Tls, reason, detail))
        }
        other => return Err(unexpected(other, "START_TLS", channel)),
    }
    let name = config.server_name(addr);
    let mut tls =
        rustls::ClientConnection::new(config.client(), name.clone()).map_err(|source| {
            Error::Tls {
                what: "start a session",
                source,
            }
        })?;
    while tls.is_handshaking() {
        if let Err(e) = tls.complete_io(&mut socket) {
            return Err(failure(e, (channel, deadline), &name));
        }
    }
    let mut conn = Conn::tls(socket, tls.into()).map_err(io)?;
    conn.set_channel(channel);
    // The answer is read even if the send failed: a listener that refused our
    // certificate sent its alert before closing.
    let sent = conn.w.send_control(&said);
    match conn.r.recv_control() {
        Ok(Control::Admitted) => sent.map(|()| conn).map_err(Error::from),
        Ok(Control::Shut { reason, detail }) => {
            Err(refused_by_listener(SecurityKind::Tls, reason, detail))
        }
        Ok(other) => Err(unexpected(other, "ADMITTED", channel)),
        Err(LinkError::Io { source, .. }) if rustls_error(&source).is_some() => {
            Err(failure(source, (channel, deadline), &name))
        }
        Err(e) => Err(sent.err().map_or(e.into(), Error::from)),
    }
}

/// What a failed TLS read or write means: a refusal (a certificate), another TLS error,
/// or a broken link.
fn failure(e: io::Error, (channel, deadline): (Channel, Duration), name: &ServerName<'_>) -> Error {
    match rustls_error(&e) {
        Some(tls) => handshake_error(tls.clone(), || name.to_str().into_owned()),
        None => link_error(channel, deadline, e).into(),
    }
}

/// Reads exactly one plaintext frame (nothing past it: what follows is TLS).
fn read_frame(socket: &mut Socket, channel: Channel, deadline: Duration) -> Result<Control, Error> {
    let max_body = MAX_DETAIL + 64;
    let malformed = |source: WireError| LinkError::malformed(channel, source);
    let io = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => LinkError::Closed { channel },
        _ => link_error(channel, deadline, e),
    };
    let mut buf = vec![0u8; HEADER_LEN];
    socket.read_exact(&mut buf).map_err(io)?;
    let total = frame_len(&buf, max_body)
        .map_err(malformed)?
        .expect("a whole header");
    buf.resize(total, 0);
    socket.read_exact(&mut buf[HEADER_LEN..]).map_err(io)?;
    let (msg, _) = Control::decode_frame(&buf, max_body)
        .map_err(malformed)?
        .expect("a whole frame");
    Ok(msg)
}
