//! Arbitrary bytes into the listener's side of the handshake (the sans-I/O `Listening`
//! every listener's gate runs on strangers' connections), plaintext with a pre-shared key
//! and TLS: it must never panic, hold at most a bounded amount of what a stranger sends or
//! it answers, and stay over once it failed.
//!
//! The first byte chooses the security, whether a valid HELLO of that security comes
//! first (so the fuzzer explores what follows it: AUTH, the TLS handshake) and how the
//! rest is cut into reads.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use transport::handshake::{Hello, Listening, Progress};
use transport::link::{Channel, Role};
use transport::tls::Authority;
use transport::wire::Protocol;
use transport::Security;

/// The protocol the fuzzed listener speaks (any: the handshake does not depend on it).
const PROTOCOL: Protocol = Protocol {
    magic: *b"FUZZPROT",
    version: 1,
    features: 0,
};

/// What the listener may buffer for one connection: a handshake frame's worth of input
/// twice over, and its answers (a CHALLENGE, or the TLS server's flight with certificate).
const MAX_OUTPUT: usize = 16 << 10;

fn securities() -> &'static [Security; 2] {
    static ENDS: OnceLock<[Security; 2]> = OnceLock::new();
    ENDS.get_or_init(|| {
        let ca = Authority::new("fuzz CA").expect("a CA");
        let id = ca.issue(&["localhost"]).expect("a certificate");
        let key = transport::Key::new(*b"fuzzing-key-0123456789").expect("a key");
        [ca.config(&id).expect("TLS").into(), key.into()]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let security = &securities()[usize::from(head & 1)];
    let mut shake = Listening::new(PROTOCOL, security.clone(), Role::Destination);
    let mut input = Vec::new();
    if head & 2 != 0 {
        let hello = Hello {
            role: Role::Destination,
            channel: Channel::Main,
            session: 7,
            generation: 1,
        };
        hello.message(&PROTOCOL, security.kind()).encode(&mut input);
    }
    input.extend_from_slice(rest);
    let chunk = usize::from(head >> 2).max(1);
    let mut failed = false;
    for piece in input.chunks(chunk) {
        let result = shake.feed(piece);
        assert!(shake.output().len() <= MAX_OUTPUT, "output {}", shake.output().len());
        match result {
            Ok(Progress::More) | Ok(Progress::Authenticated(_)) => {
                assert!(!failed, "a failed handshake went on");
            }
            Err(_) => failed = true,
        }
        let n = shake.output().len();
        shake.sent(n);
    }
});
