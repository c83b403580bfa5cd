//! Encoding: every message into one frame.

use transport::wire::{put_frame, Control, Writer};

use super::*;

/// A run count and its ranges.
fn ranges(w: &mut Writer<'_>, ranges: &[PageRange]) {
    w.u32(ranges.len() as u32);
    for r in ranges {
        w.u64(r.first);
        w.u64(r.count);
    }
}

impl Message {
    fn body(&self, w: &mut Writer<'_>) {
        match self {
            Message::Advise(a) => {
                w.u32(a.page_size);
                w.u64(a.page_count);
                w.u64(a.features.bits());
                w.u32(a.regions.len() as u32);
                for r in &a.regions {
                    w.u64(r.first_page);
                    w.u64(r.pages);
                }
                w.u64(a.image);
            }
            Message::Discard { ranges: r } | Message::ReqPages { ranges: r } => ranges(w, r),
            Message::Listen | Message::End => {}
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
            Message::Ack { seq } | Message::Sync { seq } | Message::Synced { seq } => w.u64(*seq),
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
            Message::Shut { .. } => unreachable!("SHUT is the transport's to encode"),
        }
    }
}

/// Appends `msg` as one frame to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    match msg {
        Message::Shut { reason, detail } => Control::Shut {
            reason: *reason,
            detail: detail.clone(),
        }
        .encode(out),
        msg => put_frame(out, msg.kind(), |w| msg.body(w)),
    }
}

/// Appends a REQ_PAGES frame for `ranges` to `out`: the same bytes as
/// `encode(&Message::ReqPages { .. })` without building a message, so a fault handler
/// asking for pages allocates nothing once `out` has the capacity.
pub fn encode_request(ranges: &[PageRange], out: &mut Vec<u8>) {
    put_frame(out, kind::REQ_PAGES, |w| self::ranges(w, ranges));
}
