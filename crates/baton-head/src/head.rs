//! The head: connects workers, places layers, loads shards, sets up the chain
//! head (stage 0) → worker → … → last worker → head, and runs requests through it.
//!
//! Requests go through the [`crate::scheduler`], which packs the running sequences into
//! micro-batches and keeps several in flight, so the stages work on different micro-batches at
//! once; one receiver task hands what the last stage sends back to the scheduler.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use baton_api::backend::{BackendStats, GenerationRequest, LinkStats, StageStats, StreamEvent, SubmitError, TokenStream};

use baton_model::loader::ModelSource;
use baton_model::pipeline::WireDType;
use baton_model::sampling::SamplingParams;
use baton_model::shard::Shard;
use baton_proto::pb::{self, worker_client::WorkerClient};
use baton_transport::negotiate::{dial, Acceptor, NegotiateOptions, NegotiationReport, Preference};
use baton_transport::{FrameKind, Link, LinkConfig};
use baton_worker::service::{wire_to_proto, worker_protocol};
use baton_worker::wire::{decode_sampled, parse_failure};
use baton_worker::Stage;
use candle_core::Device;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::scheduler::{self, Chain, Msg, SchedulerConfig};
use crate::placement::{place, NodeReport, Placement};
use crate::status::{ClusterStatus, LinkStatus, NodeStatus, StageStatus};

/// How long a worker may stay silent on its health stream before it is declared dead (a host
/// that vanished); a killed process breaks the stream at once. Generous, because a CPU-starved
/// but healthy worker must not be declared dead.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
const HEARTBEAT_INTERVAL_MS: u32 = 250;
/// A lost link is reported after this pause, so that a health watcher that saw the node die
/// names it first (the link error alone only says which hop broke).
const LINK_LOSS_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("model: {0}")]
    Model(#[from] baton_model::ModelError),
    #[error("worker {worker}: {message}")]
    Worker { worker: String, message: String },
    #[error("link setup: {0}")]
    Link(String),
    /// The model does not fit the nodes (the message gives the shortfall per node), or a manual
    /// placement is wrong.
    #[error("placement: {0}")]
    Plan(String),
    #[error("{0}")]
    Config(String),
    /// The cluster lost a node or a link; no request can run until it is rebuilt.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    #[error("request failed: {0}")]
    Request(String),
}

pub type Result<T> = std::result::Result<T, HeadError>;

pub struct HeadConfig {
    pub model: PathBuf,
    /// Worker control endpoints, `host:port`, in stage order.
    pub workers: Vec<String>,
    pub key: baton_cluster::key::ClusterKey,
    pub name: String,
    pub id: String,
    pub wire: WireDType,
    pub preference: Preference,
    /// Run stage 0 in this process (`--no-worker` turns it off).
    pub local_stage: bool,
    pub device: Device,
    /// IP the head's data acceptor binds (the last stage connects back to it).
    pub bind_ip: IpAddr,
    pub status_path: Option<PathBuf>,
    pub scheduler: SchedulerConfig,
    /// cluster.toml: memory overrides, headroom, KV budget and manual ranges for placement;
    /// per-node model paths.
    pub cluster: baton_cluster::config::ClusterConfig,
}

/// One request: prompt tokens, sampling, budget and the ids that end it.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(u32),
    Done { finish: Finish, prompt_tokens: usize, generated: usize, prefill_s: f64, decode_tok_s: f64 },
}

struct WorkerHandle {
    name: String,
    endpoint: String,
    client: WorkerClient<Channel>,
    info: pb::NodeInfo,
}

struct Inner {
    local: bool,
    workers: Vec<WorkerHandle>,
    scheduler: scheduler::Handle,
    status: Mutex<ClusterStatus>,
    status_path: Option<PathBuf>,
}

#[derive(Clone)]
pub struct Head {
    inner: Arc<Inner>,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The address a worker reports for its data listener, with an unspecified IP (bound to all
/// interfaces) replaced by the IP the head reaches its control endpoint at.
fn reachable(addr: &str, endpoint: &str) -> Result<SocketAddr> {
    let mut a: SocketAddr = addr.parse().map_err(|e| HeadError::Link(format!("data address {addr}: {e}")))?;
    if a.ip().is_unspecified() {
        let host: SocketAddr = endpoint.parse().map_err(|e| HeadError::Link(format!("endpoint {endpoint}: {e}")))?;
        a.set_ip(host.ip());
    }
    Ok(a)
}

/// The local IP that routes to `peer` (no packet is sent: connecting a UDP socket only routes).
fn local_ip_towards(peer: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if peer.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(peer).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

fn link_status(from: &str, to: &str, r: &NegotiationReport) -> LinkStatus {
    LinkStatus {
        from: from.into(),
        to: to.into(),
        transport: r.transport_name.clone(),
        rtt_us: r.rtt_us,
        rejected: r.rejected.iter().map(|x| format!("{}: {}", x.transport, x.reason)).collect(),
    }
}

async fn hello(endpoint: &str, cfg: &HeadConfig, security: &baton_proto::ControlSecurity) -> Result<WorkerHandle> {
    let werr = |message: String| HeadError::Worker { worker: endpoint.to_string(), message };
    let addr = tokio::net::lookup_host(endpoint)
        .await
        .map_err(|e| werr(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| werr("resolves to no address".into()))?;
    let mut client = baton_proto::connect(addr, security, Duration::from_secs(5)).await.map_err(|e| match e {
        baton_proto::SecureError::Refused(why) => werr(format!("refused: it does not hold this cluster's key ({why})")),
        e => werr(format!("cannot connect: {e}")),
    })?;
    let reply = client
        .hello(pb::HelloRequest {
            head_id: cfg.id.clone(),
            head_name: cfg.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: Some(worker_protocol()),
            cluster_id: cfg.key.cluster_id(),
        })
        .await
        .map_err(|s| werr(format!("refused: {}", s.message())))?
        .into_inner();
    baton_proto::negotiate(&worker_protocol(), &reply.protocol.unwrap_or_default()).map_err(|e| werr(e.to_string()))?;
    let info = reply.node.ok_or_else(|| werr("no node info in hello".into()))?;
    Ok(WorkerHandle { name: info.name.clone(), endpoint: endpoint.to_string(), client, info })
}

/// What the head needs to push a shard to a worker that lacks the model file.
struct PushFrom {
    security: baton_proto::ControlSecurity,
    parts: Vec<PathBuf>,
    range: std::ops::Range<usize>,
    n_layers: usize,
}

/// Loads a shard on a worker, logging its progress, until the final manifest or error; pushes
/// the weights when the worker waits for them.
async fn load_remote(w: &WorkerHandle, req: pb::LoadShardRequest, mut push: Option<PushFrom>) -> Result<pb::ShardManifest> {
    let werr = |message: String| HeadError::Worker { worker: format!("{} ({})", w.name, w.endpoint), message };
    let mut stream = w.client.clone().load_shard(req).await.map_err(|s| werr(s.message().to_string()))?.into_inner();
    while let Some(p) = stream.next().await {
        let p = p.map_err(|s| werr(format!("load stream: {}", s.message())))?;
        tracing::info!("{}: {:?} {}", w.name, p.phase(), p.message);
        if p.phase() == pb::LoadPhase::AwaitingWeights {
            let from = push.take().ok_or_else(|| werr("asked twice for weights".into()))?;
            crate::push::push_shard(&w.name, &w.endpoint, &from.security, from.parts, from.range, from.n_layers).await?;
        }
        match p.result {
            Some(pb::load_progress::Result::Manifest(m)) => return Ok(m),
            Some(pb::load_progress::Result::Error(e)) => return Err(werr(e)),
            None => {}
        }
    }
    Err(werr("load stream ended without a result".into()))
}

fn setup_request(link_id: &str, role: pb::LinkRole, peer: Option<SocketAddr>, cfg: &HeadConfig) -> pb::SetupLinkRequest {
    let preference = match cfg.preference {
        Preference::Auto => pb::TransportPreference::Auto,
        Preference::Rdma => pb::TransportPreference::Rdma,
        Preference::Quic => pb::TransportPreference::Quic,
        Preference::Tcp => pb::TransportPreference::Tcp,
    };
    pb::SetupLinkRequest {
        link_id: link_id.into(),
        role: role as i32,
        peer_addrs: peer.map(|p| vec![p.to_string()]).unwrap_or_default(),
        peer_node_id: String::new(),
        preference: preference as i32,
        wire_dtype: wire_to_proto(cfg.wire) as i32,
        timeout_ms: 15_000,
    }
}

fn reply_status(from: &str, to: &str, r: &pb::SetupLinkReply) -> LinkStatus {
    LinkStatus {
        from: from.into(),
        to: to.into(),
        transport: pb::Transport::try_from(r.chosen).unwrap_or(pb::Transport::Unspecified).short_name().into(),
        rtt_us: r.rtt_ns as f64 / 1000.0,
        rejected: r
            .rejected
            .iter()
            .map(|x| format!("{}: {}", pb::Transport::try_from(x.transport).unwrap_or(pb::Transport::Unspecified), x.reason))
            .collect(),
    }
}

impl Head {
    /// Connects, plans, loads and links the whole chain; returns once it can serve.
    pub async fn start(cfg: HeadConfig) -> Result<Head> {
        if cfg.workers.is_empty() {
            return Err(HeadError::Config("no workers: give at least one worker address".into()));
        }
        let source = ModelSource::open(&cfg.model)?;
        let manifest = source.manifest();
        let n_layers = source.config().n_layers;

        let security = baton_proto::ControlSecurity::new(cfg.key.as_bytes()).map_err(|e| HeadError::Config(e.to_string()))?;
        let mut workers = Vec::new();
        for endpoint in &cfg.workers {
            let w = hello(endpoint, &cfg, &security).await?;
            tracing::info!("worker {} ({}) at {endpoint}: backend {}, {} MiB available", w.name, w.info.id, w.info.backend().short_name(), w.info.available_memory >> 20);
            workers.push(w);
        }

        // Placement over the chain: the head first when it hosts stage 0, then the workers.
        let mut reports = Vec::new();
        if cfg.local_stage {
            let (total, available) = baton_worker::sysinfo::memory();
            let backend = if cfg.device.is_cuda() { "cuda" } else if cfg.device.is_metal() { "metal" } else { "cpu" };
            reports.push(NodeReport { name: cfg.name.clone(), total_memory: total, available_memory: available, backend: backend.into(), bandwidth: 0 });
        }
        for w in &workers {
            reports.push(NodeReport { name: w.name.clone(), total_memory: w.info.total_memory, available_memory: w.info.available_memory, backend: w.info.backend().short_name().into(), bandwidth: w.info.memory_bandwidth });
        }
        let batch_tokens = (cfg.scheduler.prefill_chunk + cfg.scheduler.max_batch) as u64;
        let Placement { ranges, how: placement } = place(&manifest, &reports, &cfg.cluster, batch_tokens, cfg.local_stage)?;
        let n_stages = ranges.len();
        tracing::info!("placement: {placement}");
        let (local_range, worker_ranges) = if cfg.local_stage { (Some(ranges[0].clone()), &ranges[1..]) } else { (None, &ranges[..]) };

        let mut status = ClusterStatus {
            head: cfg.name.clone(),
            pid: std::process::id(),
            model: cfg.model.display().to_string(),
            wire_dtype: format!("{:?}", cfg.wire).to_lowercase(),
            state: "starting".into(),
            placement,
            ..Default::default()
        };
        if let Some(r) = &local_range {
            let (total, available) = baton_worker::sysinfo::memory();
            status.nodes.push(NodeStatus { name: cfg.name.clone(), id: cfg.id.clone(), alive: true, backend: "head".into(), total_memory: total, available_memory: available, ..Default::default() });
            status.stages.push(StageStatus { index: 0, node: cfg.name.clone(), layers: format!("{}..{}", r.start, r.end), weight_bytes: manifest.stage_weight_bytes(r.start, r.end) });
        }
        for (i, (w, r)) in workers.iter().zip(worker_ranges).enumerate() {
            status.nodes.push(NodeStatus {
                name: w.name.clone(),
                id: w.info.id.clone(),
                endpoint: w.endpoint.clone(),
                alive: true,
                backend: w.info.backend().short_name().into(),
                total_memory: w.info.total_memory,
                available_memory: w.info.available_memory,
                ..Default::default()
            });
            status.stages.push(StageStatus { index: i + usize::from(cfg.local_stage), node: w.name.clone(), layers: format!("{}..{}", r.start, r.end), weight_bytes: manifest.stage_weight_bytes(r.start, r.end) });
        }
        if let Some(p) = &cfg.status_path {
            let _ = status.write(p);
        }

        // Load every shard at once: the head's own on a blocking thread, the workers' remotely.
        let local_load = local_range.clone().map(|r| {
            let (path, device, wire) = (cfg.model.clone(), cfg.device.clone(), cfg.wire);
            tokio::task::spawn_blocking(move || -> Result<Stage> {
                let source = ModelSource::open(&path)?;
                Ok(Stage::new(Shard::load(&source, r, &device)?, wire))
            })
        });
        let mut remote = tokio::task::JoinSet::new();
        for (i, (w, r)) in workers.iter().zip(worker_ranges).enumerate() {
            // The worker's own copy (cluster.toml's per-node path, else the head's path); without
            // one it waits for the head to push its tensors.
            let path = cfg.cluster.nodes.get(&w.name).and_then(|n| n.model_path.clone()).unwrap_or_else(|| cfg.model.clone());
            let req = pb::LoadShardRequest {
                model: Some(pb::ModelRef { path: path.display().to_string(), ..Default::default() }),
                layers: Some(pb::LayerRange { start: r.start as u32, end: r.end as u32 }),
                n_layers: n_layers as u32,
                wire_dtype: wire_to_proto(cfg.wire) as i32,
                kv: None,
                allow_push: true,
            };
            let push = PushFrom { security: security.clone(), parts: source.files(), range: r.clone(), n_layers };
            let handle = WorkerHandle { name: w.name.clone(), endpoint: w.endpoint.clone(), client: w.client.clone(), info: w.info.clone() };
            remote.spawn(async move { (i, load_remote(&handle, req, Some(push)).await) });
        }
        while let Some(done) = remote.join_next().await {
            let (i, m) = done.map_err(|e| HeadError::Config(format!("load task: {e}")))?;
            let m = m?;
            tracing::info!("{}: layers {} loaded ({} MiB, {})", workers[i].name, m.layers.unwrap_or_default(), m.weight_bytes >> 20, m.source);
        }
        let local = match local_load {
            Some(t) => Some(Arc::new(Mutex::new(t.await.map_err(|e| HeadError::Config(format!("load task: {e}")))??))),
            None => None,
        };

        // Links, each set up with both ends negotiating at once: data flows from the end that
        // connects to the end that accepts.
        let link_cfg = LinkConfig::new(baton_transport::ClusterKey::from_bytes(cfg.key.as_bytes()).map_err(|e| HeadError::Config(format!("cluster key: {e}")))?);
        let opts = NegotiateOptions { preference: cfg.preference, ..Default::default() };
        let data: Vec<SocketAddr> = workers
            .iter()
            .map(|w| reachable(w.info.data_addrs.first().map(String::as_str).unwrap_or(""), &w.endpoint))
            .collect::<Result<_>>()?;
        let head_label = cfg.name.clone();

        let mut first_client = workers[0].client.clone();
        let (accepted, dialed) = tokio::join!(
            first_client.setup_link(setup_request("head->0", pb::LinkRole::Accept, None, &cfg)),
            dial(data[0], &link_cfg, &opts)
        );
        accepted.map_err(|s| HeadError::Link(format!("{} accepting from the head: {}", workers[0].name, s.message())))?;
        let downstream = dialed.map_err(|e| HeadError::Link(format!("head to {}: {e}", workers[0].name)))?;
        status.links.push(link_status(&head_label, &workers[0].name, &downstream.report));

        for i in 0..workers.len() - 1 {
            let (mut a, mut b) = (workers[i].client.clone(), workers[i + 1].client.clone());
            let id = format!("{i}->{}", i + 1);
            let (sent, acc) = tokio::join!(
                a.setup_link(setup_request(&id, pb::LinkRole::Connect, Some(data[i + 1]), &cfg)),
                b.setup_link(setup_request(&id, pb::LinkRole::Accept, None, &cfg))
            );
            acc.map_err(|s| HeadError::Link(format!("{} accepting from {}: {}", workers[i + 1].name, workers[i].name, s.message())))?;
            let reply = sent.map_err(|s| HeadError::Link(format!("{} to {}: {}", workers[i].name, workers[i + 1].name, s.message())))?.into_inner();
            status.links.push(reply_status(&workers[i].name, &workers[i + 1].name, &reply));
        }

        let last = workers.len() - 1;
        let bind_ip = if cfg.bind_ip.is_unspecified() { local_ip_towards(data[last]).unwrap_or(cfg.bind_ip) } else { cfg.bind_ip };
        let acceptor = Acceptor::bind(SocketAddr::new(bind_ip, 0), &link_cfg, &opts).await.map_err(|e| HeadError::Link(format!("head data listener: {e}")))?;
        let head_data = acceptor.local_addr().map_err(|e| HeadError::Link(e.to_string()))?;
        let mut last_client = workers[last].client.clone();
        let (sent, acc) = tokio::join!(
            last_client.setup_link(setup_request("last->head", pb::LinkRole::Connect, Some(head_data), &cfg)),
            acceptor.accept()
        );
        let reply = sent.map_err(|s| HeadError::Link(format!("{} to the head: {}", workers[last].name, s.message())))?.into_inner();
        let upstream = acc.map_err(|e| HeadError::Link(format!("head accepting from {}: {e}", workers[last].name)))?;
        status.links.push(reply_status(&workers[last].name, &head_label, &reply));
        tracing::info!("chain ready: {} stages, {}", n_stages, status.links.iter().map(|l| format!("{}→{} {} {:.0} µs", l.from, l.to, l.transport, l.rtt_us)).collect::<Vec<_>>().join(", "));

        status.state = "serving".into();
        let (handle, messages) = scheduler::Handle::new(&cfg.scheduler);
        let head = Head {
            inner: Arc::new(Inner {
                local: local.is_some(),
                workers,
                scheduler: handle.clone(),
                status: Mutex::new(status),
                status_path: cfg.status_path.clone(),
            }),
        };
        head.write_status();
        let on_fail = head.clone();
        let chain = Chain {
            local,
            downstream: Arc::new(downstream.link),
            workers: head.inner.workers.iter().map(|w| (w.name.clone(), w.client.clone())).collect(),
            n_stages,
            on_link_failure: Box::new(move |why| {
                let head = on_fail.clone();
                tokio::spawn(async move { head.fail_link(why).await });
            }),
        };
        tokio::spawn(scheduler::run(handle, messages, cfg.scheduler.clone(), chain));
        tokio::spawn(head.clone().receive(Arc::new(upstream.link)));
        for i in 0..head.inner.workers.len() {
            tokio::spawn(head.clone().watch(i));
        }
        Ok(head)
    }

    pub fn status(&self) -> ClusterStatus {
        self.inner.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update_status(&self, f: impl FnOnce(&mut ClusterStatus)) {
        if let Ok(mut s) = self.inner.status.lock() {
            f(&mut s);
            s.updated_unix_ms = unix_ms();
        }
        self.write_status();
    }

    fn write_status(&self) {
        let Some(path) = &self.inner.status_path else { return };
        let snapshot = self.status();
        if let Err(e) = snapshot.write(path) {
            tracing::warn!("writing {}: {e}", path.display());
        }
    }

    /// Marks the cluster failed (the first reason sticks) and ends every request with it;
    /// returns the reason that stuck.
    fn fail_all(&self, reason: String) -> String {
        let (newly, reason) = {
            let mut failed = self.inner.scheduler.counters.failed.lock().unwrap_or_else(|e| e.into_inner());
            (failed.is_none(), failed.get_or_insert(reason).clone())
        };
        if newly {
            tracing::error!("{reason}; {} request(s) ended", self.inner.scheduler.counters.admitted.load(Ordering::SeqCst));
            let _ = self.inner.scheduler.tx.send(Msg::Fail(reason.clone()));
            self.update_status(|s| s.state = format!("failed: {reason}"));
        }
        reason
    }

    /// [`Self::fail_all`] for a broken link, after [`LINK_LOSS_GRACE`].
    async fn fail_link(&self, why: String) -> String {
        tokio::time::sleep(LINK_LOSS_GRACE).await;
        self.fail_all(why)
    }

    /// Hands what comes back from the last stage to the scheduler.
    async fn receive(self, upstream: Arc<Link>) {
        loop {
            let frame = match upstream.recv().await {
                Ok(f) => f,
                Err(e) => {
                    self.fail_link(format!("the link from the last stage ended: {e}")).await;
                    return;
                }
            };
            let result = match frame.kind {
                FrameKind::Tokens => decode_sampled(&frame)
                    .map(|v| v.into_iter().map(|(span, s)| (span.seq_id, s)).collect())
                    .map_err(|e| format!("the last stage's answer: {e}")),
                FrameKind::Control => Err(parse_failure(&frame).to_string()),
                FrameKind::Hidden => Err("the last stage sent hidden states instead of tokens".into()),
            };
            if self.inner.scheduler.tx.send(Msg::Returned { micro_batch: frame.micro_batch, result }).is_err() {
                return;
            }
        }
    }

    /// Follows a worker's health stream; silence or a broken stream means the worker is gone.
    async fn watch(self, i: usize) {
        let w = &self.inner.workers[i];
        let label = format!("worker {} ({})", w.name, w.endpoint);
        let mut client = w.client.clone();
        let why = match client.health(pb::HealthRequest { interval_ms: HEARTBEAT_INTERVAL_MS }).await {
            Err(s) => format!("health stream refused: {}", s.message()),
            Ok(r) => {
                let mut stream = r.into_inner();
                loop {
                    match tokio::time::timeout(HEARTBEAT_TIMEOUT, stream.next()).await {
                        Err(_) => break format!("no heartbeat for {HEARTBEAT_TIMEOUT:?}"),
                        Ok(None) => break "health stream ended".to_string(),
                        Ok(Some(Err(s))) => break format!("health stream broke: {}", s.message()),
                        Ok(Some(Ok(beat))) => {
                            let load = beat.load.unwrap_or_default();
                            if let Ok(mut s) = self.inner.status.lock() {
                                if let Some(n) = s.nodes.iter_mut().find(|n| n.endpoint == w.endpoint) {
                                    n.available_memory = load.available_memory;
                                    n.kv_bytes = load.kv_bytes_used;
                                    n.active_sequences = load.active_sequences;
                                    // A busy stage reports zeros; the counters only grow.
                                    n.forwards = n.forwards.max(load.forwards);
                                    n.forward_seconds = n.forward_seconds.max(load.forward_seconds);
                                }
                            }
                        }
                    }
                }
            }
        };
        let endpoint = w.endpoint.clone();
        self.update_status(|s| {
            if let Some(n) = s.nodes.iter_mut().find(|n| n.endpoint == endpoint) {
                n.alive = false;
                n.detail = why.clone();
            }
        });
        self.fail_all(format!("{label} is gone ({why})"));
    }

    /// Admits a request into the scheduler; its tokens stream back on the returned stream, which
    /// cancels the request (and frees its KV on every stage) when dropped.
    pub fn submit(&self, req: GenerationRequest) -> std::result::Result<TokenStream, SubmitError> {
        self.inner.scheduler.submit(req)
    }

    /// `Ok` while the cluster serves; otherwise why it does not.
    pub fn readiness(&self) -> std::result::Result<(), String> {
        self.inner.scheduler.failed().map_or(Ok(()), Err)
    }

    /// Live figures: queue, sequences, KV per stage, stage 0's forward time, links.
    pub fn stats(&self) -> BackendStats {
        let c = &self.inner.scheduler.counters;
        let running = c.running.load(Ordering::SeqCst);
        let status = self.status();
        let mut stages = Vec::new();
        if self.inner.local {
            stages.push(StageStats {
                stage: format!("0 {}", status.head),
                forwards: c.local_forwards.load(Ordering::Relaxed),
                forward_seconds: c.local_forward_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
                kv_bytes: c.local_kv_bytes.load(Ordering::Relaxed),
            });
        }
        for (i, n) in status.nodes.iter().filter(|n| !n.endpoint.is_empty()).enumerate() {
            stages.push(StageStats {
                stage: format!("{} {}", i + usize::from(self.inner.local), n.name),
                forwards: n.forwards,
                forward_seconds: n.forward_seconds,
                kv_bytes: n.kv_bytes,
            });
        }
        BackendStats {
            queued: c.admitted.load(Ordering::SeqCst).saturating_sub(running),
            in_flight: running,
            kv_bytes: stages.iter().map(|s| s.kv_bytes).sum(),
            stages,
            links: status
                .links
                .iter()
                .map(|l| LinkStats { from: l.from.clone(), to: l.to.clone(), transport: l.transport.clone(), rtt_seconds: l.rtt_us * 1e-6 })
                .collect(),
        }
    }

    /// Starts a request; its events arrive on the returned channel, ending with `Done` or an error.
    /// Dropping the receiver cancels the request.
    pub fn generate(&self, req: GenerateRequest) -> mpsc::Receiver<Result<Event>> {
        let (tx, rx) = mpsc::channel(64);
        let submitted = self.submit(GenerationRequest {
            prompt_tokens: req.prompt.clone(),
            sampling: req.sampling,
            max_tokens: req.max_tokens,
            stop_token_ids: req.stop_ids,
        });
        let prompt_tokens = req.prompt.len();
        let head = self.clone();
        tokio::spawn(async move {
            let mut stream = match submitted {
                Ok(s) => s,
                Err(SubmitError::NotReady(why)) => return drop(tx.send(Err(HeadError::Unavailable(why))).await),
                Err(e) => return drop(tx.send(Err(HeadError::Request(e.to_string()))).await),
            };
            let started = Instant::now();
            let (mut generated, mut prefill_s, mut decode_start) = (0usize, 0.0, Instant::now());
            let outcome = loop {
                match stream.next().await {
                    Some(StreamEvent::Token(s)) => {
                        if generated == 0 {
                            prefill_s = started.elapsed().as_secs_f64();
                            decode_start = Instant::now();
                        }
                        generated += 1;
                        if tx.send(Ok(Event::Token(s.token))).await.is_err() {
                            return;
                        }
                    }
                    Some(StreamEvent::Finished(f)) => {
                        let finish = match f {
                            baton_model::generation::Finish::Stop => Finish::Stop,
                            baton_model::generation::Finish::Length => Finish::Length,
                        };
                        if generated == 0 {
                            prefill_s = started.elapsed().as_secs_f64();
                        }
                        let decode_tok_s = generated.saturating_sub(1) as f64 / decode_start.elapsed().as_secs_f64().max(1e-9);
                        head.update_status(|s| {
                            s.tokens_generated += generated as u64;
                            s.last_decode_tok_s = decode_tok_s;
                        });
                        break Ok(Event::Done { finish, prompt_tokens, generated, prefill_s, decode_tok_s });
                    }
                    Some(StreamEvent::Failed(why)) => break Err(HeadError::Request(why)),
                    None => break Err(HeadError::Request("the scheduler dropped this request".into())),
                }
            };
            let _ = tx.send(outcome).await;
        });
        rx
    }

    /// Records that the head is exiting, so `baton status` does not show a stale cluster as serving.
    pub fn mark_stopped(&self) {
        self.update_status(|s| s.state = "stopped".into());
    }

    /// Asks every worker to shut down (used when the head owns its workers' lifetime).
    pub async fn shutdown_workers(&self, reason: &str) {
        for w in &self.inner.workers {
            let mut client = w.client.clone();
            let call = client.shutdown(pb::ShutdownRequest { reason: reason.into() });
            let _ = tokio::time::timeout(Duration::from_secs(1), call).await;
        }
    }
}
