//! The head: connects workers, places layers, loads shards, sets up the chain
//! head (stage 0) → worker → … → last worker → head, and runs requests through it.
//!
//! Requests go through the [`crate::scheduler`], which packs the running sequences into
//! micro-batches and keeps several in flight, so the stages work on different micro-batches at
//! once; one receiver task hands what the last stage sends back to the scheduler.
//!
//! The chain is rebuilt when a node is lost (its health stream breaks or falls silent, or a data
//! link breaks), drained or joined: the scheduler pauses, the head finds out which workers still
//! answer, plans over them, loads only the shards that changed, links the new chain and resumes
//! every stream on it. When the model no longer fits, every request ends with the reason and new
//! ones are refused until a re-plan succeeds.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use baton_api::backend::{BackendStats, GenerationRequest, LinkStats, NodeStats, StageStats, StreamEvent, SubmitError, TokenStream};

use baton_model::loader::ModelSource;
use baton_model::manifest::Manifest;
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
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::placement::{place, NodeReport, Placement};
use crate::scheduler::{self, Chain, Msg, SchedulerConfig};
use crate::status::{ClusterStatus, LinkStatus, NodeStatus, StageStatus};

/// Attempts at rebuilding the chain after a loss before the head gives up (each one first finds
/// out again which workers answer, so a second loss during a rebuild is survived too).
const REPLAN_ATTEMPTS: usize = 3;
/// Least time between building a chain and rebuilding it after a loss.
const REBUILD_SPACING: Duration = Duration::from_secs(1);
/// A worker that does not answer `Hello` within this is refused.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A `LoadShard` that reports nothing for this long is given up (a worker reports at least every
/// 10 s while it reads weights; a push in progress is not waiting on it).
const LOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(40);

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
    /// A worker whose health stream stays silent this long is declared gone (a killed process
    /// breaks the stream at once; this catches a host that vanished).
    pub failure_timeout: Duration,
    /// Re-plan on its own, once no request runs, when a worker joined since the last plan.
    pub rebalance_when_idle: bool,
}

impl HeadConfig {
    /// The head of `workers` for `model` with the defaults of `baton head`: stage 0 on the head's
    /// CPU, bf16 wire, any transport, failure timeout 3 s, no status file.
    pub fn new(model: PathBuf, workers: Vec<String>, key: baton_cluster::key::ClusterKey) -> Self {
        Self {
            model,
            workers,
            key,
            name: "head".into(),
            id: String::new(),
            wire: WireDType::Bf16,
            preference: Preference::Auto,
            local_stage: true,
            device: Device::Cpu,
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            status_path: None,
            scheduler: SchedulerConfig::default(),
            cluster: baton_cluster::config::ClusterConfig::default(),
            failure_timeout: DEFAULT_FAILURE_TIMEOUT,
            rebalance_when_idle: false,
        }
    }
}

/// See [`HeadConfig::failure_timeout`].
pub const DEFAULT_FAILURE_TIMEOUT: Duration = Duration::from_secs(3);

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

#[derive(Clone)]
struct WorkerHandle {
    name: String,
    endpoint: String,
    client: WorkerClient<Channel>,
    info: pb::NodeInfo,
}

/// The head's own stage 0 and the layers it holds.
struct LocalShard {
    range: Range<usize>,
    stage: Arc<Mutex<Stage>>,
}

/// Who the cluster is made of; behind an async lock that also serializes re-plans.
struct Membership {
    /// Workers the head may use, in chain order (the configured ones, then those that joined).
    pool: Vec<WorkerHandle>,
    /// Endpoints of the workers the current chain runs on.
    chain: Vec<String>,
    local: Option<LocalShard>,
    /// The current chain's number (0 before the first).
    epoch: u64,
    /// The current chain's receiver and health watchers, stopped when it is replaced.
    tasks: Vec<JoinHandle<()>>,
    /// When the current chain went into use.
    installed: Instant,
}

/// What the model looks like to the planner and to weight pushes.
struct ModelInfo {
    manifest: Manifest,
    n_layers: usize,
    parts: Vec<PathBuf>,
}

struct Inner {
    cfg: HeadConfig,
    model: ModelInfo,
    security: baton_proto::ControlSecurity,
    link_cfg: LinkConfig,
    scheduler: scheduler::Handle,
    status: Mutex<ClusterStatus>,
    members: tokio::sync::Mutex<Membership>,
    /// The epoch of the chain in use, readable without the membership lock.
    epoch: AtomicU64,
    replans: AtomicU64,
    /// Times each node (by name) was lost.
    losses: Mutex<HashMap<String, u64>>,
}

#[derive(Clone)]
pub struct Head {
    inner: Arc<Inner>,
}

/// What a re-plan did, for the operator.
#[derive(Debug, Clone, Default)]
pub struct Replanned {
    /// `"<index> <node> <start>..<end> (<where its weights came from>)"` per stage.
    pub stages: Vec<String>,
    /// Streams that paused and continue on the new chain.
    pub resumed: usize,
    /// From the pause to the resumed chain.
    pub pause: Duration,
}

/// A new chain, linked and loaded, not yet in use.
struct Built {
    chain: Chain,
    upstream: Link,
    local: Option<LocalShard>,
    placement: String,
    stages: Vec<StageStatus>,
    links: Vec<LinkStatus>,
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

fn hello_request(cfg: &HeadConfig) -> pb::HelloRequest {
    pb::HelloRequest {
        head_id: cfg.id.clone(),
        head_name: cfg.name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: Some(worker_protocol()),
        cluster_id: cfg.key.cluster_id(),
    }
}

/// `"<index> <node> <layers> (<source>)"`, as the operator commands print it.
fn stage_line(s: &StageStatus) -> String {
    format!("{} {} {} ({})", s.index, s.node, s.layers, s.source)
}

/// A worker's line in the status, in `state`.
fn node_status(w: &WorkerHandle, state: &str) -> NodeStatus {
    NodeStatus {
        name: w.name.clone(),
        id: w.info.id.clone(),
        endpoint: w.endpoint.clone(),
        alive: true,
        state: state.into(),
        backend: w.info.backend().short_name().into(),
        total_memory: w.info.total_memory,
        available_memory: w.info.available_memory,
        ..Default::default()
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
    let reply = tokio::time::timeout(HELLO_TIMEOUT, client.hello(hello_request(cfg)))
        .await
        .map_err(|_| werr(format!("no answer to hello within {HELLO_TIMEOUT:?}")))?
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
    let mut stream = tokio::time::timeout(LOAD_IDLE_TIMEOUT, w.client.clone().load_shard(req))
        .await
        .map_err(|_| werr(format!("no answer to the load within {LOAD_IDLE_TIMEOUT:?}")))?
        .map_err(|s| werr(s.message().to_string()))?
        .into_inner();
    loop {
        let p = match tokio::time::timeout(LOAD_IDLE_TIMEOUT, stream.next()).await {
            Ok(Some(p)) => p.map_err(|s| werr(format!("load stream: {}", s.message())))?,
            Ok(None) => break,
            Err(_) => return Err(werr(format!("no load progress for {LOAD_IDLE_TIMEOUT:?}"))),
        };
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
        let model = ModelInfo { manifest: source.manifest(), n_layers: source.config().n_layers, parts: source.files() };
        let security = baton_proto::ControlSecurity::new(cfg.key.as_bytes()).map_err(|e| HeadError::Config(e.to_string()))?;
        let link_cfg = LinkConfig::new(baton_transport::ClusterKey::from_bytes(cfg.key.as_bytes()).map_err(|e| HeadError::Config(format!("cluster key: {e}")))?);
        let mut pool = Vec::new();
        for endpoint in &cfg.workers {
            let w = hello(endpoint, &cfg, &security).await?;
            tracing::info!("worker {} ({}) at {endpoint}: backend {}, {} MiB available", w.name, w.info.id, w.info.backend().short_name(), w.info.available_memory >> 20);
            pool.push(w);
        }
        let mut status = ClusterStatus {
            head: cfg.name.clone(),
            pid: std::process::id(),
            model: cfg.model.display().to_string(),
            wire_dtype: format!("{:?}", cfg.wire).to_lowercase(),
            state: "starting".into(),
            ..Default::default()
        };
        if cfg.local_stage {
            let (total, available) = baton_worker::sysinfo::memory();
            status.nodes.push(NodeStatus { name: cfg.name.clone(), id: cfg.id.clone(), alive: true, state: "serving".into(), backend: "head".into(), total_memory: total, available_memory: available, ..Default::default() });
        }
        for w in &pool {
            status.nodes.push(node_status(w, "spare"));
        }
        let (handle, messages) = scheduler::Handle::new(&cfg.scheduler);
        let scheduler_cfg = cfg.scheduler.clone();
        let head = Head {
            inner: Arc::new(Inner {
                cfg,
                model,
                security,
                link_cfg,
                scheduler: handle.clone(),
                status: Mutex::new(status),
                members: tokio::sync::Mutex::new(Membership { pool, chain: Vec::new(), local: None, epoch: 0, tasks: Vec::new(), installed: Instant::now() }),
                epoch: AtomicU64::new(0),
                replans: AtomicU64::new(0),
                losses: Mutex::default(),
            }),
        };
        head.write_status();
        {
            let mut m = head.inner.members.lock().await;
            let workers = m.pool.clone();
            let built = head.build(&mut m, &workers).await?;
            // The scheduler takes the first chain like any later one: its Resume is queued first.
            tokio::spawn(scheduler::run(handle, messages, scheduler_cfg));
            head.install(&mut m, built, &workers).await;
        }
        if head.inner.cfg.rebalance_when_idle {
            tokio::spawn(head.clone().rebalance_when_idle());
        }
        Ok(head)
    }

    /// Places the model over the head (when it hosts stage 0) and `workers`, loads every shard
    /// that changed and links the chain; the chain is not used until [`Self::install`].
    async fn build(&self, m: &mut Membership, workers: &[WorkerHandle]) -> Result<Built> {
        let cfg = &self.inner.cfg;
        let manifest = &self.inner.model.manifest;
        if workers.is_empty() {
            return Err(HeadError::Unavailable("no worker is left to run the chain".into()));
        }
        let epoch = m.epoch + 1;
        let Placement { ranges, how: placement } = self.plan(m, workers)?;
        tracing::info!("placement: {placement} (chain {epoch})");
        let (local_range, worker_ranges) = if cfg.local_stage { (Some(ranges[0].clone()), &ranges[1..]) } else { (None, &ranges[..]) };
        let layers = |r: &Range<usize>| format!("{}..{}", r.start, r.end);
        let mut stages = Vec::new();
        if let Some(r) = &local_range {
            stages.push(StageStatus { index: 0, node: cfg.name.clone(), layers: layers(r), weight_bytes: manifest.stage_weight_bytes(r.start, r.end), source: String::new() });
        }
        for (w, r) in workers.iter().zip(worker_ranges) {
            stages.push(StageStatus { index: stages.len(), node: w.name.clone(), layers: layers(r), weight_bytes: manifest.stage_weight_bytes(r.start, r.end), source: String::new() });
        }

        // Load every shard at once: the head's own on a blocking thread, the workers' remotely.
        // A shard whose layers did not change is kept (the worker decides the same for its own).
        let previous = m.local.take();
        let local_load = local_range.clone().map(|r| {
            let (path, device, wire) = (cfg.model.clone(), cfg.device.clone(), cfg.wire);
            tokio::task::spawn_blocking(move || -> Result<(LocalShard, u64, &'static str)> {
                if let Some(p) = previous.filter(|p| p.range == r) {
                    let epoch = p.stage.lock().map_err(|_| HeadError::Config("stage 0 poisoned".into()))?.reset(wire);
                    tracing::info!("stage 0: layers {}..{} kept", r.start, r.end);
                    return Ok((p, epoch, "kept"));
                }
                let source = ModelSource::open(&path)?;
                let stage = Stage::new(Shard::load(&source, r.clone(), &device)?, wire);
                let epoch = stage.epoch();
                Ok((LocalShard { range: r, stage: Arc::new(Mutex::new(stage)) }, epoch, "local"))
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
                n_layers: self.inner.model.n_layers as u32,
                wire_dtype: wire_to_proto(cfg.wire) as i32,
                kv: None,
                allow_push: true,
                chain: epoch,
            };
            let push = PushFrom { security: self.inner.security.clone(), parts: self.inner.model.parts.clone(), range: r.clone(), n_layers: self.inner.model.n_layers };
            let handle = w.clone();
            remote.spawn(async move { (i, load_remote(&handle, req, Some(push)).await) });
        }
        while let Some(done) = remote.join_next().await {
            let (i, m) = done.map_err(|e| HeadError::Config(format!("load task: {e}")))?;
            let m = m?;
            tracing::info!("{}: layers {} loaded ({} MiB, {})", workers[i].name, m.layers.unwrap_or_default(), m.weight_bytes >> 20, m.source);
            stages[i + usize::from(cfg.local_stage)].source = m.source;
        }
        let (local, local_epoch) = match local_load {
            Some(t) => {
                let (l, e, source) = t.await.map_err(|e| HeadError::Config(format!("load task: {e}")))??;
                stages[0].source = source.into();
                (Some(l), e)
            }
            None => (None, 0),
        };

        // Links, each set up with both ends negotiating at once: data flows from the end that
        // connects to the end that accepts.
        let opts = NegotiateOptions { preference: cfg.preference, ..Default::default() };
        let data: Vec<SocketAddr> = workers
            .iter()
            .map(|w| reachable(w.info.data_addrs.first().map(String::as_str).unwrap_or(""), &w.endpoint))
            .collect::<Result<_>>()?;
        let head_label = cfg.name.clone();
        let mut links = Vec::new();

        let mut first_client = workers[0].client.clone();
        let (accepted, dialed) = tokio::join!(
            first_client.setup_link(setup_request("head->0", pb::LinkRole::Accept, None, cfg)),
            dial(data[0], &self.inner.link_cfg, &opts)
        );
        accepted.map_err(|s| HeadError::Link(format!("{} accepting from the head: {}", workers[0].name, s.message())))?;
        let downstream = dialed.map_err(|e| HeadError::Link(format!("head to {}: {e}", workers[0].name)))?;
        links.push(link_status(&head_label, &workers[0].name, &downstream.report));

        for i in 0..workers.len() - 1 {
            let (mut a, mut b) = (workers[i].client.clone(), workers[i + 1].client.clone());
            let id = format!("{i}->{}", i + 1);
            let (sent, acc) = tokio::join!(
                a.setup_link(setup_request(&id, pb::LinkRole::Connect, Some(data[i + 1]), cfg)),
                b.setup_link(setup_request(&id, pb::LinkRole::Accept, None, cfg))
            );
            acc.map_err(|s| HeadError::Link(format!("{} accepting from {}: {}", workers[i + 1].name, workers[i].name, s.message())))?;
            let reply = sent.map_err(|s| HeadError::Link(format!("{} to {}: {}", workers[i].name, workers[i + 1].name, s.message())))?.into_inner();
            links.push(reply_status(&workers[i].name, &workers[i + 1].name, &reply));
        }

        let last = workers.len() - 1;
        let bind_ip = if cfg.bind_ip.is_unspecified() { local_ip_towards(data[last]).unwrap_or(cfg.bind_ip) } else { cfg.bind_ip };
        let acceptor = Acceptor::bind(SocketAddr::new(bind_ip, 0), &self.inner.link_cfg, &opts).await.map_err(|e| HeadError::Link(format!("head data listener: {e}")))?;
        let head_data = acceptor.local_addr().map_err(|e| HeadError::Link(e.to_string()))?;
        let mut last_client = workers[last].client.clone();
        let (sent, acc) = tokio::join!(
            last_client.setup_link(setup_request("last->head", pb::LinkRole::Connect, Some(head_data), cfg)),
            acceptor.accept()
        );
        let reply = sent.map_err(|s| HeadError::Link(format!("{} to the head: {}", workers[last].name, s.message())))?.into_inner();
        let upstream = acc.map_err(|e| HeadError::Link(format!("head accepting from {}: {e}", workers[last].name)))?;
        links.push(reply_status(&workers[last].name, &head_label, &reply));
        tracing::info!("chain {epoch} ready: {} stages, {}", stages.len(), links.iter().map(|l| format!("{}→{} {} {:.0} µs", l.from, l.to, l.transport, l.rtt_us)).collect::<Vec<_>>().join(", "));

        let on_fail = self.clone();
        let chain = Chain {
            epoch,
            local: local.as_ref().map(|l| l.stage.clone()),
            local_epoch,
            downstream: Arc::new(downstream.link),
            workers: workers.iter().map(|w| (w.name.clone(), w.client.clone())).collect(),
            n_stages: stages.len(),
            on_link_failure: Box::new(move |why| on_fail.lost(epoch, why)),
        };
        Ok(Built { chain, upstream: upstream.link, local, placement, stages, links })
    }

    /// The planner over the head (when it hosts stage 0) and `workers`. A node's own shard counts
    /// as free memory: a re-plan replaces it.
    fn plan(&self, m: &Membership, workers: &[WorkerHandle]) -> Result<Placement> {
        let cfg = &self.inner.cfg;
        let held = |node: &str| -> u64 { self.status().stages.iter().filter(|s| s.node == node).map(|s| s.weight_bytes).sum() };
        let mut reports = Vec::new();
        if cfg.local_stage {
            let (total, available) = baton_worker::sysinfo::memory();
            let own = m.local.as_ref().map_or(0, |l| self.inner.model.manifest.stage_weight_bytes(l.range.start, l.range.end));
            let backend = if cfg.device.is_cuda() { "cuda" } else if cfg.device.is_metal() { "metal" } else { "cpu" };
            reports.push(NodeReport { name: cfg.name.clone(), total_memory: total, available_memory: available + own, backend: backend.into(), bandwidth: 0 });
        }
        for w in workers {
            let available = w.info.available_memory + if m.chain.contains(&w.endpoint) { held(&w.name) } else { 0 };
            reports.push(NodeReport { name: w.name.clone(), total_memory: w.info.total_memory, available_memory: available, backend: w.info.backend().short_name().into(), bandwidth: w.info.memory_bandwidth });
        }
        let batch_tokens = (cfg.scheduler.prefill_chunk + cfg.scheduler.max_batch) as u64;
        place(&self.inner.model.manifest, &reports, &cfg.cluster, batch_tokens, cfg.local_stage)
    }

    /// Takes a built chain into use: the scheduler resumes on it, its receiver and health watchers
    /// start, the status shows it. Returns how many streams resumed.
    async fn install(&self, m: &mut Membership, built: Built, workers: &[WorkerHandle]) -> usize {
        let epoch = built.chain.epoch;
        for t in m.tasks.drain(..) {
            t.abort();
        }
        m.epoch = epoch;
        m.installed = Instant::now();
        m.chain = workers.iter().map(|w| w.endpoint.clone()).collect();
        m.local = built.local;
        self.inner.epoch.store(epoch, Ordering::SeqCst);
        let in_chain = m.chain.clone();
        let pool: Vec<String> = m.pool.iter().map(|w| w.endpoint.clone()).collect();
        self.update_status(|s| {
            s.state = "serving".into();
            s.placement = built.placement;
            s.stages = built.stages;
            s.links = built.links;
            s.replans = epoch.saturating_sub(1);
            for n in s.nodes.iter_mut().filter(|n| !n.endpoint.is_empty()) {
                if in_chain.contains(&n.endpoint) {
                    (n.alive, n.state) = (true, "serving".into());
                    n.detail.clear();
                } else if pool.contains(&n.endpoint) {
                    (n.alive, n.state) = (true, "spare".into());
                }
            }
        });
        m.tasks.push(tokio::spawn(self.clone().receive(epoch, built.upstream)));
        for w in workers {
            m.tasks.push(tokio::spawn(self.clone().watch(epoch, w.clone())));
        }
        let (tx, rx) = oneshot::channel();
        let _ = self.inner.scheduler.tx.send(Msg::Resume { chain: built.chain, resumed: tx });
        rx.await.unwrap_or(0)
    }

    /// A node or link of chain `epoch` was lost: pause every stream at once, then rebuild.
    fn lost(&self, epoch: u64, why: String) {
        let head = self.clone();
        tokio::spawn(async move {
            if head.inner.epoch.load(Ordering::SeqCst) != epoch {
                return;
            }
            let _ = head.inner.scheduler.tx.send(Msg::Suspend { epoch, why: why.clone() });
            let mut m = head.inner.members.lock().await;
            // Several signals report one loss (the health stream, the links on either side): the
            // first rebuilds, the others find a newer chain.
            if m.epoch != epoch {
                return;
            }
            tracing::warn!("chain {epoch} broke: {why}; rebuilding");
            head.update_status(|s| s.state = format!("recovering: {why}"));
            // A chain that breaks as soon as it is built (a worker that keeps breaking it) is
            // rebuilt at most once per REBUILD_SPACING, not as fast as it breaks.
            if let Some(wait) = REBUILD_SPACING.checked_sub(m.installed.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            let _ = head.replan(&mut m).await;
        });
    }

    /// Rebuilds the chain over the pool's workers that still answer; the scheduler must be
    /// suspended. When no chain can be built, every request ends with the reason.
    async fn replan(&self, m: &mut Membership) -> Result<Replanned> {
        let paused = Instant::now();
        for t in m.tasks.drain(..) {
            t.abort();
        }
        let (mut last, mut lost) = (String::new(), Vec::new());
        for attempt in 1..=REPLAN_ATTEMPTS {
            lost.extend(self.prune(m).await);
            let workers = m.pool.clone();
            match self.build(m, &workers).await {
                Ok(built) => {
                    let stages = built.stages.iter().map(stage_line).collect();
                    let resumed = self.install(m, built, &workers).await;
                    self.inner.replans.fetch_add(1, Ordering::Relaxed);
                    let pause = paused.elapsed();
                    self.update_status(|s| {
                        s.resumed_sequences += resumed as u64;
                        s.last_pause_ms = pause.as_millis() as u64;
                    });
                    tracing::info!("chain {} serving after a {:.0} ms pause; {resumed} stream(s) resumed", m.epoch, pause.as_secs_f64() * 1e3);
                    return Ok(Replanned { stages, resumed, pause });
                }
                Err(HeadError::Plan(why)) => {
                    last = format!("the model no longer fits the remaining nodes: {why}");
                    break;
                }
                Err(HeadError::Unavailable(why)) => {
                    last = why;
                    break;
                }
                Err(e) => {
                    tracing::warn!("rebuilding the chain, attempt {attempt} of {REPLAN_ATTEMPTS}: {e}");
                    last = e.to_string();
                }
            }
        }
        let reason = if lost.is_empty() { format!("cannot rebuild the chain: {last}") } else { format!("lost {}; cannot rebuild the chain: {last}", lost.join(", ")) };
        Err(HeadError::Unavailable(self.fail_all(reason)))
    }

    /// Drops the workers of the pool that no longer answer (within the failure timeout), marking
    /// them gone with why; refreshes what the others report (their free memory). Returns
    /// `"<name> (<why>)"` for each worker dropped.
    async fn prune(&self, m: &mut Membership) -> Vec<String> {
        let timeout = self.inner.cfg.failure_timeout;
        let mut probes = tokio::task::JoinSet::new();
        for (i, w) in m.pool.iter().enumerate() {
            let (mut client, req) = (w.client.clone(), self.hello_request());
            probes.spawn(async move {
                let r = match tokio::time::timeout(timeout, client.hello(req)).await {
                    Ok(Ok(r)) => r.into_inner().node.ok_or_else(|| "no node info in hello".to_string()),
                    Ok(Err(s)) => Err(format!("unreachable: {}", s.message())),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                (i, r)
            });
        }
        let mut gone = Vec::new();
        while let Some(Ok((i, r))) = probes.join_next().await {
            match r {
                Ok(info) => m.pool[i].info = info,
                Err(why) => gone.push((i, why)),
            }
        }
        gone.sort_unstable_by_key(|&(i, _)| std::cmp::Reverse(i));
        gone.into_iter()
            .map(|(i, why)| {
                let w = m.pool.remove(i);
                self.node_gone(&w.name, &w.endpoint, &why);
                format!("{} ({why})", w.name)
            })
            .collect()
    }

    /// Records that a worker is gone: status (keeping an earlier, more telling reason), log, loss count.
    fn node_gone(&self, name: &str, endpoint: &str, why: &str) {
        let mut first = false;
        self.update_status(|s| {
            if let Some(n) = s.nodes.iter_mut().find(|n| n.endpoint == endpoint) {
                if n.alive {
                    (n.alive, n.state, n.detail) = (false, "gone".into(), why.to_string());
                    first = true;
                } else if n.state != "gone" {
                    (n.state, n.detail) = ("gone".into(), why.to_string());
                    first = true;
                }
            }
        });
        if first {
            tracing::error!("worker {name} ({endpoint}) is gone: {why}");
            *self.inner.losses.lock().unwrap_or_else(|e| e.into_inner()).entry(name.to_string()).or_default() += 1;
        }
    }

    fn hello_request(&self) -> pb::HelloRequest {
        hello_request(&self.inner.cfg)
    }

    /// Re-plans without `node` (a worker's name or endpoint), resuming every stream on the new
    /// chain. Refused, with nothing changed, when the model would not fit without it.
    pub async fn drain(&self, node: &str) -> Result<Replanned> {
        let mut m = self.inner.members.lock().await;
        let Some(i) = m.pool.iter().position(|w| w.name == node || w.endpoint == node) else {
            let known: Vec<&str> = m.pool.iter().map(|w| w.name.as_str()).collect();
            return Err(HeadError::Config(format!("no worker {node} in this cluster (workers: {})", known.join(", "))));
        };
        let rest: Vec<WorkerHandle> = m.pool.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, w)| w.clone()).collect();
        if rest.is_empty() {
            return Err(HeadError::Plan(format!("{node} is the last worker: the chain needs at least one")));
        }
        self.plan(&m, &rest).map_err(|e| HeadError::Plan(format!("draining {node} would leave too little memory: {e}")))?;
        let w = m.pool.remove(i);
        let used = m.chain.contains(&w.endpoint);
        let result = if used {
            let _ = self.inner.scheduler.tx.send(Msg::Suspend { epoch: m.epoch, why: format!("draining {}", w.name) });
            self.update_status(|s| s.state = format!("re-planning: draining {}", w.name));
            self.replan(&mut m).await
        } else {
            Ok(Replanned { stages: self.stage_lines(), ..Default::default() })
        };
        self.update_status(|s| {
            if let Some(n) = s.nodes.iter_mut().find(|n| n.endpoint == w.endpoint) {
                (n.alive, n.state, n.detail) = (false, "drained".into(), "drained by the operator: it may be stopped".into());
            }
        });
        tracing::info!("worker {} ({}) drained", w.name, w.endpoint);
        // It refuses new sequences from now on, should anything still reach it.
        let mut client = w.client.clone();
        let _ = tokio::time::timeout(Duration::from_secs(1), client.drain(pb::DrainRequest { timeout_ms: 0 })).await;
        result
    }

    /// Makes the worker at `endpoint` known (it must hold the cluster key); it is used at the next
    /// re-plan. Returns its name and what happens next.
    pub async fn join(&self, endpoint: &str) -> Result<(String, String)> {
        let w = hello(endpoint, &self.inner.cfg, &self.inner.security).await?;
        let mut m = self.inner.members.lock().await;
        if m.pool.iter().any(|p| p.endpoint == w.endpoint || p.info.id == w.info.id) {
            return Ok((w.name, "already a member of this cluster".into()));
        }
        tracing::info!("worker {} ({}) joined: backend {}, {} MiB available", w.name, w.endpoint, w.info.backend().short_name(), w.info.available_memory >> 20);
        self.update_status(|s| {
            s.nodes.retain(|n| n.endpoint != w.endpoint);
            s.nodes.push(node_status(&w, "spare"));
        });
        let name = w.name.clone();
        m.pool.push(w);
        let next = if self.inner.cfg.rebalance_when_idle { "used at the next re-plan: once no request runs, or `baton rebalance`" } else { "used at the next re-plan (`baton rebalance`)" };
        Ok((name, next.into()))
    }

    /// Re-plans now over every known worker that answers; streams resume on the new chain.
    /// Refused, with nothing changed, when the model would not fit them.
    pub async fn rebalance(&self) -> Result<Replanned> {
        let mut m = self.inner.members.lock().await;
        let pool = m.pool.clone();
        self.plan(&m, &pool)?;
        let _ = self.inner.scheduler.tx.send(Msg::Suspend { epoch: m.epoch, why: "rebalancing".into() });
        self.update_status(|s| s.state = "re-planning: rebalancing".into());
        self.replan(&mut m).await
    }

    /// With `rebalance_when_idle`: re-plans once no request runs and a worker waits to be used
    /// (or the cluster had failed and has workers again).
    async fn rebalance_when_idle(self) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            if self.inner.scheduler.counters.admitted.load(Ordering::SeqCst) > 0 {
                continue;
            }
            let waiting = {
                let m = self.inner.members.lock().await;
                m.pool.iter().any(|w| !m.chain.contains(&w.endpoint))
            };
            if waiting {
                tracing::info!("idle with a worker waiting: re-planning");
                if let Err(e) = self.rebalance().await {
                    tracing::warn!("re-plan when idle: {e}");
                }
            }
        }
    }

    fn stage_lines(&self) -> Vec<String> {
        self.status().stages.iter().map(stage_line).collect()
    }

    pub fn status(&self) -> ClusterStatus {
        self.inner.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Records where the head's operator service listens (`baton drain` and friends read it).
    pub fn set_control_addr(&self, addr: SocketAddr) {
        self.update_status(|s| s.control = addr.to_string());
    }

    pub(crate) fn security(&self) -> &baton_proto::ControlSecurity {
        &self.inner.security
    }

    fn update_status(&self, f: impl FnOnce(&mut ClusterStatus)) {
        if let Ok(mut s) = self.inner.status.lock() {
            f(&mut s);
            s.updated_unix_ms = unix_ms();
        }
        self.write_status();
    }

    fn write_status(&self) {
        let Some(path) = &self.inner.cfg.status_path else { return };
        let snapshot = self.status();
        if let Err(e) = snapshot.write(path) {
            tracing::warn!("writing {}: {e}", path.display());
        }
    }

    /// Marks the cluster failed and ends every request with the reason; returns it.
    fn fail_all(&self, reason: String) -> String {
        *self.inner.scheduler.counters.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
        tracing::error!("{reason}; {} request(s) ended", self.inner.scheduler.counters.admitted.load(Ordering::SeqCst));
        let _ = self.inner.scheduler.tx.send(Msg::Fail(reason.clone()));
        self.update_status(|s| s.state = format!("failed: {reason}"));
        reason
    }

    /// Hands what comes back from the last stage of chain `epoch` to the scheduler.
    async fn receive(self, epoch: u64, upstream: Link) {
        loop {
            let frame = match upstream.recv().await {
                Ok(f) => f,
                Err(e) => {
                    self.lost(epoch, format!("the link from the last stage ended: {e}"));
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
            if self.inner.scheduler.tx.send(Msg::Returned { micro_batch: frame.micro_batch, result, in_order: true }).is_err() {
                return;
            }
        }
    }

    /// Follows a worker's health stream for chain `epoch`; a broken stream, or silence that a
    /// direct `Hello` cannot break either, means the worker is gone.
    async fn watch(self, epoch: u64, w: WorkerHandle) {
        let timeout = self.inner.cfg.failure_timeout;
        // Silence for two thirds of the timeout, then a `Hello` within the last third: a worker
        // starved of CPU (late beats) is told from a vanished one within the timeout.
        let (silence, probe) = (timeout * 2 / 3, timeout / 3);
        // Ten beats per timeout, so one late beat is no alarm; never faster than the worker allows.
        let interval_ms = (timeout.as_millis() / 10).clamp(50, u128::from(u32::MAX)) as u32;
        let mut client = w.client.clone();
        let why = match client.health(pb::HealthRequest { interval_ms }).await {
            Err(s) => format!("health stream refused: {}", s.message()),
            Ok(r) => {
                let mut stream = r.into_inner();
                loop {
                    match tokio::time::timeout(silence, stream.next()).await {
                        Err(_) => match tokio::time::timeout(probe, client.hello(self.hello_request())).await {
                            Ok(Ok(_)) => tracing::warn!("worker {}: no heartbeat for {silence:?}, but it answers: kept", w.name),
                            Ok(Err(s)) => break format!("no heartbeat for {silence:?}, and unreachable: {}", s.message()),
                            Err(_) => break format!("no heartbeat for {silence:?} nor answer for {probe:?}"),
                        },
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
        self.node_gone(&w.name, &w.endpoint, &why);
        self.lost(epoch, format!("worker {} ({}) is gone ({why})", w.name, w.endpoint));
    }

    /// Admits a request into the scheduler; its tokens stream back on the returned stream, which
    /// cancels the request (and frees its KV on every stage) when dropped.
    pub fn submit(&self, req: GenerationRequest) -> std::result::Result<TokenStream, SubmitError> {
        self.inner.scheduler.submit(req)
    }

    /// `Ok` while the cluster serves (or pauses to rebuild its chain); otherwise why it does not.
    pub fn readiness(&self) -> std::result::Result<(), String> {
        self.inner.scheduler.failed().map_or(Ok(()), Err)
    }

    /// Live figures: queue, sequences, KV per stage, stage 0's forward time, links, nodes.
    pub fn stats(&self) -> BackendStats {
        let c = &self.inner.scheduler.counters;
        let running = c.running.load(Ordering::SeqCst);
        let status = self.status();
        let losses = self.inner.losses.lock().map(|l| l.clone()).unwrap_or_default();
        let mut stages = Vec::new();
        for st in &status.stages {
            let (forwards, forward_seconds, kv_bytes) = if st.index == 0 && self.inner.cfg.local_stage {
                (c.local_forwards.load(Ordering::Relaxed), c.local_forward_nanos.load(Ordering::Relaxed) as f64 * 1e-9, c.local_kv_bytes.load(Ordering::Relaxed))
            } else {
                status.nodes.iter().find(|n| n.name == st.node).map_or((0, 0.0, 0), |n| (n.forwards, n.forward_seconds, n.kv_bytes))
            };
            stages.push(StageStats { stage: format!("{} {}", st.index, st.node), forwards, forward_seconds, kv_bytes });
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
            nodes: status
                .nodes
                .iter()
                .map(|n| NodeStats { node: n.name.clone(), up: n.alive, state: n.state.clone(), losses: losses.get(&n.name).copied().unwrap_or(0) })
                .collect(),
            replans: self.inner.replans.load(Ordering::Relaxed),
            resumed_sequences: c.resumed.load(Ordering::Relaxed),
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
        let workers = self.inner.members.lock().await.pool.clone();
        for w in &workers {
            let mut client = w.client.clone();
            let call = client.shutdown(pb::ShutdownRequest { reason: reason.into() });
            let _ = tokio::time::timeout(Duration::from_secs(1), call).await;
        }
    }
}
