//! The RDMA slot protocol, free of I/O.
//!
//! Each queue pair carries one slot class: fixed-size slots, every send transmits a whole slot
//! (Apple requires sender and receiver to use the same 4 KiB-frame count). A message (an encoded
//! frame) travels in one class, split into slots when larger than a slot's payload. Every slot
//! starts with a 64-byte header:
//!
//! ```text
//!  0 magic u32 "BTRS"   4 version u8   5 class u8   6 flags u8 (1 first, 2 last)   7 zero
//!  8 seq u64 (per queue pair)   16 msg_seq u64 (per link)   24 acks [u64; 3]
//! 48 payload_len u32   52 crc32 u32 (header with crc = 0, then payload)   56 link_id u64
//! ```
//!
//! Reliability on unreliable-connected queue pairs: the receiver accepts only the next sequence
//! number of each class; a gap (a silently dropped slot) is answered with one NACK, and the sender
//! goes back and resends from its kept slots. `acks[c]` is the receiver's next expected sequence
//! number of class `c`: cumulative, so it doubles as credit (the sender keeps at most `depth`
//! slots unacknowledged, and the receiver has `depth` receives posted). Acks ride on every slot
//! and, when a direction is quiet, on the TCP side channel. A sender whose slots stay unacked
//! past the retransmission timeout goes back too (a dropped last slot leaves no gap to see).
//! Messages of different classes are put back in `msg_seq` order before delivery.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

pub const SLOT_HEADER_LEN: usize = 64;
pub const N_CLASSES: usize = 3;
const MAGIC: [u8; 4] = *b"BTRS";
const VERSION: u8 = 1;
pub const FLAG_FIRST: u8 = 1;
pub const FLAG_LAST: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClassSpec {
    /// Bytes per slot, a multiple of 4 KiB.
    pub slot_bytes: usize,
    /// Receives posted (and so slots in flight) per queue pair.
    pub depth: u32,
}

impl ClassSpec {
    pub fn payload_cap(&self) -> usize {
        self.slot_bytes - SLOT_HEADER_LEN
    }
}

/// Control (4 KiB), activations (16 KiB: a DeepSeek-V3 bf16 hidden state of 14 KiB fits one
/// slot) and bulk (1 MiB). Receive arenas per link end: 256 KiB + 1 MiB + 8 MiB, the same again
/// for kept send slots, each well under the 15.6 MiB a memory region may hold.
pub const CLASSES: [ClassSpec; N_CLASSES] = [
    ClassSpec { slot_bytes: 4 << 10, depth: 64 },
    ClassSpec { slot_bytes: 16 << 10, depth: 64 },
    ClassSpec { slot_bytes: 1 << 20, depth: 8 },
];

/// Messages up to 16 activation slots go as activation slots; larger ones as bulk slots.
pub fn class_for(classes: &[ClassSpec; N_CLASSES], len: usize) -> usize {
    if len <= classes[0].payload_cap() {
        0
    } else if len <= 16 * classes[1].payload_cap() {
        1
    } else {
        2
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("slot of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("bad slot magic or version")]
    Magic,
    #[error("slot for class {got} arrived on the class {expected} queue pair")]
    WrongClass { got: u8, expected: usize },
    #[error("slot payload length {len} exceeds {cap}")]
    Length { len: u32, cap: usize },
    #[error("slot checksum mismatch")]
    Checksum,
    #[error("slot belongs to another link")]
    OtherLink,
    #[error("peer acknowledged slot {ack} of class {class} that was never sent (next is {next})")]
    AckBeyondSent { class: usize, ack: u64, next: u64 },
    #[error("message fragments out of order in class {0}")]
    Fragments(usize),
    #[error("reassembled message exceeds {0} bytes")]
    TooLarge(usize),
    #[error("messages waiting for an earlier one exceed {0} bytes")]
    TooFarAhead(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotHeader {
    pub class: u8,
    pub flags: u8,
    pub seq: u64,
    pub msg_seq: u64,
    pub acks: [u64; N_CLASSES],
    pub len: u32,
    pub link_id: u64,
}

fn crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..52]);
    h.update(&[0; 4]);
    h.update(&header[56..SLOT_HEADER_LEN]);
    h.update(payload);
    h.finalize()
}

/// Writes header and payload into `slot` (the rest of the slot is left as is: whole-slot sends).
pub fn write_slot(slot: &mut [u8], h: &SlotHeader, payload: &[u8]) {
    slot[SLOT_HEADER_LEN..SLOT_HEADER_LEN + payload.len()].copy_from_slice(payload);
    seal_slot(slot, h);
}

/// Writes the header of a slot whose `h.len` payload bytes are already in place.
pub fn seal_slot(slot: &mut [u8], h: &SlotHeader) {
    let mut b = &mut slot[..SLOT_HEADER_LEN];
    b.put_slice(&MAGIC);
    b.put_u8(VERSION);
    b.put_u8(h.class);
    b.put_u8(h.flags);
    b.put_u8(0);
    b.put_u64_le(h.seq);
    b.put_u64_le(h.msg_seq);
    for a in h.acks {
        b.put_u64_le(a);
    }
    b.put_u32_le(h.len);
    b.put_u32_le(0);
    b.put_u64_le(h.link_id);
    let c = crc(&slot[..SLOT_HEADER_LEN], &slot[SLOT_HEADER_LEN..SLOT_HEADER_LEN + h.len as usize]);
    slot[52..56].copy_from_slice(&c.to_le_bytes());
}

/// Parses and checks a received slot; the payload is returned as a sub-slice.
pub fn parse_slot(slot: &[u8], class: usize, link_id: u64) -> Result<(SlotHeader, &[u8]), SlotError> {
    if slot.len() < SLOT_HEADER_LEN {
        return Err(SlotError::Short(slot.len()));
    }
    let u64_at = |o: usize| u64::from_le_bytes(slot[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(slot[o..o + 4].try_into().expect("4 bytes"));
    if slot[0..4] != MAGIC || slot[4] != VERSION {
        return Err(SlotError::Magic);
    }
    let h = SlotHeader {
        class: slot[5],
        flags: slot[6],
        seq: u64_at(8),
        msg_seq: u64_at(16),
        acks: [u64_at(24), u64_at(32), u64_at(40)],
        len: u32_at(48),
        link_id: u64_at(56),
    };
    if usize::from(h.class) != class {
        return Err(SlotError::WrongClass { got: h.class, expected: class });
    }
    let cap = slot.len() - SLOT_HEADER_LEN;
    if h.len as usize > cap {
        return Err(SlotError::Length { len: h.len, cap });
    }
    let payload = &slot[SLOT_HEADER_LEN..SLOT_HEADER_LEN + h.len as usize];
    if crc(&slot[..SLOT_HEADER_LEN], payload) != u32_at(52) {
        return Err(SlotError::Checksum);
    }
    if h.link_id != link_id {
        return Err(SlotError::OtherLink);
    }
    Ok((h, payload))
}

/// Send state of one class.
#[derive(Debug)]
pub struct TxClass {
    pub spec: ClassSpec,
    /// Sequence number the next filled slot gets.
    pub next_seq: u64,
    /// Everything below has been received in order by the peer.
    pub acked: u64,
    /// Next sequence number to post (below `next_seq` after a go-back).
    pub post_cursor: u64,
    last_progress: Instant,
    pub retransmits: u64,
}

impl TxClass {
    pub fn new(spec: ClassSpec, now: Instant) -> Self {
        TxClass { spec, next_seq: 0, acked: 0, post_cursor: 0, last_progress: now, retransmits: 0 }
    }

    /// A slot buffer is free when its previous occupant (`seq - depth`) is acknowledged.
    pub fn can_fill(&self) -> bool {
        self.next_seq < self.acked + u64::from(self.spec.depth)
    }

    pub fn slot_index(&self, seq: u64) -> usize {
        (seq % u64::from(self.spec.depth)) as usize
    }

    /// Takes the next sequence number for a slot about to be filled.
    pub fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// The next slot to post, if any.
    pub fn next_to_post(&self) -> Option<u64> {
        (self.post_cursor < self.next_seq).then_some(self.post_cursor)
    }

    pub fn posted(&mut self) {
        self.post_cursor += 1;
    }

    pub fn on_ack(&mut self, class: usize, ack: u64, now: Instant) -> Result<(), SlotError> {
        if ack > self.next_seq {
            return Err(SlotError::AckBeyondSent { class, ack, next: self.next_seq });
        }
        if ack > self.acked {
            self.acked = ack;
            self.last_progress = now;
            self.post_cursor = self.post_cursor.max(ack);
        }
        Ok(())
    }

    /// The peer is missing `seq` (and so has everything before it): resend from there.
    pub fn on_nack(&mut self, class: usize, seq: u64, now: Instant) -> Result<(), SlotError> {
        self.on_ack(class, seq, now)?;
        if seq < self.next_seq && seq < self.post_cursor {
            self.post_cursor = seq;
            self.retransmits += 1;
        }
        Ok(())
    }

    /// Goes back to the oldest unacknowledged slot when nothing moved for `rto`.
    pub fn on_timer(&mut self, now: Instant, rto: Duration) -> bool {
        if self.acked < self.next_seq && self.post_cursor == self.next_seq && now - self.last_progress > rto {
            self.post_cursor = self.acked;
            self.last_progress = now;
            self.retransmits += 1;
            return true;
        }
        false
    }

    pub fn idle(&self) -> bool {
        self.acked == self.next_seq
    }
}

/// What the receiver wants sent after a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxAction {
    None,
    Nack { class: usize, seq: u64 },
}

#[derive(Debug, Default)]
struct RxClass {
    expected: u64,
    nacked: Option<u64>,
    partial: BytesMut,
    partial_msg: Option<u64>,
}

/// Receive state of a link: per-class sequencing and reassembly, then `msg_seq` order.
#[derive(Debug)]
pub struct Rx {
    classes: [RxClass; N_CLASSES],
    ready: BTreeMap<u64, Bytes>,
    /// What `ready` holds, each message counted as at least one control slot.
    ready_bytes: usize,
    next_deliver: u64,
    max_message: usize,
    pub discarded: u64,
}

/// What a message waiting in `ready` costs: its bytes, and at least the slot it came in, so that
/// many tiny messages count too.
fn ready_cost(msg: &Bytes) -> usize {
    msg.len().max(CLASSES[0].slot_bytes)
}

impl Rx {
    pub fn new(max_message: usize) -> Self {
        Rx { classes: Default::default(), ready: BTreeMap::new(), ready_bytes: 0, next_deliver: 0, max_message, discarded: 0 }
    }

    /// Most that messages ahead of an undelivered one may hold: a sender fills one message at a
    /// time, so only what it sent while an earlier slot was being repaired can be ahead, but
    /// nothing stops a peer from sending `msg_seq` far ahead and never the messages between.
    fn max_ready(&self) -> usize {
        self.max_message.saturating_mul(2)
    }

    pub fn acks(&self) -> [u64; N_CLASSES] {
        [self.classes[0].expected, self.classes[1].expected, self.classes[2].expected]
    }

    /// Messages delivered so far plus those ready (used to know when a closing peer is drained).
    pub fn delivered_or_ready(&self) -> u64 {
        self.next_deliver + self.ready.len() as u64
    }

    pub fn on_slot(&mut self, class: usize, h: &SlotHeader, payload: &[u8]) -> Result<RxAction, SlotError> {
        let c = &mut self.classes[class];
        if h.seq < c.expected {
            self.discarded += 1;
            return Ok(RxAction::None);
        }
        if h.seq > c.expected {
            self.discarded += 1;
            if c.nacked == Some(c.expected) {
                return Ok(RxAction::None);
            }
            c.nacked = Some(c.expected);
            return Ok(RxAction::Nack { class, seq: c.expected });
        }
        c.expected += 1;
        c.nacked = None;
        let first = h.flags & FLAG_FIRST != 0;
        match (c.partial_msg, first) {
            (None, true) => {
                c.partial_msg = Some(h.msg_seq);
                c.partial.clear();
            }
            (Some(m), false) if m == h.msg_seq => {}
            _ => return Err(SlotError::Fragments(class)),
        }
        if c.partial.len() + payload.len() > self.max_message {
            return Err(SlotError::TooLarge(self.max_message));
        }
        c.partial.extend_from_slice(payload);
        if h.flags & FLAG_LAST != 0 {
            c.partial_msg = None;
            let msg = c.partial.split().freeze();
            let cost = ready_cost(&msg);
            if self.ready_bytes + cost > self.max_ready() {
                return Err(SlotError::TooFarAhead(self.max_ready()));
            }
            if h.msg_seq < self.next_deliver || self.ready.insert(h.msg_seq, msg).is_some() {
                return Err(SlotError::Fragments(class));
            }
            self.ready_bytes += cost;
        }
        Ok(RxAction::None)
    }

    /// The next message in link order, if it has arrived.
    pub fn pop(&mut self) -> Option<Bytes> {
        let m = self.ready.remove(&self.next_deliver)?;
        self.ready_bytes -= ready_cost(&m);
        self.next_deliver += 1;
        Some(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_roundtrip_and_corruption() {
        let mut slot = vec![0u8; 4096];
        let h = SlotHeader { class: 0, flags: 3, seq: 9, msg_seq: 4, acks: [1, 2, 3], len: 5, link_id: 77 };
        write_slot(&mut slot, &h, b"hello");
        let (got, p) = parse_slot(&slot, 0, 77).unwrap();
        assert_eq!((got, p), (h, &b"hello"[..]));
        assert_eq!(parse_slot(&slot, 1, 77).err(), Some(SlotError::WrongClass { got: 0, expected: 1 }));
        assert_eq!(parse_slot(&slot, 0, 78).err(), Some(SlotError::OtherLink));
        slot[SLOT_HEADER_LEN + 1] ^= 1;
        assert_eq!(parse_slot(&slot, 0, 77).err(), Some(SlotError::Checksum));
    }

    fn h(seq: u64, msg: u64, flags: u8) -> SlotHeader {
        SlotHeader { class: 0, flags, seq, msg_seq: msg, acks: [0; 3], len: 1, link_id: 0 }
    }

    #[test]
    fn gap_is_nacked_once_then_repaired() {
        let mut rx = Rx::new(1 << 20);
        assert_eq!(rx.on_slot(0, &h(0, 0, 3), b"a"), Ok(RxAction::None));
        assert_eq!(rx.on_slot(0, &h(2, 2, 3), b"c"), Ok(RxAction::Nack { class: 0, seq: 1 }));
        assert_eq!(rx.on_slot(0, &h(3, 3, 3), b"d"), Ok(RxAction::None));
        assert_eq!(rx.on_slot(0, &h(1, 1, 3), b"b"), Ok(RxAction::None));
        assert_eq!(rx.on_slot(0, &h(2, 2, 3), b"c"), Ok(RxAction::None));
        let got: Vec<_> = std::iter::from_fn(|| rx.pop()).collect();
        assert_eq!(got, vec![Bytes::from_static(b"a"), Bytes::from_static(b"b"), Bytes::from_static(b"c")]);
        assert_eq!(rx.acks()[0], 3);
    }

    #[test]
    fn fragments_reassemble_and_classes_reorder() {
        let mut rx = Rx::new(1 << 20);
        let mut big = h(0, 1, FLAG_FIRST);
        big.class = 2;
        rx.on_slot(2, &big, b"xy").unwrap();
        rx.on_slot(0, &h(0, 0, 3), b"small").unwrap();
        big.seq = 1;
        big.flags = FLAG_LAST;
        rx.on_slot(2, &big, b"z").unwrap();
        assert_eq!(rx.pop(), Some(Bytes::from_static(b"small")));
        assert_eq!(rx.pop(), Some(Bytes::from_static(b"xyz")));
    }

    #[test]
    fn messages_far_ahead_of_a_missing_one_are_bounded() {
        let max_message = 64 << 10;
        let mut rx = Rx::new(max_message);
        // Message 0 never comes; each later one waits for it, counted as at least a 4 KiB slot.
        let mut held = 0;
        let err = loop {
            match rx.on_slot(0, &h(held, held + 1, 3), b"x") {
                Ok(_) => held += 1,
                Err(e) => break e,
            }
            assert!(held < 1 << 20, "a million messages held and no refusal");
        };
        assert_eq!(err, SlotError::TooFarAhead(2 * max_message));
        assert_eq!(held as usize, 2 * max_message / CLASSES[0].slot_bytes);
        // Delivered messages free their share.
        let mut rx = Rx::new(max_message);
        for m in 0..1000 {
            rx.on_slot(0, &h(m, m, 3), b"x").unwrap();
            assert_eq!(rx.pop(), Some(Bytes::from_static(b"x")));
        }
    }

    #[test]
    fn sender_window_nack_and_timer() {
        let t0 = Instant::now();
        let mut tx = TxClass::new(ClassSpec { slot_bytes: 4096, depth: 2 }, t0);
        tx.take_seq();
        tx.take_seq();
        assert!(!tx.can_fill());
        tx.posted();
        tx.posted();
        tx.on_nack(0, 1, t0).unwrap();
        assert_eq!((tx.acked, tx.next_to_post()), (1, Some(1)));
        assert!(tx.can_fill());
        tx.posted();
        assert!(!tx.on_timer(t0, Duration::from_millis(5)));
        assert!(tx.on_timer(t0 + Duration::from_millis(6), Duration::from_millis(5)));
        assert_eq!(tx.next_to_post(), Some(1));
        assert!(tx.on_ack(0, 5, t0).is_err());
    }
}
