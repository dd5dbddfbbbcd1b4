//! The `Worker` control-plane service: what the head asks of this stage.
//!
//! Data links are directed: data always flows from the end that connects to the end that accepts.
//! So a link this worker accepts is its upstream and a link it opens is its downstream; once the
//! shard is loaded and both links exist, the stage loop runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use baton_cluster::identity::Identity;
use baton_model::loader::ModelSource;
use baton_model::pipeline::WireDType;
use baton_model::sampling::SamplingParams;
use baton_model::shard::Shard;
use baton_proto::pb::{self, worker_server::Worker};
use baton_transport::negotiate::{dial, Acceptor, NegotiateOptions, NegotiationReport, Preference};
use baton_transport::{Link, LinkConfig, TransportKind};
use candle_core::Device;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::stage::{run_loop, LinkCounters, Opening, Stage};
use crate::weights::{cached, Incoming};

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct WorkerConfig {
    pub identity: Identity,
    /// Public id of the cluster key; a head with another is refused.
    pub cluster_id: String,
    pub link: LinkConfig,
    pub negotiate: NegotiateOptions,
    pub device: Device,
    pub backend: pb::Backend,
    /// Where shards pushed by the head are cached, one directory per shard key.
    pub weights_cache: PathBuf,
}

/// One established data link and what its negotiation found.
struct DataLink {
    id: String,
    link: Arc<Link>,
    report: NegotiationReport,
    counters: Arc<LinkCounters>,
}

#[derive(Default)]
struct Links {
    upstream: Option<DataLink>,
    downstream: Option<DataLink>,
}

/// The loaded shard: which model path and layers it is (a re-plan that gives this worker the same
/// ones keeps it instead of reading the weights again), and the epoch of its current chain.
struct Loaded {
    model: String,
    range: std::ops::Range<usize>,
    manifest: pb::ShardManifest,
    stage: Arc<Mutex<Stage>>,
    epoch: u64,
    /// The head's chain this shard serves now.
    chain: u64,
}

/// How often a `LoadShard` reports while it reads weights (the head gives up on a silent one).
const LOAD_KEEPALIVE: Duration = Duration::from_secs(10);

/// HTTP/2 streams one control connection may hold open at once: the head's opens, closes, health
/// and stats fit many times over; a peer cannot make the worker hold more.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

const STATE_IDLE: u8 = 0;
const STATE_LOADING: u8 = 1;
const STATE_SERVING: u8 = 2;
const STATE_DRAINING: u8 = 3;

struct Inner {
    cfg: WorkerConfig,
    acceptor: Acceptor,
    stage: Mutex<Option<Loaded>>,
    links: Mutex<Links>,
    state: AtomicU8,
    /// Last figures read from the stage, for heartbeats taken while it computes.
    kv_bytes: AtomicU64,
    active: AtomicU32,
    started: Instant,
    shutdown: Arc<Notify>,
    /// A `LoadShard` waiting for pushed weights: told the cached file and where it came from.
    awaiting: Mutex<Option<tokio::sync::oneshot::Sender<(PathBuf, &'static str)>>>,
    /// The shard being pushed; kept across a dropped push so the next one resumes.
    incoming: tokio::sync::Mutex<Option<Incoming>>,
}

#[derive(Clone)]
pub struct WorkerService {
    inner: Arc<Inner>,
}

fn internal(what: &str) -> Status {
    Status::internal(format!("{what}: state poisoned by an earlier panic"))
}

impl WorkerService {
    /// Binds the data-link acceptor on `data_addr` (port 0 for any free port).
    pub async fn new(
        cfg: WorkerConfig,
        data_addr: SocketAddr,
        shutdown: Arc<Notify>,
    ) -> Result<Self, baton_transport::LinkError> {
        let acceptor = Acceptor::bind(data_addr, &cfg.link, &cfg.negotiate).await?;
        Ok(WorkerService {
            inner: Arc::new(Inner {
                cfg,
                acceptor,
                stage: Mutex::new(None),
                links: Mutex::new(Links::default()),
                state: AtomicU8::new(STATE_IDLE),
                kv_bytes: AtomicU64::new(0),
                active: AtomicU32::new(0),
                started: Instant::now(),
                shutdown,
                awaiting: Mutex::new(None),
                incoming: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The shard being received, started afresh unless it is `set`'s.
    fn incoming_for<'a>(
        &self,
        slot: &'a mut Option<Incoming>,
        set: pb::WeightSet,
    ) -> Result<&'a mut Incoming, Status> {
        if slot
            .as_ref()
            .is_none_or(|i| i.set().shard_key != set.shard_key)
        {
            let started = Incoming::start(&self.inner.cfg.weights_cache, set)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            *slot = Some(started);
        }
        Ok(slot.as_mut().expect("just set"))
    }

    pub fn data_addr(&self) -> Result<SocketAddr, baton_transport::LinkError> {
        self.inner.acceptor.local_addr()
    }

    fn stage(&self) -> Result<Option<Arc<Mutex<Stage>>>, Status> {
        Ok(self
            .inner
            .stage
            .lock()
            .map_err(|_| internal("stage"))?
            .as_ref()
            .map(|l| l.stage.clone()))
    }

    fn loaded_stage(&self) -> Result<Arc<Mutex<Stage>>, Status> {
        self.stage()?
            .ok_or_else(|| Status::failed_precondition("no shard is loaded"))
    }

    /// Starts the stage loop once the shard and both links are there.
    fn maybe_start(&self) -> Result<(), Status> {
        let Some((stage, epoch)) = self
            .inner
            .stage
            .lock()
            .map_err(|_| internal("stage"))?
            .as_ref()
            .map(|l| (l.stage.clone(), l.epoch))
        else {
            return Ok(());
        };
        let links = self.inner.links.lock().map_err(|_| internal("links"))?;
        let (Some(up), Some(down)) = (&links.upstream, &links.downstream) else {
            return Ok(());
        };
        tracing::info!(
            "stage loop running: {} → {}",
            up.link.peer(),
            down.link.peer()
        );
        tokio::spawn(run_loop(
            stage,
            epoch,
            up.link.clone(),
            down.link.clone(),
            up.counters.clone(),
            down.counters.clone(),
        ));
        Ok(())
    }

    fn load(&self) -> pb::NodeLoad {
        let (_, available) = crate::sysinfo::memory();
        // Never wait for the stage: a heartbeat stuck behind a long forward would look like death.
        let mut forwards = (0, 0.0);
        if let Some(Ok(s)) = self.stage().ok().flatten().as_ref().map(|s| s.try_lock()) {
            self.inner
                .kv_bytes
                .store(s.shard().kv_bytes(), Ordering::Relaxed);
            self.inner
                .active
                .store(s.shard().open_sequences() as u32, Ordering::Relaxed);
            let (n, t) = s.forward_totals();
            forwards = (n, t.as_secs_f64());
        }
        let (kv, active) = (
            self.inner.kv_bytes.load(Ordering::Relaxed),
            self.inner.active.load(Ordering::Relaxed),
        );
        let state = match self.inner.state.load(Ordering::Relaxed) {
            STATE_LOADING => pb::NodeState::Loading,
            STATE_SERVING => pb::NodeState::Serving,
            STATE_DRAINING => pb::NodeState::Draining,
            _ => pb::NodeState::Idle,
        };
        pb::NodeLoad {
            state: state as i32,
            available_memory: available,
            kv_bytes_used: kv,
            active_sequences: active,
            forwards: forwards.0,
            forward_seconds: forwards.1,
            ..Default::default()
        }
    }

    /// Hands the weights to the `LoadShard` waiting for them, if any.
    fn weights_ready(&self, path: PathBuf, source: &'static str) {
        if let Some(tx) = self.inner.awaiting.lock().ok().and_then(|mut a| a.take()) {
            let _ = tx.send((path, source));
        }
    }

    fn rdma_gate(&self) -> pb::RdmaGate {
        match baton_transport::rdma::local_gate(&self.inner.cfg.link.rdma, None) {
            Ok(_) => pb::RdmaGate {
                passed: true,
                ..Default::default()
            },
            Err(e) => pb::RdmaGate {
                passed: false,
                failed_step: e.gate_step().map(|s| s.to_string()).unwrap_or_default(),
                reason: e.to_string(),
            },
        }
    }
}

/// This build's protocol.
pub fn worker_protocol() -> pb::Protocol {
    baton_proto::local_protocol()
}

pub fn sampling_from_proto(p: &pb::SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: p.temperature,
        top_k: (p.top_k > 0).then_some(p.top_k as usize),
        top_p: (p.top_p > 0.0 && p.top_p < 1.0).then_some(p.top_p),
        min_p: (p.min_p > 0.0).then_some(p.min_p),
        repetition_penalty: if p.repetition_penalty == 0.0 {
            1.0
        } else {
            p.repetition_penalty
        },
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed.unwrap_or_else(rand_seed),
        top_logprobs: p.top_logprobs as usize,
    }
}

pub fn sampling_to_proto(s: &SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k.unwrap_or(0) as u32,
        top_p: s.top_p.unwrap_or(1.0),
        min_p: s.min_p.unwrap_or(0.0),
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: Some(s.seed),
        top_logprobs: s.top_logprobs as u32,
        max_tokens: 0,
    }
}

fn rand_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id())
}

pub fn wire_from_proto(w: i32) -> Result<WireDType, Status> {
    match pb::WireDtype::try_from(w).unwrap_or(pb::WireDtype::Unspecified) {
        pb::WireDtype::F32 => Ok(WireDType::F32),
        pb::WireDtype::F16 => Ok(WireDType::F16),
        pb::WireDtype::Bf16 | pb::WireDtype::Unspecified => Ok(WireDType::Bf16),
    }
}

pub fn wire_to_proto(w: WireDType) -> pb::WireDtype {
    match w {
        WireDType::F32 => pb::WireDtype::F32,
        WireDType::F16 => pb::WireDtype::F16,
        WireDType::Bf16 => pb::WireDtype::Bf16,
    }
}

pub fn transport_to_proto(t: TransportKind) -> pb::Transport {
    match t {
        TransportKind::Rdma => pb::Transport::Rdma,
        TransportKind::Quic => pb::Transport::Quic,
        TransportKind::Tcp => pb::Transport::Tcp,
    }
}

pub fn preference_from_proto(p: i32) -> Preference {
    match pb::TransportPreference::try_from(p).unwrap_or(pb::TransportPreference::Auto) {
        pb::TransportPreference::Auto => Preference::Auto,
        pb::TransportPreference::Rdma => Preference::Rdma,
        pb::TransportPreference::Quic => Preference::Quic,
        pb::TransportPreference::Tcp => Preference::Tcp,
    }
}

pub fn link_reply(
    link_id: &str,
    link: &Link,
    report: &NegotiationReport,
    local: String,
) -> pb::SetupLinkReply {
    pb::SetupLinkReply {
        link_id: link_id.to_string(),
        chosen: transport_to_proto(report.chosen) as i32,
        rtt_ns: (report.rtt_us * 1000.0) as u64,
        rejected: report
            .rejected
            .iter()
            .map(|r| pb::Rejection {
                transport: transport_to_proto(r.transport) as i32,
                reason: r.reason.clone(),
            })
            .collect(),
        local_addr: local,
        peer_addr: link.peer().to_string(),
    }
}

fn progress(phase: pb::LoadPhase, message: impl Into<String>) -> pb::LoadProgress {
    pb::LoadProgress {
        phase: phase as i32,
        message: message.into(),
        ..Default::default()
    }
}

/// Opens the model at `path` and loads `range` of it (blocking: reads weights).
fn load_shard(
    path: PathBuf,
    range: std::ops::Range<usize>,
    device: Device,
) -> Result<(Shard, u64), String> {
    let source =
        ModelSource::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let n_layers = source.config().n_layers;
    if range.end > n_layers || range.start >= range.end {
        return Err(format!(
            "layers {}..{} are not a range of this model's {n_layers}",
            range.start, range.end
        ));
    }
    let bytes = source.manifest().stage_weight_bytes(range.start, range.end);
    let shard = Shard::load(&source, range, &device).map_err(|e| e.to_string())?;
    Ok((shard, bytes))
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn hello(
        &self,
        req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloReply>, Status> {
        let req = req.into_inner();
        let cfg = &self.inner.cfg;
        if req.cluster_id != cfg.cluster_id {
            return Err(Status::permission_denied(format!(
                "this worker belongs to cluster {}, the head to cluster {}: they hold different cluster keys",
                cfg.cluster_id, req.cluster_id
            )));
        }
        let local = worker_protocol();
        baton_proto::negotiate(&local, &req.protocol.unwrap_or_default())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let (total, available) = crate::sysinfo::memory();
        let rdma = self.rdma_gate();
        let mut transports = vec![pb::Transport::Tcp as i32];
        if cfg.negotiate.enable_quic {
            transports.push(pb::Transport::Quic as i32);
        }
        if rdma.passed && cfg.negotiate.enable_rdma {
            transports.push(pb::Transport::Rdma as i32);
        }
        let data = self
            .data_addr()
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!("hello from head {} ({})", req.head_name, req.version);
        Ok(Response::new(pb::HelloReply {
            node: Some(pb::NodeInfo {
                id: cfg.identity.id.to_string(),
                name: cfg.identity.name.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                total_memory: total,
                available_memory: available,
                backend: cfg.backend as i32,
                transports,
                rdma: Some(rdma),
                data_addrs: vec![data.to_string()],
                cluster_id: cfg.cluster_id.clone(),
                memory_bandwidth: 0,
            }),
            protocol: Some(local),
        }))
    }

    type LoadShardStream = Boxed<pb::LoadProgress>;

    async fn load_shard(
        &self,
        req: Request<pb::LoadShardRequest>,
    ) -> Result<Response<Self::LoadShardStream>, Status> {
        let req = req.into_inner();
        let mut path = PathBuf::from(
            req.model
                .as_ref()
                .map(|m| m.path.clone())
                .unwrap_or_default(),
        );
        let layers = req
            .layers
            .ok_or_else(|| Status::invalid_argument("no layer range"))?;
        let allow_push = req.allow_push;
        let chain = req.chain;
        let wire = wire_from_proto(req.wire_dtype)?;
        // A load starts a new chain (a new head, or the same one re-planning): the links and the
        // sequences of the earlier one must not be mixed with the new ones. Closing the old links
        // ends the old stage loop.
        let old = std::mem::take(&mut *self.inner.links.lock().map_err(|_| internal("links"))?);
        for l in [old.upstream, old.downstream].into_iter().flatten() {
            tokio::spawn(async move { l.link.close("the head is rebuilding the chain").await });
        }
        let model = path.display().to_string();
        let kept = {
            let mut slot = self.inner.stage.lock().map_err(|_| internal("stage"))?;
            match slot.as_ref() {
                Some(l) if l.model == model && l.range == layers.range() => Some(l.stage.clone()),
                _ => {
                    *slot = None;
                    None
                }
            }
        };
        let (tx, rx) = mpsc::channel(8);
        if let Some(stage) = kept {
            // Same model and layers: keep the weights, start the new chain's epoch. The reset
            // waits for a forward of the old chain to finish: off the async threads.
            let epoch = tokio::task::spawn_blocking(move || stage.lock().map(|mut s| s.reset(wire)).ok())
                .await
                .map_err(|e| Status::internal(format!("reset task: {e}")))?
                .ok_or_else(|| internal("stage"))?;
            let manifest = {
                let mut slot = self.inner.stage.lock().map_err(|_| internal("stage"))?;
                let l = slot.as_mut().ok_or_else(|| Status::aborted("another load replaced this one"))?;
                l.epoch = epoch;
                l.chain = chain;
                l.manifest.clone()
            };
            self.inner.state.store(STATE_SERVING, Ordering::Relaxed);
            tracing::info!("layers {layers} kept for the new chain (epoch {epoch})");
            let mut p = progress(pb::LoadPhase::Ready, format!("layers {layers} already loaded"));
            p.bytes_done = manifest.weight_bytes;
            p.bytes_total = manifest.weight_bytes;
            p.result = Some(pb::load_progress::Result::Manifest(pb::ShardManifest { source: "kept".into(), ..manifest }));
            let _ = tx.send(Ok(p)).await;
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        let this = self.clone();
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(progress(
                    pb::LoadPhase::Checking,
                    format!("looking for {}", path.display()),
                )))
                .await;
            let mut source = "local";
            if !path.exists() {
                let fail = |msg: String| {
                    let mut p = progress(pb::LoadPhase::Failed, msg.clone());
                    p.result = Some(pb::load_progress::Result::Error(msg));
                    p
                };
                if !allow_push {
                    let _ = tx
                        .send(Ok(fail(format!(
                            "model file {} is not on this worker and the head offers no weights",
                            path.display()
                        ))))
                        .await;
                    return;
                }
                let (ready, arrived) = tokio::sync::oneshot::channel();
                if let Ok(mut a) = this.inner.awaiting.lock() {
                    *a = Some(ready);
                }
                let msg = format!(
                    "no model file at {}: waiting for the head to push layers {layers}",
                    path.display()
                );
                tracing::info!("{msg}");
                let _ = tx
                    .send(Ok(progress(pb::LoadPhase::AwaitingWeights, msg)))
                    .await;
                // The head pushes on another connection; if it hangs up on this one, stop waiting.
                let got = tokio::select! {
                    got = arrived => got,
                    _ = tx.closed() => return,
                };
                match got {
                    Ok((p, from)) => (path, source) = (p, from),
                    Err(_) => {
                        let _ = tx
                            .send(Ok(fail(
                                "the weights never arrived: another load replaced this one".into(),
                            )))
                            .await;
                        return;
                    }
                }
            }
            this.inner.state.store(STATE_LOADING, Ordering::Relaxed);
            let _ = tx
                .send(Ok(progress(
                    pb::LoadPhase::Reading,
                    format!("reading layers {layers}"),
                )))
                .await;
            let device = this.inner.cfg.device.clone();
            let mut task =
                tokio::task::spawn_blocking(move || load_shard(path, layers.range(), device));
            // Progress while the weights are read, so the head can tell a long read from a hang.
            let mut tick = tokio::time::interval(LOAD_KEEPALIVE);
            tick.tick().await;
            let loaded = loop {
                tokio::select! {
                    done = &mut task => break done.unwrap_or_else(|e| Err(format!("load task failed: {e}"))),
                    _ = tick.tick() => {
                        let _ = tx.send(Ok(progress(pb::LoadPhase::Reading, format!("still reading layers {layers}")))).await;
                    }
                }
            };
            let last = match loaded {
                Ok((shard, bytes)) => {
                    let manifest = pb::ShardManifest {
                        layers: Some(layers),
                        weight_bytes: bytes,
                        kv_bytes: 0,
                        has_embedding: shard.is_first(),
                        has_head: shard.is_last(),
                        source: source.into(),
                        available_memory_after: crate::sysinfo::memory().1,
                    };
                    if let Ok(mut slot) = this.inner.stage.lock() {
                        *slot = Some(Loaded {
                            model,
                            range: layers.range(),
                            manifest: manifest.clone(),
                            stage: Arc::new(Mutex::new(Stage::new(shard, wire))),
                            epoch: 0,
                            chain,
                        });
                    }
                    this.inner.state.store(STATE_SERVING, Ordering::Relaxed);
                    tracing::info!("loaded layers {layers} ({bytes} bytes, {source})");
                    let mut p = progress(pb::LoadPhase::Ready, format!("layers {layers} ready"));
                    p.bytes_done = bytes;
                    p.bytes_total = bytes;
                    p.result = Some(pb::load_progress::Result::Manifest(manifest));
                    p
                }
                Err(msg) => {
                    this.inner.state.store(STATE_IDLE, Ordering::Relaxed);
                    let mut p = progress(pb::LoadPhase::Failed, msg.clone());
                    p.result = Some(pb::load_progress::Result::Error(msg));
                    p
                }
            };
            let _ = tx.send(Ok(last)).await;
            if let Err(e) = this.maybe_start() {
                tracing::warn!("stage loop not started: {e}");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resume_weights(
        &self,
        req: Request<pb::WeightSet>,
    ) -> Result<Response<pb::WeightsResume>, Status> {
        let set = req.into_inner();
        if let Some(path) = cached(&self.inner.cfg.weights_cache, &set) {
            tracing::info!(
                "shard {} is in the cache: {}",
                set.shard_key,
                path.display()
            );
            self.weights_ready(path, "cache");
            return Ok(Response::new(pb::WeightsResume {
                have: set.tensors.iter().map(|t| t.size).collect(),
            }));
        }
        let mut incoming = self.inner.incoming.lock().await;
        let incoming = self.incoming_for(&mut incoming, set)?;
        Ok(Response::new(incoming.receiver().resume()))
    }

    async fn push_weights(
        &self,
        req: Request<Streaming<pb::WeightsPush>>,
    ) -> Result<Response<pb::PushWeightsReply>, Status> {
        let mut stream = req.into_inner();
        let set = match stream.message().await? {
            Some(pb::WeightsPush {
                item: Some(pb::weights_push::Item::Begin(set)),
            }) => set,
            _ => {
                return Err(Status::invalid_argument(
                    "a weight push must begin with its weight set",
                ))
            }
        };
        let mut guard = self.inner.incoming.lock().await;
        let incoming = self.incoming_for(&mut guard, set)?;
        let total = incoming.receiver().bytes_total();
        let bar = crate::progress::bar(
            total,
            format!(
                "receiving shard {}",
                &incoming.set().shard_key[..8.min(incoming.set().shard_key.len())]
            ),
        );
        bar.set_position(incoming.receiver().bytes_done());
        let mut logged = crate::progress::Milestones::new(total);
        loop {
            match stream.message().await {
                Ok(Some(pb::WeightsPush {
                    item: Some(pb::weights_push::Item::Chunk(chunk)),
                })) => {
                    incoming
                        .write(&chunk)
                        .map_err(|e| Status::data_loss(e.to_string()))?;
                    let done = incoming.receiver().bytes_done();
                    bar.set_position(done);
                    if let Some(pct) = logged.passed(done) {
                        tracing::info!("receiving weights: {pct}% of {} MiB", total >> 20);
                    }
                }
                Ok(Some(_)) => {
                    return Err(Status::invalid_argument(
                        "a weight push carries one weight set, then chunks",
                    ))
                }
                Ok(None) => break,
                Err(s) => {
                    bar.abandon();
                    tracing::warn!(
                        "weight push broke off at {} of {total} bytes ({}); it resumes from there",
                        incoming.receiver().bytes_done(),
                        s.message()
                    );
                    return Err(s);
                }
            }
        }
        let have = incoming.receiver().have().to_vec();
        if !incoming.receiver().is_complete() {
            return Ok(Response::new(pb::PushWeightsReply {
                have,
                complete: false,
            }));
        }
        bar.finish();
        let done = guard.take().expect("held above");
        let path = done.finish().map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(
            "received all {} MiB of the shard into {}",
            total >> 20,
            path.display()
        );
        self.weights_ready(path, "pushed");
        Ok(Response::new(pb::PushWeightsReply {
            have,
            complete: true,
        }))
    }

    async fn setup_link(
        &self,
        req: Request<pb::SetupLinkRequest>,
    ) -> Result<Response<pb::SetupLinkReply>, Status> {
        let req = req.into_inner();
        let timeout = Duration::from_millis(if req.timeout_ms == 0 {
            15_000
        } else {
            u64::from(req.timeout_ms)
        });
        let mut opts = self.inner.cfg.negotiate.clone();
        opts.preference = preference_from_proto(req.preference);
        let role = pb::LinkRole::try_from(req.role).unwrap_or(pb::LinkRole::Unspecified);
        let negotiated = match role {
            pb::LinkRole::Accept => {
                // The acceptor drops connections that fail the key handshake and waits on for the peer
                // the head announced.
                tokio::time::timeout(timeout, self.inner.acceptor.accept()).await
            }
            pb::LinkRole::Connect => {
                let addr: SocketAddr = req
                    .peer_addrs
                    .first()
                    .ok_or_else(|| Status::invalid_argument("no peer address"))?
                    .parse()
                    .map_err(|e| Status::invalid_argument(format!("peer address: {e}")))?;
                tokio::time::timeout(timeout, dial(addr, &self.inner.cfg.link, &opts)).await
            }
            pb::LinkRole::Unspecified => {
                return Err(Status::invalid_argument("link role unspecified"))
            }
        };
        let n = negotiated
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "link {} not set up within {timeout:?}",
                    req.link_id
                ))
            })?
            .map_err(|e| Status::unavailable(format!("link {}: {e}", req.link_id)))?;
        let local = self.data_addr().map(|a| a.to_string()).unwrap_or_default();
        let reply = link_reply(&req.link_id, &n.link, &n.report, local);
        tracing::info!(
            "link {} ({:?}) to {}: {}",
            req.link_id,
            role,
            n.link.peer(),
            n.report
        );
        let data = DataLink {
            id: req.link_id,
            link: Arc::new(n.link),
            report: n.report,
            counters: Default::default(),
        };
        {
            let mut links = self.inner.links.lock().map_err(|_| internal("links"))?;
            if role == pb::LinkRole::Accept {
                links.upstream = Some(data);
            } else {
                links.downstream = Some(data);
            }
        }
        self.maybe_start()?;
        Ok(Response::new(reply))
    }

    async fn open_sequence(
        &self,
        req: Request<pb::OpenSequenceRequest>,
    ) -> Result<Response<pb::OpenSequenceReply>, Status> {
        let req = req.into_inner();
        if self.inner.state.load(Ordering::Relaxed) == STATE_DRAINING {
            return Err(Status::unavailable("draining: no new sequences"));
        }
        let stage = {
            let slot = self.inner.stage.lock().map_err(|_| internal("stage"))?;
            let l = slot.as_ref().ok_or_else(|| Status::failed_precondition("no shard is loaded"))?;
            if l.chain != req.chain {
                return Err(Status::failed_precondition(format!(
                    "sequence {} is for chain {}, this stage serves chain {}",
                    req.sequence_id, req.chain, l.chain
                )));
            }
            l.stage.clone()
        };
        let params = sampling_from_proto(&req.sampling.unwrap_or_default());
        // The lock waits for the forward in progress: off the async threads, which must keep
        // answering heartbeats meanwhile.
        tokio::task::spawn_blocking(move || {
            let mut stage = stage.lock().map_err(|_| internal("stage"))?;
            let opening = Opening { params, prompt: &req.prompt_tokens, generated: &req.generated };
            stage
                .open_sequence(req.sequence_id, Some(opening))
                .map_err(|e| Status::invalid_argument(e.to_string()))
        })
        .await
        .map_err(|e| Status::internal(format!("open task: {e}")))??;
        Ok(Response::new(pb::OpenSequenceReply {
            sequence_id: req.sequence_id,
            kv_bytes_reserved: 0,
        }))
    }

    async fn close_sequence(
        &self,
        req: Request<pb::CloseSequenceRequest>,
    ) -> Result<Response<pb::CloseSequenceReply>, Status> {
        let id = req.into_inner().sequence_id;
        let stage = self.loaded_stage()?;
        let existed = tokio::task::spawn_blocking(move || {
            stage
                .lock()
                .map(|mut s| s.close_sequence(id))
                .map_err(|_| internal("stage"))
        })
        .await
        .map_err(|e| Status::internal(format!("close task: {e}")))??;
        Ok(Response::new(pb::CloseSequenceReply { existed }))
    }

    type HealthStream = Boxed<pb::Heartbeat>;

    async fn health(
        &self,
        req: Request<pb::HealthRequest>,
    ) -> Result<Response<Self::HealthStream>, Status> {
        // Faster than 50 ms would only burn CPU that the stage needs.
        let interval = Duration::from_millis(u64::from(req.into_inner().interval_ms.max(50)));
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            for seq in 0u64.. {
                tick.tick().await;
                let unix_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let beat = pb::Heartbeat {
                    seq,
                    unix_ms,
                    load: Some(this.load()),
                };
                if tx.send(Ok(beat)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stats(
        &self,
        _: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsReply>, Status> {
        let tokens = match self.stage()? {
            Some(s) => s.lock().map_err(|_| internal("stage"))?.tokens_processed(),
            None => 0,
        };
        let links = self.inner.links.lock().map_err(|_| internal("links"))?;
        let stat = |d: &DataLink, sent: bool| {
            let frames = d.counters.frames.load(Ordering::Relaxed);
            let bytes = d.counters.bytes.load(Ordering::Relaxed);
            pb::LinkStats {
                link_id: d.id.clone(),
                transport: transport_to_proto(d.report.chosen) as i32,
                peer_addr: d.link.peer().to_string(),
                rtt_ns: (d.report.rtt_us * 1000.0) as u64,
                frames_sent: if sent { frames } else { 0 },
                frames_received: if sent { 0 } else { frames },
                bytes_sent: if sent { bytes } else { 0 },
                bytes_received: if sent { 0 } else { bytes },
            }
        };
        let mut link_stats = Vec::new();
        if let Some(d) = &links.upstream {
            link_stats.push(stat(d, false));
        }
        if let Some(d) = &links.downstream {
            link_stats.push(stat(d, true));
        }
        Ok(Response::new(pb::StatsReply {
            load: Some(self.load()),
            links: link_stats,
            tokens_processed: tokens,
            uptime_ms: self.inner.started.elapsed().as_millis() as u64,
        }))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainReply>, Status> {
        self.inner.state.store(STATE_DRAINING, Ordering::Relaxed);
        let deadline =
            Instant::now() + Duration::from_millis(u64::from(req.into_inner().timeout_ms));
        loop {
            let open = match self.stage()? {
                Some(s) => s
                    .lock()
                    .map_err(|_| internal("stage"))?
                    .shard()
                    .open_sequences() as u32,
                None => 0,
            };
            if open == 0 || Instant::now() >= deadline {
                return Ok(Response::new(pb::DrainReply {
                    sequences_remaining: open,
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn shutdown(
        &self,
        req: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownReply>, Status> {
        tracing::info!("shutdown requested: {}", req.into_inner().reason);
        self.inner.shutdown.notify_one();
        Ok(Response::new(pb::ShutdownReply {}))
    }
}

/// Serves the control plane on `listener` until a `Shutdown` call or `stop` resolves. Only
/// connections that pass TLS and prove the cluster key reach the service.
pub async fn serve(
    service: WorkerService,
    listener: tokio::net::TcpListener,
    security: &baton_proto::ControlSecurity,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let shutdown = service.inner.shutdown.clone();
    let signal = async move {
        tokio::select! {
            _ = shutdown.notified() => {}
            _ = stop => {}
        }
    };
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .add_service(baton_proto::worker_server(service))
        .serve_with_incoming_shutdown(security.incoming(listener), signal)
        .await
}
