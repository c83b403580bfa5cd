//! The listener's side of the handshake, fed by hand (it does no I/O): what it answers,
//! what it admits, and what it refuses and how it says so.

use transport::handshake::{Hello, Listening, Progress};
use transport::key::Transcript;
use transport::link::{Channel, LinkError, Role, ShutReason};
use transport::wire::{Control, Protocol, WireError, DEFAULT_MAX_BODY};
use transport::{Error, Key, Refusal, SecurityKind};

const PROTOCOL: Protocol = Protocol {
    magic: *b"TESTPROT",
    version: 3,
    features: 0b101,
};

const HELLO: Hello = Hello {
    role: Role::Source,
    channel: Channel::Urgent,
    session: 42,
    generation: 2,
};

fn key() -> Key {
    Key::new(*b"a key of twenty-four b..").unwrap()
}

fn listening() -> Listening {
    Listening::new(PROTOCOL, key().into(), Role::Source)
}

fn bytes(msg: &Control) -> Vec<u8> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    out
}

/// The one message the listener answered, taking it from its output.
fn answer(shake: &mut Listening) -> Control {
    let out = shake.output().to_vec();
    let (msg, used) = Control::decode_frame(&out, DEFAULT_MAX_BODY)
        .expect("a valid frame")
        .expect("a whole frame");
    assert_eq!(used, out.len(), "one message");
    shake.sent(used);
    msg
}

#[test]
fn a_pre_shared_key_opener_is_challenged_authenticated_and_admitted_with_a_proof() {
    let mut shake = listening();
    let hello = bytes(&HELLO.message(&PROTOCOL, SecurityKind::PreSharedKey));
    // Cut anywhere, the HELLO is only taken once whole.
    assert_eq!(shake.feed(&hello[..5]).unwrap(), Progress::More);
    assert!(shake.output().is_empty());
    assert_eq!(shake.feed(&hello[5..]).unwrap(), Progress::More);
    let challenge = answer(&mut shake);
    assert!(
        matches!(challenge, Control::Challenge { .. }),
        "a CHALLENGE"
    );
    let mut said = Transcript::new();
    said.said(&HELLO.message(&PROTOCOL, SecurityKind::PreSharedKey));
    said.said(&challenge);
    let auth = Control::Auth {
        proof: key().proof(b"open", &said),
        nonce: [9u8; 32],
    };
    said.said(&auth);
    assert_eq!(
        shake.feed(&bytes(&auth)).unwrap(),
        Progress::Authenticated(HELLO)
    );
    shake.admit().unwrap();
    let Control::AuthOk { proof } = answer(&mut shake) else {
        panic!("AUTH_OK");
    };
    assert!(key().verify(b"listen", &said, &proof));
}

#[test]
fn a_wrong_key_is_refused_with_a_shut_saying_so() {
    let mut shake = listening();
    shake
        .feed(&bytes(
            &HELLO.message(&PROTOCOL, SecurityKind::PreSharedKey),
        ))
        .unwrap();
    let mut said = Transcript::new();
    said.said(&HELLO.message(&PROTOCOL, SecurityKind::PreSharedKey));
    said.said(&answer(&mut shake));
    let other = Key::new(*b"another key, also long!!").unwrap();
    let auth = Control::Auth {
        proof: other.proof(b"open", &said),
        nonce: [0; 32],
    };
    let err = shake.feed(&bytes(&auth)).unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::WrongKey), "{err}");
    assert!(matches!(
        answer(&mut shake),
        Control::Shut {
            reason: ShutReason::Auth,
            ..
        }
    ));
    // Over once failed.
    assert!(shake.feed(&[]).is_err());
}

#[test]
fn another_protocol_or_version_is_malformed_and_gets_no_answer() {
    for (magic, version, want) in [
        (*b"OTHERPRO", PROTOCOL.version, WireError::BadMagic),
        (
            PROTOCOL.magic,
            PROTOCOL.version + 1,
            WireError::BadVersion {
                theirs: PROTOCOL.version + 1,
                ours: PROTOCOL.version,
            },
        ),
    ] {
        let protocol = Protocol {
            magic,
            version,
            ..PROTOCOL
        };
        let mut shake = listening();
        let hello = bytes(&HELLO.message(&protocol, SecurityKind::PreSharedKey));
        match shake.feed(&hello) {
            Err(Error::Link(LinkError::Malformed { source, .. })) => {
                assert_eq!(source.downcast_ref::<WireError>(), Some(&want));
            }
            other => panic!("expected a malformed HELLO, got {other:?}"),
        }
        assert!(shake.output().is_empty());
    }
}

#[test]
fn the_wrong_role_and_the_other_security_are_refused_and_told_why() {
    let mut shake = listening();
    let dest = Hello {
        role: Role::Destination,
        ..HELLO
    };
    let err = shake
        .feed(&bytes(&dest.message(&PROTOCOL, SecurityKind::PreSharedKey)))
        .unwrap_err();
    let want = Refusal::WrongRole {
        got: Role::Destination,
        want: Role::Source,
    };
    assert_eq!(err.refusal(), Some(&want));
    assert!(
        matches!(answer(&mut shake), Control::Shut { reason: ShutReason::Error, detail } if detail == want.to_string())
    );

    let mut shake = listening();
    let err = shake
        .feed(&bytes(&HELLO.message(&PROTOCOL, SecurityKind::Tls)))
        .unwrap_err();
    assert_eq!(
        err.refusal(),
        Some(&Refusal::SecurityMismatch {
            ours: SecurityKind::PreSharedKey,
            peer: SecurityKind::Tls
        })
    );
    assert!(matches!(
        answer(&mut shake),
        Control::Shut {
            reason: ShutReason::SecurityMismatch,
            ..
        }
    ));
}

#[test]
fn anything_but_a_hello_first_is_unexpected() {
    let mut shake = listening();
    let err = shake.feed(&bytes(&Control::Ping { seq: 1 })).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unexpected {
                expected: "HELLO",
                got: "PING",
                ..
            }
        ),
        "{err}"
    );
}
