//! Encoding: every message into one frame.

use super::*;

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    fn ranges(&mut self, ranges: &[PageRange]) {
        self.u32(ranges.len() as u32);
        for r in ranges {
            self.u64(r.first);
            self.u64(r.count);
        }
    }
}

impl Message {
    fn body(&self, w: &mut Writer<'_>) {
        match self {
            Message::Hello {
                version,
                features,
                role,
                channel,
                session,
                generation,
            } => {
                w.bytes(&MAGIC);
                w.u16(*version);
                w.u64(features.bits());
                w.u8(*role as u8);
                w.u8(*channel as u8);
                w.u64(*session);
                w.u32(*generation);
            }
            Message::Challenge { nonce } => w.bytes(nonce),
            Message::Auth { proof, nonce } => {
                w.bytes(proof);
                w.bytes(nonce);
            }
            Message::AuthOk { proof } => w.bytes(proof),
            Message::Advise(a) => {
                w.u32(a.page_size);
                w.u64(a.page_count);
                w.u64(a.features.bits());
                w.u32(a.regions.len() as u32);
                for r in &a.regions {
                    w.u64(r.first_page);
                    w.u64(r.pages);
                }
            }
            Message::Discard { ranges } | Message::ReqPages { ranges } => w.ranges(ranges),
            Message::StartTls | Message::Admitted | Message::Listen | Message::End => {}
            Message::Run { device_state } => {
                w.u32(device_state.len() as u32);
                w.bytes(device_state);
            }
            Message::Pages { first, data } => {
                w.u64(*first);
                w.bytes(data);
            }
            Message::ZeroRun(r) => {
                w.u64(r.first);
                w.u64(r.count);
            }
            Message::Ack { seq }
            | Message::Sync { seq }
            | Message::Synced { seq }
            | Message::Ping { seq }
            | Message::Pong { seq } => w.u64(*seq),
            Message::RecvBitmap { words } => {
                w.u32(words.len() as u32);
                for x in words {
                    w.u64(*x);
                }
            }
            Message::Digests { first, digests } => {
                w.u64(*first);
                w.u32(digests.len() as u32);
                for d in digests {
                    w.u64(*d);
                }
            }
            Message::Shut { reason, detail } => {
                w.u8(*reason as u8);
                w.u16(detail.len() as u16);
                w.bytes(detail.as_bytes());
            }
        }
    }
}

/// Appends one frame of `kind` whose body `body` writes.
fn frame(out: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Writer<'_>)) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    body(&mut Writer(out));
    let body_len = out.len() - start - HEADER_LEN;
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4] = kind;
    let crc = crc32fast::hash(&out[start + 4..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Appends `msg` as one frame to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    frame(out, msg.kind(), |w| msg.body(w));
}

/// Appends a REQ_PAGES frame for `ranges` to `out`: the same bytes as
/// `encode(&Message::ReqPages { .. })` without building a message, so a fault handler
/// asking for pages allocates nothing once `out` has the capacity.
pub fn encode_request(ranges: &[PageRange], out: &mut Vec<u8>) {
    frame(out, kind::REQ_PAGES, |w| w.ranges(ranges));
}
