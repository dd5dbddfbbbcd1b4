//! Link negotiation: capabilities + preference → set up, probe, choose, report.
//!
//! The dialer connects over TCP (authenticated), both ends exchange capabilities, and the dialer
//! plans. `auto` takes RDMA when the gate passes on both ends; otherwise it sets up QUIC and TCP,
//! probes both with ping-pongs of representative frame sizes, and keeps the faster at 14 KiB
//! (a decode step's hidden state). A preference that cannot be met falls back the same way and
//! says so in the report and the log: asking for RDMA and not getting it is never silent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};

use crate::auth::Role;
use crate::config::LinkConfig;
use crate::frame::Frame;
use crate::link::{Link, LinkError, TransportKind};
use crate::quic::QuicEndpoint;
use crate::rdma::{self, RdmaError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preference {
    Auto,
    Rdma,
    Quic,
    Tcp,
}

impl std::str::FromStr for Preference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Preference::Auto,
            "rdma" => Preference::Rdma,
            "quic" => Preference::Quic,
            "tcp" => Preference::Tcp,
            _ => return Err(format!("unknown transport preference {s:?} (auto|rdma|quic|tcp)")),
        })
    }
}

impl std::fmt::Display for Preference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Preference::Auto => "auto",
            Preference::Rdma => "rdma",
            Preference::Quic => "quic",
            Preference::Tcp => "tcp",
        })
    }
}

/// What one end can do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Capabilities {
    /// UDP port of the QUIC endpoint (acceptor), or `Some(0)` for a dialer able to speak QUIC.
    pub quic: Option<u16>,
    /// The local RDMA gate (library, device, port, GID), or why it failed.
    pub rdma: Result<(), String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rejection {
    pub transport: TransportKind,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProbeResult {
    pub transport: TransportKind,
    pub size_bytes: usize,
    pub rtt_p50_us: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NegotiationReport {
    pub requested: Preference,
    pub chosen: TransportKind,
    /// `rdma-emulated` when the emulated verbs provider carries the link.
    pub transport_name: String,
    /// Probe RTT p50 at the decision size (14 KiB) on the chosen link.
    pub rtt_us: f64,
    pub probes: Vec<ProbeResult>,
    pub rejected: Vec<Rejection>,
}

impl std::fmt::Display for NegotiationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} chosen (requested {}), RTT p50 {:.1} µs at 14 KiB", self.transport_name, self.requested, self.rtt_us)?;
        for r in &self.rejected {
            write!(f, "; {} not chosen: {}", r.transport, r.reason)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct NegotiateOptions {
    pub preference: Preference,
    pub enable_quic: bool,
    pub enable_rdma: bool,
    /// Round trips per probe size.
    pub probe_iterations: usize,
}

impl Default for NegotiateOptions {
    fn default() -> Self {
        NegotiateOptions { preference: Preference::Auto, enable_quic: true, enable_rdma: true, probe_iterations: 16 }
    }
}

pub const PROBE_SIZES: [usize; 3] = [64, 14 << 10, 256 << 10];
const DECISION_SIZE: usize = 14 << 10;
const PROBE_END: u64 = u64::MAX;
const REPORT: u64 = u64::MAX - 1;

/// The pure planning step: which transports to try, in order, and which are out from the start.
pub fn plan(pref: Preference, ours: &Capabilities, peer: &Capabilities) -> (Vec<TransportKind>, Vec<Rejection>) {
    let mut try_ = Vec::new();
    let mut out = Vec::new();
    let reject = |out: &mut Vec<Rejection>, t, reason: String| out.push(Rejection { transport: t, reason });
    let rdma_wanted = matches!(pref, Preference::Auto | Preference::Rdma);
    match (&ours.rdma, &peer.rdma) {
        _ if !rdma_wanted => reject(&mut out, TransportKind::Rdma, format!("not requested (preference {pref})")),
        (Err(e), _) => reject(&mut out, TransportKind::Rdma, format!("this end: {e}")),
        (_, Err(e)) => reject(&mut out, TransportKind::Rdma, format!("peer: {e}")),
        (Ok(()), Ok(())) => try_.push(TransportKind::Rdma),
    }
    let quic_wanted = pref != Preference::Tcp;
    match (ours.quic, peer.quic) {
        _ if !quic_wanted => reject(&mut out, TransportKind::Quic, format!("not requested (preference {pref})")),
        (None, _) => reject(&mut out, TransportKind::Quic, "disabled on this end".into()),
        (_, None) => reject(&mut out, TransportKind::Quic, "disabled on the peer".into()),
        _ => try_.push(TransportKind::Quic),
    }
    // TCP is always possible: the setup connection is a TCP link.
    try_.push(TransportKind::Tcp);
    (try_, out)
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Msg {
    Caps(Capabilities),
    Plan { candidates: Vec<TransportKind>, session: u64 },
    QuicStatus(Result<(), String>),
    Decision(NegotiationReport),
}

async fn send_msg(l: &Link, m: &Msg) -> Result<(), LinkError> {
    l.send_setup(&serde_json::to_vec(m).expect("negotiation messages serialise")).await
}

async fn recv_msg(l: &Link) -> Result<Msg, LinkError> {
    serde_json::from_slice(&l.recv_setup().await?).map_err(|_| LinkError::Negotiation("malformed negotiation message".into()))
}

fn unexpected(m: Msg) -> LinkError {
    LinkError::Negotiation(format!("unexpected negotiation message {m:?}"))
}

async fn local_caps(cfg: &LinkConfig, opts: &NegotiateOptions, quic_port: Option<u16>, local: SocketAddr) -> Capabilities {
    let rdma = if !opts.enable_rdma {
        Err("disabled by configuration".into())
    } else if !matches!(opts.preference, Preference::Auto | Preference::Rdma) {
        Err(format!("not requested (preference {})", opts.preference))
    } else {
        let rc = cfg.rdma.clone();
        tokio::task::spawn_blocking(move || rdma::local_gate(&rc, Some(local.ip())).map(|_| ()).map_err(|e| e.to_string()))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
    };
    Capabilities { quic: if opts.enable_quic { quic_port } else { None }, rdma }
}

pub struct Negotiated {
    pub link: Link,
    pub report: NegotiationReport,
}

/// Dials and negotiates a link to the acceptor at `addr`.
pub async fn dial(addr: SocketAddr, cfg: &LinkConfig, opts: &NegotiateOptions) -> Result<Negotiated, LinkError> {
    let stream = tokio::time::timeout(cfg.handshake_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| LinkError::Timeout(format!("connecting to {addr}")))??;
    let local = stream.local_addr()?;
    let setup = Arc::new(crate::tcp::upgrade(stream, Role::Client, cfg).await?);
    let ours = local_caps(cfg, opts, Some(0), local).await;
    send_msg(&setup, &Msg::Caps(ours.clone())).await?;
    let peer = match recv_msg(&setup).await? {
        Msg::Caps(c) => c,
        m => return Err(unexpected(m)),
    };
    let (candidates, mut rejected) = plan(opts.preference, &ours, &peer);
    let session: u64 = rand::random();
    send_msg(&setup, &Msg::Plan { candidates: candidates.clone(), session }).await?;
    let mut probes = Vec::new();

    if candidates.contains(&TransportKind::Rdma) {
        match rdma::establish(setup.clone(), Role::Client, cfg, Some(local.ip())).await {
            Ok(link) => {
                let stats = probe(&link, TransportKind::Rdma, opts.probe_iterations).await?;
                probes.extend(stats);
                let report = finish_report(opts, TransportKind::Rdma, link.transport_name(), probes, rejected);
                link.send(&Frame::control(REPORT, Bytes::from(serde_json::to_vec(&report).expect("report")))).await?;
                log_report(&report);
                return Ok(Negotiated { link, report });
            }
            Err(e) => rdma_failed(e, &mut rejected)?,
        }
    }

    let mut quic = None;
    if candidates.contains(&TransportKind::Quic) {
        let qaddr = SocketAddr::new(addr.ip(), peer.quic.unwrap_or(0));
        let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
        let attempt = async {
            let ep = QuicEndpoint::bind(bind, cfg)?;
            let l = ep.connect(qaddr).await?;
            l.send(&Frame::control(session, Bytes::new())).await?;
            Ok::<_, LinkError>(l)
        }
        .await;
        let status = attempt.as_ref().map(|_| ()).map_err(|e| e.to_string());
        send_msg(&setup, &Msg::QuicStatus(status.clone())).await?;
        let theirs = match recv_msg(&setup).await? {
            Msg::QuicStatus(s) => s,
            m => return Err(unexpected(m)),
        };
        match (attempt, theirs) {
            (Ok(l), Ok(())) => quic = Some(l),
            (Err(e), _) => rejected.push(Rejection { transport: TransportKind::Quic, reason: format!("setup failed: {e}") }),
            (_, Err(e)) => rejected.push(Rejection { transport: TransportKind::Quic, reason: format!("setup failed on the peer: {e}") }),
        }
    }

    probes.extend(probe(&setup, TransportKind::Tcp, opts.probe_iterations).await?);
    if let Some(q) = &quic {
        probes.extend(probe(q, TransportKind::Quic, opts.probe_iterations).await?);
    }
    let at = |t| probes.iter().find(|p| p.transport == t && p.size_bytes == DECISION_SIZE).map(|p| p.rtt_p50_us);
    let tcp_rtt = at(TransportKind::Tcp).unwrap_or(f64::INFINITY);
    let quic_rtt = at(TransportKind::Quic);
    let quic_first = opts.preference == Preference::Quic;
    let chosen = match quic_rtt {
        Some(q) if quic_first || q < tcp_rtt => TransportKind::Quic,
        _ => TransportKind::Tcp,
    };
    match (chosen, quic_rtt) {
        (TransportKind::Quic, _) => rejected.push(Rejection {
            transport: TransportKind::Tcp,
            reason: if quic_first {
                "QUIC preferred".into()
            } else {
                format!("slower by probe: {tcp_rtt:.1} µs vs {:.1} µs for QUIC at 14 KiB", quic_rtt.unwrap_or_default())
            },
        }),
        (_, Some(q)) => rejected.push(Rejection {
            transport: TransportKind::Quic,
            reason: format!("slower by probe: {q:.1} µs vs {tcp_rtt:.1} µs for TCP at 14 KiB"),
        }),
        _ => {}
    }
    let name = if chosen == TransportKind::Quic { "quic" } else { "tcp" };
    let report = finish_report(opts, chosen, name, probes, rejected);
    send_msg(&setup, &Msg::Decision(report.clone())).await?;
    log_report(&report);
    let link = match chosen {
        TransportKind::Quic => quic.expect("chosen only when set up"),
        _ => Arc::try_unwrap(setup).map_err(|_| LinkError::Negotiation("setup link still shared".into()))?,
    };
    Ok(Negotiated { link, report })
}

fn rdma_failed(e: LinkError, rejected: &mut Vec<Rejection>) -> Result<(), LinkError> {
    match &e {
        // Local and lockstep steps leave the setup connection in step on both ends: fall back.
        LinkError::Rdma(RdmaError::Gate { step, .. }) if !matches!(step, rdma::GateStep::PingPong | rdma::GateStep::Exchange) => {
            rejected.push(Rejection { transport: TransportKind::Rdma, reason: e.to_string() });
            Ok(())
        }
        _ => Err(e),
    }
}

fn finish_report(
    opts: &NegotiateOptions,
    chosen: TransportKind,
    name: &str,
    probes: Vec<ProbeResult>,
    rejected: Vec<Rejection>,
) -> NegotiationReport {
    let rtt_us = probes
        .iter()
        .find(|p| p.transport == chosen && p.size_bytes == DECISION_SIZE)
        .map(|p| p.rtt_p50_us)
        .unwrap_or(f64::NAN);
    NegotiationReport { requested: opts.preference, chosen, transport_name: name.into(), rtt_us, probes, rejected }
}

fn log_report(r: &NegotiationReport) {
    let rdma_missed = r.requested == Preference::Rdma && r.chosen != TransportKind::Rdma;
    if rdma_missed {
        tracing::warn!("RDMA was requested but not obtained: {r}");
    } else {
        tracing::info!("link negotiated: {r}");
    }
}

/// Ping-pongs every probe size; the peer runs [`echo_probes`].
async fn probe(link: &Link, t: TransportKind, iterations: usize) -> Result<Vec<ProbeResult>, LinkError> {
    let mut out = Vec::new();
    for size in PROBE_SIZES {
        let payload = Bytes::from(vec![0x5a; size]);
        let mut rtts = Vec::with_capacity(iterations);
        for i in 0..iterations + 2 {
            let start = Instant::now();
            link.send(&Frame::control(i as u64, payload.clone())).await?;
            let back = link.recv().await?;
            if back.payload.len() != size {
                return Err(LinkError::Negotiation(format!("probe echo of {size} bytes came back as {}", back.payload.len())));
            }
            // The first two round trips warm up buffers and congestion state.
            if i >= 2 {
                rtts.push(start.elapsed());
            }
        }
        rtts.sort();
        out.push(ProbeResult { transport: t, size_bytes: size, rtt_p50_us: rtts[rtts.len() / 2].as_secs_f64() * 1e6 });
    }
    // The echoed end marker proves the peer is done with this link, so it may be dropped.
    link.send(&Frame::control(PROBE_END, Bytes::new())).await?;
    if link.recv().await?.micro_batch != PROBE_END {
        return Err(LinkError::Negotiation("probe end not echoed".into()));
    }
    Ok(out)
}

/// Echoes probe frames, the end marker included.
async fn echo_probes(link: &Link) -> Result<(), LinkError> {
    loop {
        let f = link.recv().await?;
        link.send(&f).await?;
        if f.micro_batch == PROBE_END {
            return Ok(());
        }
    }
}

/// Connections one [`Acceptor`] authenticates at once. Each handshake is bounded by
/// `LinkConfig::handshake_timeout`; beyond this many, connections wait in the kernel's backlog,
/// so strangers cannot make an acceptor hold more sockets than this.
pub const MAX_PENDING_HANDSHAKES: usize = 32;

/// Accepts and negotiates links; one negotiation at a time.
pub struct Acceptor {
    tcp: TcpListener,
    quic: Option<QuicEndpoint>,
    cfg: LinkConfig,
    opts: NegotiateOptions,
    serial: tokio::sync::Mutex<()>,
}

impl Acceptor {
    /// Binds TCP on `addr` and, when QUIC is enabled, UDP on the same port (or any free one).
    pub async fn bind(addr: SocketAddr, cfg: &LinkConfig, opts: &NegotiateOptions) -> Result<Acceptor, LinkError> {
        let tcp = TcpListener::bind(addr).await?;
        let bound = tcp.local_addr()?;
        let quic = if opts.enable_quic {
            Some(match QuicEndpoint::bind(bound, cfg) {
                Ok(q) => q,
                Err(_) => QuicEndpoint::bind(SocketAddr::new(bound.ip(), 0), cfg)?,
            })
        } else {
            None
        };
        Ok(Acceptor { tcp, quic, cfg: cfg.clone(), opts: opts.clone(), serial: Default::default() })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        Ok(self.tcp.local_addr()?)
    }

    /// The next connection whose peer proves the cluster key. Handshakes run side by side, so a
    /// stranger who connects and stalls delays no member; a connection that fails before its peer
    /// proved the key (wrong key, garbage, hang-up, timeout) is dropped and never reported, so a
    /// stranger cannot end the wait for the peer the caller expects.
    async fn authenticated(&self) -> Result<(Link, SocketAddr), LinkError> {
        let mut pending = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.tcp.accept(), if pending.len() < MAX_PENDING_HANDSHAKES => {
                    let (stream, _) = accepted?;
                    let cfg = self.cfg.clone();
                    pending.spawn(async move {
                        let local = stream.local_addr()?;
                        Ok::<_, LinkError>((crate::tcp::upgrade(stream, Role::Server, &cfg).await?, local))
                    });
                }
                Some(done) = pending.join_next() => match done {
                    Ok(Ok(authenticated)) => return Ok(authenticated),
                    // The handshake already logged why (see `tcp::authenticate`).
                    Ok(Err(e)) => tracing::debug!("dropped a data connection before it authenticated: {e}"),
                    Err(e) => tracing::warn!("data connection handshake task: {e}"),
                },
            }
        }
    }

    pub async fn accept(&self) -> Result<Negotiated, LinkError> {
        let _one_at_a_time = self.serial.lock().await;
        let (setup, local) = self.authenticated().await?;
        let setup = Arc::new(setup);
        let qport = match &self.quic {
            Some(q) => Some(q.local_addr()?.port()),
            None => None,
        };
        let ours = local_caps(&self.cfg, &self.opts, qport, local).await;
        send_msg(&setup, &Msg::Caps(ours)).await?;
        match recv_msg(&setup).await? {
            Msg::Caps(_) => {}
            m => return Err(unexpected(m)),
        }
        let (candidates, session) = match recv_msg(&setup).await? {
            Msg::Plan { candidates, session } => (candidates, session),
            m => return Err(unexpected(m)),
        };
        if candidates.contains(&TransportKind::Rdma) {
            match rdma::establish(setup.clone(), Role::Server, &self.cfg, Some(local.ip())).await {
                Ok(link) => {
                    echo_probes(&link).await?;
                    let f = link.recv().await?;
                    if f.micro_batch != REPORT {
                        return Err(LinkError::Negotiation("no report after the RDMA probe".into()));
                    }
                    let report: NegotiationReport =
                        serde_json::from_slice(&f.payload).map_err(|_| LinkError::Negotiation("malformed report".into()))?;
                    log_report(&report);
                    return Ok(Negotiated { link, report });
                }
                Err(e) => rdma_failed(e, &mut Vec::new())?,
            }
        }
        let mut quic = None;
        if candidates.contains(&TransportKind::Quic) {
            let attempt = async {
                let ep = self.quic.as_ref().ok_or(LinkError::Negotiation("QUIC disabled".into()))?;
                let l = tokio::time::timeout(self.cfg.handshake_timeout, ep.accept())
                    .await
                    .map_err(|_| LinkError::Timeout("QUIC link from the dialer".into()))??;
                let first = l.recv().await?;
                if first.micro_batch != session {
                    return Err(LinkError::Negotiation("QUIC link belongs to another negotiation".into()));
                }
                Ok::<_, LinkError>(l)
            }
            .await;
            send_msg(&setup, &Msg::QuicStatus(attempt.as_ref().map(|_| ()).map_err(|e| e.to_string()))).await?;
            match recv_msg(&setup).await? {
                Msg::QuicStatus(Ok(())) => quic = attempt.ok(),
                Msg::QuicStatus(Err(_)) => {}
                m => return Err(unexpected(m)),
            }
        }
        echo_probes(&setup).await?;
        if let Some(q) = &quic {
            echo_probes(q).await?;
        }
        let report = match recv_msg(&setup).await? {
            Msg::Decision(r) => r,
            m => return Err(unexpected(m)),
        };
        log_report(&report);
        let link = match report.chosen {
            TransportKind::Quic => quic.ok_or(LinkError::Negotiation("QUIC chosen but not set up here".into()))?,
            _ => Arc::try_unwrap(setup).map_err(|_| LinkError::Negotiation("setup link still shared".into()))?,
        };
        Ok(Negotiated { link, report })
    }
}

/// Bounded wait used by callers that negotiate both ends in one process (benchmark, tests).
pub async fn local_pair(cfg: &LinkConfig, opts: &NegotiateOptions) -> Result<(Negotiated, Negotiated), LinkError> {
    let acceptor = Acceptor::bind("127.0.0.1:0".parse().expect("literal"), cfg, opts).await?;
    let addr = acceptor.local_addr()?;
    let t = cfg.handshake_timeout + cfg.rdma.gate_timeout + Duration::from_secs(10);
    let both = async { tokio::try_join!(acceptor.accept(), dial(addr, cfg, opts)) };
    tokio::time::timeout(t, both).await.map_err(|_| LinkError::Timeout("local negotiation".into()))?
}
