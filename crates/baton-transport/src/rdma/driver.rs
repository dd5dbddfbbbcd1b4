//! The RDMA driver thread: runs the slot protocol over the queue pairs.
//!
//! Completion channels are undocumented on Apple, so the thread busy-polls its completion
//! queues: it spins right after activity, then yields, then parks briefly (woken early by new
//! sends and side-channel messages).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::device::{split_wr_id, Cq, Resources};
use super::proto::{class_for, parse_slot, seal_slot, ClassSpec, Rx, RxAction, SlotHeader, TxClass, FLAG_FIRST, FLAG_LAST, N_CLASSES, SLOT_HEADER_LEN};
use super::sys::{ibv_wc, IBV_WC_LOC_LEN_ERR, IBV_WC_SUCCESS};
use super::{Cmd, Dead, RdmaConfig, Side, MAX_UNREAD_BYTES};
use crate::link::{CloseReason, LinkError};

const SPIN: Duration = Duration::from_micros(50);
const YIELD: Duration = Duration::from_millis(2);
const PARK: Duration = Duration::from_micros(100);
/// Acks wait at most this long for a slot to ride on before going over the side channel.
const ACK_DELAY: Duration = Duration::from_millis(1);
const CLOSE_DRAIN: Duration = Duration::from_secs(2);

pub(crate) struct Ids {
    /// Stamped on slots sent to this end.
    pub ours: u64,
    /// Stamped on slots this end sends.
    pub theirs: u64,
}

struct OutMsg {
    class: usize,
    msg_seq: u64,
    header: Bytes,
    payload: Bytes,
    off: usize,
}

impl OutMsg {
    fn total(&self) -> usize {
        self.header.len() + self.payload.len()
    }
    /// Copies `dst.len()` bytes of header-then-payload from `off`.
    fn copy_to(&self, dst: &mut [u8]) {
        let (h, mut d) = (self.header.len(), 0);
        if self.off < h {
            d = (h - self.off).min(dst.len());
            dst[..d].copy_from_slice(&self.header[self.off..self.off + d]);
        }
        if d < dst.len() {
            let p = self.off + d - h;
            let n = dst.len() - d;
            dst[d..].copy_from_slice(&self.payload[p..p + n]);
        }
    }
}

enum Flow {
    Busy,
    Idle,
    Stop,
}

pub(crate) struct Driver {
    res: Resources,
    ids: Ids,
    classes: [ClassSpec; N_CLASSES],
    tx: [TxClass; N_CLASSES],
    rx: Rx,
    rto: Duration,
    cmds: mpsc::Receiver<Cmd>,
    side_in: std_mpsc::Receiver<Result<Side, String>>,
    side_out: mpsc::UnboundedSender<Side>,
    deliver: mpsc::UnboundedSender<Result<Bytes, LinkError>>,
    unread: Arc<AtomicUsize>,
    dead: Arc<OnceLock<Dead>>,
    current: Option<OutMsg>,
    next_msg: u64,
    outstanding: [u32; N_CLASSES],
    reported: [u64; N_CLASSES],
    unreported_since: Option<Instant>,
    closing: Option<(String, oneshot::Sender<()>, Instant)>,
    peer_closed: Option<(String, u64)>,
    wcs: Vec<ibv_wc>,
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        res: Resources,
        ids: Ids,
        cfg: &RdmaConfig,
        max_message: usize,
        cmds: mpsc::Receiver<Cmd>,
        side_in: std_mpsc::Receiver<Result<Side, String>>,
        side_out: mpsc::UnboundedSender<Side>,
        deliver: mpsc::UnboundedSender<Result<Bytes, LinkError>>,
        unread: Arc<AtomicUsize>,
        dead: Arc<OnceLock<Dead>>,
    ) -> Driver {
        let now = Instant::now();
        Driver {
            res,
            ids,
            classes: cfg.classes,
            tx: std::array::from_fn(|c| TxClass::new(cfg.classes[c], now)),
            rx: Rx::new(max_message),
            rto: cfg.retransmit_timeout,
            cmds,
            side_in,
            side_out,
            deliver,
            unread,
            dead,
            current: None,
            next_msg: 0,
            outstanding: [0; N_CLASSES],
            reported: [0; N_CLASSES],
            unreported_since: None,
            closing: None,
            peer_closed: None,
            wcs: vec![ibv_wc::default(); 32],
        }
    }

    pub(crate) fn run(mut self) {
        let mut active = Instant::now();
        loop {
            match self.step() {
                Ok(Flow::Busy) => active = Instant::now(),
                Ok(Flow::Idle) => {
                    let idle = active.elapsed();
                    if idle < SPIN {
                        std::hint::spin_loop();
                    } else if idle < YIELD {
                        std::thread::yield_now();
                    } else {
                        std::thread::park_timeout(PARK);
                    }
                }
                Ok(Flow::Stop) => break,
                Err(msg) => {
                    tracing::warn!(device = %self.res.dev.name, "RDMA link failed: {msg}");
                    let _ = self.dead.set(Dead::Lost(msg.clone()));
                    let _ = self.deliver.send(Err(LinkError::ConnectionLost(msg)));
                    break;
                }
            }
        }
        let (sent, discarded) = (self.tx.iter().map(|t| t.retransmits).sum::<u64>(), self.rx.discarded);
        tracing::debug!(retransmits = sent, discarded, "RDMA driver stopped");
    }

    fn apply_acks(&mut self, acks: [u64; N_CLASSES], now: Instant) -> Result<(), String> {
        for (c, a) in acks.into_iter().enumerate() {
            self.tx[c].on_ack(c, a, now).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn step(&mut self) -> Result<Flow, String> {
        let now = Instant::now();
        let mut busy = false;

        loop {
            match self.side_in.try_recv() {
                Ok(Ok(Side::Ack { acks })) => self.apply_acks(acks, now)?,
                Ok(Ok(Side::Nack { class, seq, acks })) => {
                    self.apply_acks(acks, now)?;
                    if class >= N_CLASSES {
                        return Err(format!("NACK for unknown class {class}"));
                    }
                    self.tx[class].on_nack(class, seq, now).map_err(|e| e.to_string())?;
                }
                Ok(Ok(Side::Close { reason, sent })) => self.peer_closed = Some((reason, sent)),
                Ok(Ok(_)) => return Err("setup message after the link was up".into()),
                Ok(Err(e)) => {
                    if self.peer_closed.is_none() && self.closing.is_none() {
                        return Err(format!("side channel lost: {e}"));
                    }
                }
                Err(std_mpsc::TryRecvError::Empty) | Err(std_mpsc::TryRecvError::Disconnected) => break,
            }
            busy = true;
        }

        let n = self.res.poll(Cq::Send, &mut self.wcs)?;
        for wc in &self.wcs[..n] {
            let (c, _) = split_wr_id(wc.wr_id);
            self.outstanding[c.min(N_CLASSES - 1)] = self.outstanding[c.min(N_CLASSES - 1)].saturating_sub(1);
            if wc.status != IBV_WC_SUCCESS {
                return Err(completion_error("send", c, wc.status));
            }
        }
        busy |= n > 0;

        if self.unread.load(Ordering::Relaxed) < MAX_UNREAD_BYTES {
            let n = self.res.poll(Cq::Recv, &mut self.wcs)?;
            for i in 0..n {
                let wc = self.wcs[i];
                self.on_receive(wc, now)?;
            }
            busy |= n > 0;
            while let Some(m) = self.rx.pop() {
                self.unread.fetch_add(m.len(), Ordering::Relaxed);
                if self.deliver.send(Ok(m)).is_err() {
                    return Ok(Flow::Stop);
                }
            }
        }

        if self.closing.is_none() {
            loop {
                if self.current.is_none() {
                    match self.cmds.try_recv() {
                        Ok(Cmd::Send { header, payload }) => {
                            let class = class_for(&self.classes, header.len() + payload.len());
                            self.current = Some(OutMsg { class, msg_seq: self.next_msg, header, payload, off: 0 });
                            self.next_msg += 1;
                        }
                        Ok(Cmd::Close { reason, done }) => {
                            self.closing = Some((reason, done, now + CLOSE_DRAIN));
                            break;
                        }
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => return Ok(Flow::Stop),
                    }
                }
                busy |= self.fill();
                if self.current.is_some() {
                    break;
                }
            }
        }

        for c in 0..N_CLASSES {
            if self.tx[c].on_timer(now, self.rto) {
                tracing::debug!(class = c, from = self.tx[c].acked, "RDMA retransmission after timeout");
            }
            let cap = self.classes[c].depth * 2;
            while let Some(seq) = self.tx[c].next_to_post() {
                if self.outstanding[c] >= cap {
                    break;
                }
                let slot = self.tx[c].slot_index(seq);
                self.res.post_send(c, slot)?;
                self.outstanding[c] += 1;
                self.tx[c].posted();
                busy = true;
            }
        }

        let acks = self.rx.acks();
        if acks != self.reported {
            let since = *self.unreported_since.get_or_insert(now);
            let batch = (0..N_CLASSES).any(|c| acks[c] - self.reported[c] >= u64::from((self.classes[c].depth / 4).max(1)));
            if batch || now - since >= ACK_DELAY {
                let _ = self.side_out.send(Side::Ack { acks });
                self.reported = acks;
                self.unreported_since = None;
            }
        }

        if let Some((_, _, deadline)) = &self.closing {
            if (self.current.is_none() && self.tx.iter().all(TxClass::idle)) || now > *deadline {
                let (reason, done, _) = self.closing.take().expect("checked");
                let _ = self.side_out.send(Side::Close { reason: reason.clone(), sent: self.next_msg });
                let _ = self.dead.set(Dead::Closed(CloseReason { by_peer: false, message: reason }));
                let _ = done.send(());
                return Ok(Flow::Stop);
            }
        }
        if let Some((reason, sent)) = &self.peer_closed {
            if self.rx.delivered_or_ready() >= *sent {
                let r = CloseReason { by_peer: true, message: reason.clone() };
                let _ = self.dead.set(Dead::Closed(r.clone()));
                let _ = self.deliver.send(Err(LinkError::Closed(r)));
                return Ok(Flow::Stop);
            }
        }
        Ok(if busy { Flow::Busy } else { Flow::Idle })
    }

    fn on_receive(&mut self, wc: ibv_wc, now: Instant) -> Result<(), String> {
        let (c, slot) = split_wr_id(wc.wr_id);
        if c >= N_CLASSES || slot >= self.classes[c].depth as usize {
            return Err(format!("receive completion with unknown work request id {:#x}", wc.wr_id));
        }
        if wc.status != IBV_WC_SUCCESS {
            return Err(completion_error("receive", c, wc.status));
        }
        let spec = self.classes[c];
        let buf = self.res.arenas[0][c].slot(&spec, slot);
        match parse_slot(&buf[..(wc.byte_len as usize).min(spec.slot_bytes)], c, self.ids.ours) {
            Ok((h, payload)) => {
                let acks = h.acks;
                let action = self.rx.on_slot(c, &h, payload).map_err(|e| e.to_string())?;
                self.apply_acks(acks, now)?;
                if let RxAction::Nack { class, seq } = action {
                    let _ = self.side_out.send(Side::Nack { class, seq, acks: self.rx.acks() });
                }
            }
            // Damaged or stray slots count as lost: the next slot's gap triggers the NACK.
            Err(e) => {
                self.rx.discarded += 1;
                tracing::debug!(class = c, "RDMA slot discarded: {e}");
            }
        }
        self.res.post_recv(c, slot)
    }

    /// Fills free send slots with the current message; true when any was filled.
    fn fill(&mut self) -> bool {
        let mut filled = false;
        while let Some(m) = &mut self.current {
            let c = m.class;
            if !self.tx[c].can_fill() {
                break;
            }
            let spec = self.classes[c];
            let seq = self.tx[c].take_seq();
            let idx = self.tx[c].slot_index(seq);
            let n = (m.total() - m.off).min(spec.payload_cap());
            let slot = self.res.arenas[1][c].slot(&spec, idx);
            m.copy_to(&mut slot[SLOT_HEADER_LEN..SLOT_HEADER_LEN + n]);
            let flags = if m.off == 0 { FLAG_FIRST } else { 0 } | if m.off + n == m.total() { FLAG_LAST } else { 0 };
            let acks = self.rx.acks();
            let h = SlotHeader { class: c as u8, flags, seq, msg_seq: m.msg_seq, acks, len: n as u32, link_id: self.ids.theirs };
            seal_slot(slot, &h);
            self.reported = acks;
            self.unreported_since = None;
            m.off += n;
            filled = true;
            if m.off == m.total() {
                self.current = None;
            }
        }
        filled
    }
}

fn completion_error(what: &str, class: usize, status: u32) -> String {
    let hint = if status == IBV_WC_LOC_LEN_ERR {
        ": length error, the two ends' slot sizes (4 KiB frame counts) differ"
    } else {
        ""
    };
    format!("{what} completion on class {class} failed with status {status}{hint}")
}
