//! RDMA verbs links (Apple's RDMA over Thunderbolt 5, or Linux rdma-core).
//!
//! Layers: `sys` (hand-declared ABI, dlopen), `device` (verbs resources and the local gate
//! steps), `proto` (the slot protocol, no I/O) and `driver` (a busy-polling thread that runs the
//! protocol over the queue pairs). A TCP side channel, authenticated like any TCP link, carries
//! setup, acks and NACKs when a direction is quiet, liveness and the orderly close.

pub mod device;
mod driver;
pub mod proto;
pub mod sys;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex};

use crate::auth::Role;
use crate::config::LinkConfig;
use crate::frame::Frame;
use crate::link::{CloseReason, Inner, Link, LinkError, TransportKind};
use device::{Device, LocalInfo, Resources};
use proto::{ClassSpec, CLASSES, N_CLASSES};

pub use device::library_path;

/// The steps of the RDMA gate, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GateStep {
    Library,
    Device,
    Port,
    Gid,
    Budget,
    ProtectionDomain,
    CompletionQueue,
    QueuePair,
    MemoryRegion,
    Init,
    Exchange,
    Rtr,
    Rts,
    PingPong,
}

impl std::fmt::Display for GateStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GateStep::Library => "load verbs library",
            GateStep::Device => "find device",
            GateStep::Port => "port active",
            GateStep::Gid => "IPv4-mapped GID",
            GateStep::Budget => "QP/MR/PD budget",
            GateStep::ProtectionDomain => "protection domain",
            GateStep::CompletionQueue => "completion queues",
            GateStep::QueuePair => "queue pairs",
            GateStep::MemoryRegion => "memory regions",
            GateStep::Init => "INIT",
            GateStep::Exchange => "exchange with peer",
            GateStep::Rtr => "RTR",
            GateStep::Rts => "RTS",
            GateStep::PingPong => "ping-pong of every slot class",
        })
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RdmaError {
    #[error("RDMA gate failed at step '{step}': {detail}")]
    Gate { step: GateStep, detail: String },
    #[error("RDMA link failed: {0}")]
    Link(String),
}

impl RdmaError {
    pub fn gate_step(&self) -> Option<GateStep> {
        match self {
            RdmaError::Gate { step, .. } => Some(*step),
            RdmaError::Link(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RdmaConfig {
    /// Verbs library; else `$BATON_RDMA_LIB`; else `libibverbs.so.1` / `librdma.dylib`.
    pub library: Option<PathBuf>,
    /// Device name; else `rdma_<interface that routes to the peer>`, else the first device.
    pub device: Option<String>,
    pub classes: [ClassSpec; N_CLASSES],
    /// Apple's limits, asserted before anything is created.
    pub max_qps_per_device: u32,
    pub max_mrs_per_device: u32,
    pub max_pds_per_device: u32,
    /// Use RC queue pairs when both providers offer them (Linux hardware); Apple offers UC only.
    pub prefer_rc: bool,
    /// The whole gate, ping-pong included, must pass within this.
    pub gate_timeout: Duration,
    /// Unacknowledged slots are resent after this long without progress.
    pub retransmit_timeout: Duration,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            library: None,
            device: None,
            classes: CLASSES,
            max_qps_per_device: 10,
            max_mrs_per_device: 100,
            max_pds_per_device: 11,
            // Probing allocates a protection domain, which Apple holds until the process exits.
            prefer_rc: cfg!(target_os = "linux"),
            gate_timeout: Duration::from_secs(5),
            retransmit_timeout: Duration::from_millis(20),
        }
    }
}

/// Path of baton's emulated verbs provider when the build could compile it (tests, benchmark).
pub fn emulated_provider_path() -> Option<&'static str> {
    option_env!("BATON_VERBS_EMU_PATH")
}

/// The local half of the gate (library, device, port, GID), with a line per passed step.
pub fn local_gate(cfg: &RdmaConfig, local_ip: Option<IpAddr>) -> Result<Vec<(GateStep, String)>, RdmaError> {
    let d = device::open_device(cfg, local_ip)?;
    Ok(d.log.clone())
}

/// Messages on the side channel (JSON in setup records).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Side {
    Hello(Result<LocalInfo, RdmaError>),
    Queues(Result<QueueInfo, RdmaError>),
    Ready(Result<(), RdmaError>),
    Ack { acks: [u64; N_CLASSES] },
    Nack { class: usize, seq: u64, acks: [u64; N_CLASSES] },
    Close { reason: String, sent: u64 },
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct QueueInfo {
    qpns: [u32; N_CLASSES],
    psns: [u32; N_CLASSES],
    rc: bool,
    /// Stamped into every slot sent to this end, so stray slots of an older link are ignored.
    link_id: u64,
}

async fn side_send(side: &Link, m: &Side) -> Result<(), LinkError> {
    side.send_setup(&serde_json::to_vec(m).expect("side messages serialise")).await
}

async fn side_recv(side: &Link) -> Result<Side, LinkError> {
    let b = side.recv_setup().await?;
    serde_json::from_slice(&b).map_err(|_| LinkError::Protocol("malformed RDMA side-channel message"))
}

fn peer_failed(e: RdmaError) -> RdmaError {
    match e {
        RdmaError::Gate { step, detail } => RdmaError::Gate { step, detail: format!("on the peer: {detail}") },
        other => other,
    }
}

fn exchange_err(e: LinkError) -> LinkError {
    match e {
        LinkError::Rdma(_) => e,
        other => RdmaError::Gate { step: GateStep::Exchange, detail: other.to_string() }.into(),
    }
}

/// Runs the gate with the peer over an authenticated side channel and returns the RDMA link.
/// Both ends report the first failing step, theirs or the peer's.
pub async fn establish(side: Arc<Link>, role: Role, cfg: &LinkConfig, local_ip: Option<IpAddr>) -> Result<Link, LinkError> {
    let t = cfg.rdma.gate_timeout;
    match tokio::time::timeout(t, establish_inner(side, role, cfg, local_ip)).await {
        Ok(r) => r,
        Err(_) => Err(RdmaError::Gate { step: GateStep::Exchange, detail: format!("gate not passed within {t:?}") }.into()),
    }
}

async fn establish_inner(side: Arc<Link>, role: Role, cfg: &LinkConfig, local_ip: Option<IpAddr>) -> Result<Link, LinkError> {
    let rcfg = cfg.rdma.clone();
    let opened = tokio::task::spawn_blocking(move || -> Result<(Device, bool), RdmaError> {
        device::validate_classes(&rcfg.classes)?;
        let d = device::open_device(&rcfg, local_ip)?;
        let rc = rcfg.prefer_rc && device::offers_rc(&d);
        Ok((d, rc))
    })
    .await
    .map_err(|e| RdmaError::Link(e.to_string()))?;
    let hello = opened.as_ref().map(|(d, rc)| LocalInfo { rc_capable: *rc, ..d.info.clone() }).map_err(Clone::clone);
    side_send(&side, &Side::Hello(hello)).await.map_err(exchange_err)?;
    let peer = match side_recv(&side).await.map_err(exchange_err)? {
        Side::Hello(p) => p,
        _ => return Err(LinkError::Protocol("expected the RDMA hello")),
    };
    let (dev, rc_local) = opened?;
    let peer = peer.map_err(peer_failed)?;
    if peer.classes != dev.info.classes {
        return Err(RdmaError::Gate {
            step: GateStep::Exchange,
            detail: format!("slot classes differ: ours {:?}, peer {:?}", dev.info.classes, peer.classes),
        }
        .into());
    }
    let use_rc = rc_local && peer.rc_capable;
    let rcfg = cfg.rdma.clone();
    let created = tokio::task::spawn_blocking(move || Resources::create(dev, &rcfg, use_rc))
        .await
        .map_err(|e| RdmaError::Link(e.to_string()))?;
    let link_id: u64 = rand::random();
    let ours = created.as_ref().map(|r| QueueInfo { qpns: r.qpns(), psns: r.psns, rc: use_rc, link_id }).map_err(Clone::clone);
    side_send(&side, &Side::Queues(ours)).await.map_err(exchange_err)?;
    let theirs = match side_recv(&side).await.map_err(exchange_err)? {
        Side::Queues(q) => q,
        _ => return Err(LinkError::Protocol("expected RDMA queue information")),
    };
    let mut res = created?;
    let theirs = theirs.map_err(peer_failed)?;
    let connected = res.connect(&peer, &theirs.qpns, &theirs.psns);
    side_send(&side, &Side::Ready(connected.clone())).await.map_err(exchange_err)?;
    match side_recv(&side).await.map_err(exchange_err)? {
        Side::Ready(r) => r.map_err(peer_failed)?,
        _ => return Err(LinkError::Protocol("expected RDMA ready")),
    }
    connected?;
    let emulated = res.dev.verbs.emulated;
    let qp_kind = if use_rc { "RC" } else { "UC" };
    tracing::info!(device = %res.dev.name, qp = qp_kind, emulated, peer = %side.peer(), "RDMA queue pairs connected");
    let peer_addr = side.peer();
    let limits = cfg.limits;
    let rdma = RdmaLink::start(side, res, driver::Ids { ours: link_id, theirs: theirs.link_id }, cfg);
    let link = Link::new(Inner::Rdma(rdma), TransportKind::Rdma, emulated, peer_addr, limits);
    ping_pong_every_class(&link, role, cfg).await?;
    Ok(link)
}

/// The gate's last step: one checked round trip through every slot class.
async fn ping_pong_every_class(link: &Link, role: Role, cfg: &LinkConfig) -> Result<(), LinkError> {
    let classes = cfg.rdma.classes;
    let sizes = [classes[0].payload_cap() / 2, classes[1].payload_cap() * 2, classes[2].payload_cap() + 1];
    let fail = |detail: String| LinkError::from(RdmaError::Gate { step: GateStep::PingPong, detail });
    for (c, size) in sizes.into_iter().enumerate() {
        match role {
            Role::Client => {
                let payload: Bytes = (0..size).map(|i| (i * 31 + c) as u8).collect::<Vec<u8>>().into();
                link.send(&Frame::control(c as u64, payload.clone())).await.map_err(|e| fail(format!("class {c}: {e}")))?;
                let back = link.recv().await.map_err(|e| fail(format!("class {c}: {e}")))?;
                if back.payload != payload || back.micro_batch != c as u64 {
                    return Err(fail(format!("class {c}: echoed {} bytes differ", back.payload.len())));
                }
            }
            Role::Server => {
                let f = link.recv().await.map_err(|e| fail(format!("class {c}: {e}")))?;
                link.send(&f).await.map_err(|e| fail(format!("class {c}: {e}")))?;
            }
        }
    }
    Ok(())
}

/// Dials `addr`, authenticates the side channel and runs the gate.
pub async fn connect(addr: SocketAddr, cfg: &LinkConfig) -> Result<Link, LinkError> {
    let stream = tokio::time::timeout(cfg.handshake_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| LinkError::Timeout(format!("connecting to {addr}")))??;
    let local = stream.local_addr()?.ip();
    let side = Arc::new(crate::tcp::upgrade(stream, Role::Client, cfg).await?);
    establish(side, Role::Client, cfg, Some(local)).await
}

/// Accepts one side-channel connection and runs the gate.
pub async fn accept(listener: &TcpListener, cfg: &LinkConfig) -> Result<Link, LinkError> {
    let (stream, _) = listener.accept().await?;
    let local = stream.local_addr()?.ip();
    let side = Arc::new(crate::tcp::upgrade(stream, Role::Server, cfg).await?);
    establish(side, Role::Server, cfg, Some(local)).await
}

/// Why the driver stopped.
#[derive(Debug, Clone)]
enum Dead {
    Closed(CloseReason),
    Lost(String),
}

impl Dead {
    fn to_error(&self) -> LinkError {
        match self {
            Dead::Closed(r) => LinkError::Closed(r.clone()),
            Dead::Lost(m) => LinkError::ConnectionLost(m.clone()),
        }
    }
}

enum Cmd {
    Send { header: Bytes, payload: Bytes },
    Close { reason: String, done: tokio::sync::oneshot::Sender<()> },
}

/// Messages delivered but not yet taken by `recv`; past this the driver stops taking slots,
/// which withholds acks and so credit from the sender.
const MAX_UNREAD_BYTES: usize = 64 << 20;

pub(crate) struct RdmaLink {
    cmds: mpsc::Sender<Cmd>,
    delivered: Mutex<mpsc::UnboundedReceiver<Result<Bytes, LinkError>>>,
    unread: Arc<AtomicUsize>,
    dead: Arc<OnceLock<Dead>>,
    driver: std::thread::Thread,
    reader: tokio::task::JoinHandle<()>,
    /// Ends once the driver stops and everything it queued (the close above all) is written.
    writer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    limits: crate::frame::FrameLimits,
}

impl Drop for RdmaLink {
    fn drop(&mut self) {
        self.reader.abort();
        self.driver.unpark();
    }
}

impl RdmaLink {
    fn start(side: Arc<Link>, res: Resources, ids: driver::Ids, cfg: &LinkConfig) -> RdmaLink {
        let (cmd_tx, cmd_rx) = mpsc::channel(32);
        let (deliver_tx, deliver_rx) = mpsc::unbounded_channel();
        let (side_in_tx, side_in_rx) = std::sync::mpsc::channel();
        let (side_out_tx, mut side_out_rx) = mpsc::unbounded_channel::<Side>();
        let unread = Arc::new(AtomicUsize::new(0));
        let dead = Arc::new(OnceLock::new());
        let d = driver::Driver::new(
            res,
            ids,
            &cfg.rdma,
            cfg.limits.max_frame_bytes,
            cmd_rx,
            side_in_rx,
            side_out_tx,
            deliver_tx,
            unread.clone(),
            dead.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("baton-rdma".into())
            .spawn(move || d.run())
            .expect("spawn RDMA driver thread");
        let driver = handle.thread().clone();
        let (reader_side, wake) = (side.clone(), driver.clone());
        let reader = tokio::spawn(async move {
            loop {
                let m = side_recv(&reader_side).await;
                let stop = m.is_err();
                if side_in_tx.send(m.map_err(|e| e.to_string())).is_err() {
                    break;
                }
                wake.unpark();
                if stop {
                    break;
                }
            }
        });
        let writer = tokio::spawn(async move {
            while let Some(m) = side_out_rx.recv().await {
                if side_send(&side, &m).await.is_err() {
                    break;
                }
            }
        });
        RdmaLink {
            cmds: cmd_tx,
            delivered: Mutex::new(deliver_rx),
            unread,
            dead,
            driver,
            reader,
            writer: std::sync::Mutex::new(Some(writer)),
            limits: cfg.limits,
        }
    }

    fn dead_err(&self) -> LinkError {
        self.dead.get().map(Dead::to_error).unwrap_or_else(|| LinkError::ConnectionLost("RDMA driver stopped".into()))
    }

    pub(crate) async fn send(&self, frame: &Frame) -> Result<(), LinkError> {
        if let Some(d) = self.dead.get() {
            return Err(d.to_error());
        }
        let mut header = BytesMut::with_capacity(frame.header_len());
        frame.encode_header(&mut header, &self.limits)?;
        let cmd = Cmd::Send { header: header.freeze(), payload: frame.payload.clone() };
        let sent = self.cmds.send(cmd).await;
        self.driver.unpark();
        sent.map_err(|_| self.dead_err())
    }

    pub(crate) async fn recv(&self) -> Result<Bytes, LinkError> {
        match self.delivered.lock().await.recv().await {
            Some(Ok(b)) => {
                self.unread.fetch_sub(b.len(), Ordering::Relaxed);
                self.driver.unpark();
                Ok(b)
            }
            Some(Err(e)) => Err(e),
            None => Err(self.dead_err()),
        }
    }

    /// Waits (bounded) until every sent slot is acknowledged, then tells the peer.
    pub(crate) async fn close(&self, reason: &str) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.cmds.send(Cmd::Close { reason: reason.to_owned(), done }).await.is_ok() {
            self.driver.unpark();
            let _ = tokio::time::timeout(Duration::from_secs(3), wait).await;
        }
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = writer {
            let _ = tokio::time::timeout(Duration::from_secs(1), w).await;
        }
    }
}
