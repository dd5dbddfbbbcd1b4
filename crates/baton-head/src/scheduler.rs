//! The head's scheduler: pipelined continuous batching over the chain of stages.
//!
//! One task owns every sequence. Requests wait in an admission queue (capped: a full queue is
//! [`SubmitError::QueueFull`]); up to `max_running` of them hold KV on the stages. Between steps
//! the scheduler packs micro-batches from the running sequences: decode tokens (least recently
//! served first, so streams take turns) plus at most `prefill_chunk` prompt tokens, so a long
//! prompt enters in chunks interleaved with everyone else's decode steps instead of stalling
//! them. Up to `max_in_flight` micro-batches (by default one per stage) travel the chain at once,
//! so while the last stage works on one batch the first works on the next; the decode sequences
//! are spread over that many batches for the same reason. At most `prefill_in_flight` of them
//! carry prompt chunks, since every decode step queued behind a chunk on a stage waits for it.
//!
//! A sequence is closed on every stage only when none of its micro-batches is in flight: a stage
//! that meets an unknown sequence fails the whole micro-batch, other sequences included.
//!
//! When the chain breaks (a node or link lost, or a drain), the head suspends the scheduler: what
//! is in flight is forgotten and every running sequence is rewound to the tokens its client has
//! seen. On the rebuilt chain each is reopened (its sampler resumed after those tokens) and
//! re-prefilled with its prompt plus all of them but the last, which is its next decode step; so
//! the stream goes on where it paused, with no token repeated or lost.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_api::backend::{GenerationRequest, StreamEvent, SubmitError, TokenStream};
use baton_model::generation::Finish;
use baton_model::sampling::{Sampled, SamplingParams};
use baton_model::shard::SeqChunk;
use baton_proto::pb::{self, worker_client::WorkerClient};
use baton_transport::{Frame, FrameKind, Link};
use baton_worker::service::sampling_to_proto;
use baton_worker::stage::{run_blocking, Opening};
use baton_worker::wire::{parse_failure, tokens_frame};
use baton_worker::Stage;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// Open and close RPCs give up after this. A stage opens a sequence between two forwards, so the
/// wait includes the forward in progress (a long prefill chunk on a slow CPU takes seconds); a
/// worker that hangs is caught sooner by its heartbeats.
const RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// A stream paused this many times is ended with the last reason: a chain that keeps breaking
/// must not hold a request for ever.
const MAX_PAUSES: u32 = 8;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences in one micro-batch at most.
    pub max_batch: usize,
    /// Sequences holding KV on the stages at once; more wait in the queue.
    pub max_running: usize,
    /// Sequences admitted (running + waiting); more get [`SubmitError::QueueFull`].
    pub max_queued: usize,
    /// Prompt tokens in one micro-batch at most (the prefill chunk).
    pub prefill_chunk: usize,
    /// Micro-batches travelling the chain at once; `0` is one per stage.
    pub max_in_flight: usize,
    /// Of those, how many may carry prompt chunks. A stage runs its micro-batches in order, so
    /// every decode step queued behind a prompt chunk waits for it: the fewer chunks in flight,
    /// the less a long prompt delays the other streams (and the slower it is prefilled).
    pub prefill_in_flight: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { max_batch: 8, max_running: 16, max_queued: 64, prefill_chunk: 256, max_in_flight: 0, prefill_in_flight: 1 }
    }
}

/// How the scheduler reaches the stages.
pub(crate) struct Chain {
    /// Which chain this is: the head counts its re-plans, and answers of an older chain are ignored.
    pub epoch: u64,
    pub local: Option<Arc<Mutex<Stage>>>,
    /// The epoch of `local` for this chain (see [`Stage::reset`]).
    pub local_epoch: u64,
    pub downstream: Arc<Link>,
    pub workers: Vec<(String, WorkerClient<Channel>)>,
    /// Stages in the chain (the default for `max_in_flight`).
    pub n_stages: usize,
    /// Called once the link to the first worker fails: the cluster cannot serve any more.
    pub on_link_failure: Box<dyn Fn(String) + Send + Sync>,
}

/// Figures the API's `/metrics` and readiness read while the scheduler runs.
#[derive(Default)]
pub(crate) struct Counters {
    /// Admitted and not yet closed (waiting + running).
    pub admitted: AtomicUsize,
    /// Holding or acquiring KV on the stages.
    pub running: AtomicUsize,
    /// Stage 0 on the head: forwards, their time, its KV bytes.
    pub local_forwards: AtomicU64,
    pub local_forward_nanos: AtomicU64,
    pub local_kv_bytes: AtomicU64,
    /// Set once the cluster cannot serve; later submissions are refused with it.
    pub failed: Mutex<Option<String>>,
    /// Sequences reopened on a rebuilt chain, over the head's life.
    pub resumed: AtomicU64,
}

pub(crate) struct Job {
    req: GenerationRequest,
    tx: UnboundedSender<StreamEvent>,
}

pub(crate) enum Msg {
    Admit(Job),
    Opened { seq: u64, epoch: u64, result: Result<(), String> },
    Closed { seq: u64 },
    /// What came back for a micro-batch: sampled tokens by sequence, or why it failed.
    /// `in_order` when it came back through the chain (answers arrive in the order fed), not
    /// from a failure found before the micro-batch left the head.
    Returned { micro_batch: u64, result: Result<Vec<(u64, Sampled)>, String>, in_order: bool },
    /// Chain `epoch` broke or is being rebuilt: stop sending, forget what is in flight, rewind
    /// every running sequence. Requests keep queueing meanwhile. Ignored when `epoch` is not the
    /// chain in use (a late report about a chain already replaced).
    Suspend { epoch: u64, why: String },
    /// A new chain: reopen every running sequence on it and go on; `resumed` hears how many.
    Resume { chain: Chain, resumed: oneshot::Sender<usize> },
    /// The cluster cannot serve (no chain could be rebuilt): end every request with the reason.
    Fail(String),
}

/// The API side of the scheduler: admission.
#[derive(Clone)]
pub(crate) struct Handle {
    pub tx: UnboundedSender<Msg>,
    pub counters: Arc<Counters>,
    max_queued: usize,
}

impl Handle {
    pub fn new(cfg: &SchedulerConfig) -> (Self, UnboundedReceiver<Msg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx, counters: Arc::default(), max_queued: cfg.max_queued.max(1) }, rx)
    }

    pub fn failed(&self) -> Option<String> {
        self.counters.failed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Queues a request; the caller has validated it against the model.
    pub fn submit(&self, req: GenerationRequest) -> Result<TokenStream, SubmitError> {
        if let Some(why) = self.failed() {
            return Err(SubmitError::NotReady(why));
        }
        if req.prompt_tokens.is_empty() {
            return Err(SubmitError::Invalid("the prompt has no tokens".into()));
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::Invalid("max_tokens must be at least 1".into()));
        }
        // Reserve the slot first, so that concurrent submissions cannot overshoot the cap.
        if self.counters.admitted.fetch_add(1, Ordering::SeqCst) >= self.max_queued {
            self.counters.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        let (tx, stream) = TokenStream::channel();
        if self.tx.send(Msg::Admit(Job { req, tx })).is_err() {
            self.counters.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::NotReady("the scheduler has stopped".into()));
        }
        Ok(stream)
    }
}

#[derive(PartialEq)]
enum Phase {
    Opening,
    Running,
    Closing,
}

struct Seq {
    job: Job,
    phase: Phase,
    /// What must be prefilled before decoding: the prompt, or after a rewind the prompt plus every
    /// streamed token but the last.
    context: Vec<u32>,
    /// Tokens of `context` sent down the chain so far.
    sent: usize,
    /// Tokens streamed to the client.
    emitted: Vec<u32>,
    /// The last sampled token, to be fed back as the next decode step.
    next: Option<u32>,
    /// Micro-batches in flight that carry this sequence.
    in_flight: usize,
    /// Set when the sequence is done (finished, failed or abandoned); it closes once nothing of
    /// it is in flight.
    ending: bool,
    /// When it last went into a micro-batch (a step counter), for fairness.
    served: u64,
    /// Times the chain broke under it.
    pauses: u32,
}

impl Seq {
    fn new(job: Job) -> Self {
        let context = job.req.prompt_tokens.clone();
        Seq { job, phase: Phase::Opening, context, sent: 0, emitted: Vec::new(), next: None, in_flight: 0, ending: false, served: 0, pauses: 0 }
    }

    fn prompt_len(&self) -> usize {
        self.job.req.prompt_tokens.len()
    }

    /// Every token of the context is in the chain: the sequence decodes.
    fn prefilled(&self) -> bool {
        self.sent == self.context.len()
    }

    /// Forgets the KV cache the lost chain held: the sequence is reopened and its context
    /// prefilled again, up to the token it was about to feed.
    fn rewind(&mut self) {
        self.pauses += 1;
        self.phase = Phase::Opening;
        self.in_flight = 0;
        self.sent = 0;
        self.context.truncate(self.prompt_len());
        self.next = match self.emitted.split_last() {
            Some((&last, earlier)) => {
                self.context.extend_from_slice(earlier);
                Some(last)
            }
            None => None,
        };
    }
}

struct Scheduler {
    cfg: SchedulerConfig,
    /// `max_in_flight` was left to the chain (one micro-batch per stage).
    auto_in_flight: bool,
    /// `None` while suspended.
    chain: Option<Arc<Chain>>,
    epoch: u64,
    counters: Arc<Counters>,
    tx: UnboundedSender<Msg>,
    /// Into the current chain's feed task.
    feeder: Option<UnboundedSender<(u64, Frame)>>,
    waiting: VecDeque<Job>,
    seqs: HashMap<u64, Seq>,
    /// Micro-batch id → the sequences it carries, and whether it carries prompt chunks.
    in_flight: HashMap<u64, (Vec<u64>, bool)>,
    next_seq: u64,
    next_micro_batch: u64,
    clock: u64,
}

/// Runs the scheduler; it waits (queueing requests) for its first chain in a [`Msg::Resume`].
pub(crate) async fn run(handle: Handle, mut rx: UnboundedReceiver<Msg>, cfg: SchedulerConfig) {
    let mut cfg = cfg;
    cfg.max_batch = cfg.max_batch.max(1);
    cfg.max_running = cfg.max_running.max(1);
    cfg.prefill_chunk = cfg.prefill_chunk.max(1);
    let mut s = Scheduler {
        auto_in_flight: cfg.max_in_flight == 0,
        cfg,
        chain: None,
        epoch: 0,
        counters: handle.counters.clone(),
        tx: handle.tx.clone(),
        feeder: None,
        waiting: VecDeque::new(),
        seqs: HashMap::new(),
        in_flight: HashMap::new(),
        next_seq: 1,
        next_micro_batch: 1,
        clock: 0,
    };
    // The scheduler holds a sender itself (for its open/close tasks), so the channel never closes;
    // it lives as long as the head's process.
    drop(handle);
    while let Some(msg) = rx.recv().await {
        s.handle(msg);
        // Take whatever else is waiting before packing, so that one step's returns and arrivals
        // go into the same micro-batches.
        while let Ok(msg) = rx.try_recv() {
            s.handle(msg);
        }
        s.promote();
        while s.in_flight.len() < s.cfg.max_in_flight && s.dispatch() {}
    }
}

impl Scheduler {
    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Admit(job) => {
                let failed = self.counters.failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match failed {
                    Some(why) => self.reject(job, &why),
                    None => self.waiting.push_back(job),
                }
            }
            Msg::Opened { seq, epoch, result } => {
                if epoch != self.epoch {
                    return;
                }
                let Some(s) = self.seqs.get_mut(&seq) else { return };
                if let Err(why) = result {
                    if !s.ending {
                        let _ = s.job.tx.send(StreamEvent::Failed(why));
                        s.ending = true;
                    }
                }
                // Running from here, even when ending: closing frees what the stages that did
                // open it hold.
                s.phase = Phase::Running;
                self.close_if_idle(seq);
            }
            Msg::Closed { seq } => {
                if self.seqs.remove(&seq).is_some() {
                    self.counters.running.fetch_sub(1, Ordering::SeqCst);
                    self.counters.admitted.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Msg::Returned { micro_batch, result, in_order } => {
                if in_order {
                    // The chain answers in the order it was fed: what is still in flight from
                    // before this micro-batch was lost on the way.
                    let mut skipped: Vec<u64> = self.in_flight.keys().copied().filter(|&id| id < micro_batch).collect();
                    skipped.sort_unstable();
                    for id in skipped {
                        self.returned(id, Err(format!("the last stage answered micro-batch {micro_batch} before micro-batch {id}")));
                    }
                }
                // Unknown: an older chain's, already failed, or never sent.
                self.returned(micro_batch, result);
            }
            Msg::Suspend { epoch, why } => {
                if epoch == self.epoch {
                    self.suspend(&why);
                }
            }
            Msg::Resume { chain, resumed } => {
                let _ = resumed.send(self.resume(chain));
            }
            Msg::Fail(why) => {
                self.suspend(&why);
                *self.counters.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
                while let Some(job) = self.waiting.pop_front() {
                    self.reject(job, &why);
                }
                for (_, s) in self.seqs.drain() {
                    let _ = s.job.tx.send(StreamEvent::Failed(why.clone()));
                    self.counters.running.fetch_sub(1, Ordering::SeqCst);
                    self.counters.admitted.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }

    /// Ends micro-batch `mb` (if in flight) with what came back: its tokens, or why it failed.
    /// An answer that names a sequence it does not carry, names one twice, or leaves one that
    /// completed its context without a token fails the whole micro-batch: such a sequence would
    /// otherwise wait for ever.
    fn returned(&mut self, mb: u64, result: Result<Vec<(u64, Sampled)>, String>) {
        let Some((members, _)) = self.in_flight.remove(&mb) else { return };
        for seq in &members {
            if let Some(s) = self.seqs.get_mut(seq) {
                s.in_flight -= 1;
            }
        }
        let result = result.and_then(|samples| {
            let mut seen = std::collections::HashSet::new();
            match samples.iter().find(|(seq, _)| !members.contains(seq) || !seen.insert(*seq)) {
                Some((seq, _)) => Err(format!("the last stage's answer to micro-batch {mb} names sequence {seq} wrongly (not carried, or twice)")),
                None => Ok(samples),
            }
        });
        let failure = match result {
            Ok(samples) => {
                for (seq, sampled) in samples {
                    self.token(seq, sampled);
                }
                None
            }
            Err(why) => Some(why),
        };
        for &seq in &members {
            let Some(s) = self.seqs.get_mut(&seq) else { continue };
            if s.ending {
                continue;
            }
            let why = match &failure {
                Some(why) => why.clone(),
                // It completed its context in this micro-batch and got nothing back.
                None if s.prefilled() && s.in_flight == 0 && s.next.is_none() => {
                    format!("the last stage returned no token for sequence {seq} in micro-batch {mb}")
                }
                None => continue,
            };
            let _ = s.job.tx.send(StreamEvent::Failed(why));
            s.ending = true;
        }
        for seq in members {
            self.close_if_idle(seq);
        }
    }

    /// Stops using the chain: what is in flight will not come back, and what the stages hold is
    /// gone with it. Running sequences are rewound; those that were ending are simply forgotten.
    fn suspend(&mut self, why: &str) {
        if self.chain.take().is_none() {
            return;
        }
        // Dropping the sender ends the feed task after the frame in hand.
        self.feeder = None;
        self.in_flight.clear();
        let ids: Vec<u64> = self.seqs.keys().copied().collect();
        let mut paused = 0;
        for seq in ids {
            let s = self.seqs.get_mut(&seq).expect("listed above");
            if !s.ending && s.phase != Phase::Closing && s.pauses < MAX_PAUSES {
                s.rewind();
                paused += 1;
                continue;
            }
            if !s.ending {
                let _ = s.job.tx.send(StreamEvent::Failed(format!("the chain broke {} times under this request; last: {why}", s.pauses + 1)));
            }
            self.seqs.remove(&seq);
            self.counters.running.fetch_sub(1, Ordering::SeqCst);
            self.counters.admitted.fetch_sub(1, Ordering::SeqCst);
        }
        tracing::warn!("{paused} stream(s) paused, {} queued: {why}", self.waiting.len());
    }

    /// Takes `chain` into use: every rewound sequence is reopened on it (and then re-prefilled by
    /// the ordinary packing); a cluster that had failed serves again. Returns how many resumed.
    fn resume(&mut self, chain: Chain) -> usize {
        let chain = Arc::new(chain);
        self.epoch = chain.epoch;
        if self.auto_in_flight {
            self.cfg.max_in_flight = chain.n_stages.max(1);
        }
        let (feeder, frames) = mpsc::unbounded_channel();
        tokio::spawn(feed(chain.clone(), self.counters.clone(), self.tx.clone(), frames));
        self.feeder = Some(feeder);
        self.chain = Some(chain.clone());
        *self.counters.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut resumed = 0usize;
        for (&seq, s) in &self.seqs {
            resumed += 1;
            let (chain, tx, epoch) = (chain.clone(), self.tx.clone(), self.epoch);
            let (sampling, prompt, generated) = (s.job.req.sampling.clone(), s.job.req.prompt_tokens.clone(), s.emitted.clone());
            tokio::spawn(async move {
                let result = open_everywhere(&chain, seq, sampling, prompt, generated).await;
                let _ = tx.send(Msg::Opened { seq, epoch, result });
            });
        }
        if resumed > 0 {
            self.counters.resumed.fetch_add(resumed as u64, Ordering::Relaxed);
            tracing::info!("{resumed} stream(s) resume on chain {}", self.epoch);
        }
        resumed
    }

    /// Ends a job that never ran.
    fn reject(&self, job: Job, why: &str) {
        let _ = job.tx.send(StreamEvent::Failed(why.to_string()));
        self.counters.admitted.fetch_sub(1, Ordering::SeqCst);
    }

    /// A token the last stage sampled for `seq`.
    fn token(&mut self, seq: u64, sampled: Sampled) {
        let Some(s) = self.seqs.get_mut(&seq) else { return };
        if s.ending {
            return;
        }
        let req = &s.job.req;
        let end = if req.stop_token_ids.contains(&sampled.token) {
            Some(Finish::Stop)
        } else {
            let token = sampled.token;
            s.emitted.push(token);
            if s.job.tx.send(StreamEvent::Token(sampled)).is_err() {
                // The client went away: stop here, silently.
                s.ending = true;
                None
            } else if s.emitted.len() >= req.max_tokens {
                Some(Finish::Length)
            } else {
                s.next = Some(token);
                None
            }
        };
        if let Some(finish) = end {
            let _ = s.job.tx.send(StreamEvent::Finished(finish));
            s.ending = true;
        }
    }

    /// Closes `seq` on every stage once it is ending and nothing of it is in flight.
    fn close_if_idle(&mut self, seq: u64) {
        let Some(s) = self.seqs.get_mut(&seq) else { return };
        // An opening sequence closes when its open returns (closing now could race the open).
        if !s.ending || s.in_flight > 0 || s.phase != Phase::Running {
            return;
        }
        s.phase = Phase::Closing;
        let Some(chain) = self.chain.clone() else {
            // Suspended: the next chain starts empty, there is nothing to close.
            let _ = self.tx.send(Msg::Closed { seq });
            return;
        };
        let (counters, tx) = (self.counters.clone(), self.tx.clone());
        tokio::spawn(async move {
            close_everywhere(&chain, &counters, seq).await;
            let _ = tx.send(Msg::Closed { seq });
        });
    }

    /// Moves queued jobs into the running set while there is room, opening them on every stage.
    fn promote(&mut self) {
        let Some(chain) = self.chain.clone() else { return };
        while self.seqs.len() < self.cfg.max_running {
            let Some(job) = self.waiting.pop_front() else { return };
            if job.tx.is_closed() {
                // Left while queued: it costs nothing more.
                self.counters.admitted.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let (sampling, prompt) = (job.req.sampling.clone(), job.req.prompt_tokens.clone());
            self.counters.running.fetch_add(1, Ordering::SeqCst);
            self.seqs.insert(seq, Seq::new(job));
            let (chain, tx, epoch) = (chain.clone(), self.tx.clone(), self.epoch);
            tokio::spawn(async move {
                let result = open_everywhere(&chain, seq, sampling, prompt, Vec::new()).await;
                let _ = tx.send(Msg::Opened { seq, epoch, result });
            });
        }
    }

    /// Packs and sends one micro-batch; false when no sequence has work that can go now.
    fn dispatch(&mut self) -> bool {
        let Some(feeder) = self.feeder.clone() else { return false };
        // Abandoned streams stop at their next step.
        let abandoned: Vec<u64> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.phase == Phase::Running && !s.ending && s.job.tx.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for seq in abandoned {
            if let Some(s) = self.seqs.get_mut(&seq) {
                s.ending = true;
            }
            self.close_if_idle(seq);
        }
        self.clock += 1;
        let prefilling = self.in_flight.values().filter(|(_, p)| *p).count();
        let allow_prefill = prefilling < self.cfg.prefill_in_flight.max(1);
        let Some((chunks, ids, prefill)) = pack(&mut self.seqs, &self.cfg, self.clock, allow_prefill) else { return false };
        let mb = self.next_micro_batch;
        self.next_micro_batch += 1;
        let members: Vec<u64> = chunks.iter().map(|c| c.seq_id).collect();
        match tokens_frame(mb, &chunks, &ids) {
            Ok(frame) => {
                self.in_flight.insert(mb, (members, prefill));
                if feeder.send((mb, frame)).is_err() {
                    let _ = self.tx.send(Msg::Suspend { epoch: self.epoch, why: "the chain feeder stopped".into() });
                }
            }
            Err(e) => {
                // Cannot happen for positions and sizes the scheduler makes; fail just these.
                self.in_flight.insert(mb, (members, prefill));
                let _ = self.tx.send(Msg::Returned { micro_batch: mb, result: Err(e.to_string()), in_order: false });
            }
        }
        true
    }
}

/// Packs the next micro-batch from the running sequences: the ready decode tokens, least recently
/// served first and no more than an even share of the decoding streams per micro-batch in flight,
/// then (when `allow_prefill`) prompt tokens up to the prefill budget, first come first served.
/// Marks what it took as in flight at step `clock` and says whether prompt chunks went; `None`
/// when no sequence has work that can go now.
fn pack(seqs: &mut HashMap<u64, Seq>, cfg: &SchedulerConfig, clock: u64, allow_prefill: bool) -> Option<(Vec<SeqChunk>, Vec<u32>, bool)> {
    let live = |s: &Seq| s.phase == Phase::Running && !s.ending;
    let decoding = seqs.values().filter(|s| live(s) && s.prefilled()).count();
    // Spread the decoding streams over the micro-batches in flight, so every stage has work.
    let per_batch = decoding.div_ceil(cfg.max_in_flight.max(1)).clamp(1, cfg.max_batch.max(1));
    let mut ready: Vec<(u64, u64)> =
        seqs.iter().filter(|(_, s)| live(s) && s.prefilled() && s.in_flight == 0 && s.next.is_some()).map(|(&id, s)| (s.served, id)).collect();
    ready.sort_unstable();
    ready.truncate(per_batch);
    let mut prefill: Vec<u64> = seqs.iter().filter(|(_, s)| allow_prefill && live(s) && !s.prefilled()).map(|(&id, _)| id).collect();
    // Sequence ids grow with admission: first come, first prefilled.
    prefill.sort_unstable();

    let mut chunks = Vec::new();
    let mut ids = Vec::new();
    for (_, seq) in ready {
        let s = seqs.get_mut(&seq).expect("listed above");
        let token = s.next.take().expect("ready means a token is waiting");
        chunks.push(SeqChunk { seq_id: seq, start_pos: s.prompt_len() + s.emitted.len() - 1, n_tokens: 1 });
        ids.push(token);
    }
    let decodes = chunks.len();
    let mut budget = cfg.prefill_chunk.max(1);
    for seq in prefill {
        if budget == 0 || chunks.len() >= cfg.max_batch.max(1) {
            break;
        }
        let s = seqs.get_mut(&seq).expect("listed above");
        let n = (s.context.len() - s.sent).min(budget);
        chunks.push(SeqChunk { seq_id: seq, start_pos: s.sent, n_tokens: n });
        ids.extend_from_slice(&s.context[s.sent..s.sent + n]);
        s.sent += n;
        budget -= n;
    }
    if chunks.is_empty() {
        return None;
    }
    for c in &chunks {
        let s = seqs.get_mut(&c.seq_id).expect("listed above");
        s.in_flight += 1;
        s.served = clock;
    }
    let prefill = chunks.len() > decodes;
    Some((chunks, ids, prefill))
}

/// Sends micro-batches into the chain in the order they were packed: through stage 0 when the
/// head hosts it, then over the link to the first worker. One task, so that the chunks of one
/// prompt reach every stage in order.
async fn feed(chain: Arc<Chain>, counters: Arc<Counters>, tx: UnboundedSender<Msg>, mut frames: UnboundedReceiver<(u64, Frame)>) {
    while let Some((mb, frame)) = frames.recv().await {
        let frame = match &chain.local {
            Some(stage) => {
                let started = Instant::now();
                let out = run_blocking(stage.clone(), frame, chain.local_epoch).await;
                counters.local_forwards.fetch_add(1, Ordering::Relaxed);
                counters.local_forward_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                // Never wait here: an open or close holding the lock updates the figure itself.
                if let Ok(s) = stage.try_lock() {
                    counters.local_kv_bytes.store(s.shard().kv_bytes(), Ordering::Relaxed);
                }
                match out {
                    Some(f) if f.kind == FrameKind::Control => {
                        let _ = tx.send(Msg::Returned { micro_batch: mb, result: Err(parse_failure(&f).to_string()), in_order: false });
                        continue;
                    }
                    Some(f) => f,
                    // Stage 0 was reset for a newer chain: this one is over.
                    None => return,
                }
            }
            None => frame,
        };
        if let Err(e) = chain.downstream.send(&frame).await {
            (chain.on_link_failure)(format!("the link to the first worker failed: {e}"));
            return;
        }
    }
}

/// Opens the sequence on every stage; the last stage installs its sampler, resumed after
/// `generated` when the sequence continues on a rebuilt chain.
async fn open_everywhere(chain: &Chain, seq: u64, sampling: SamplingParams, prompt: Vec<u32>, generated: Vec<u32>) -> Result<(), String> {
    let open = pb::OpenSequenceRequest {
        sequence_id: seq,
        sampling: Some(sampling_to_proto(&sampling)),
        prompt_tokens: prompt.clone(),
        generated: generated.clone(),
        chain: chain.epoch,
    };
    if let Some(stage) = &chain.local {
        let (stage, epoch) = (stage.clone(), chain.local_epoch);
        // The lock waits for a running forward: off the async threads.
        tokio::task::spawn_blocking(move || {
            let mut stage = stage.lock().map_err(|_| "stage 0 poisoned".to_string())?;
            if stage.epoch() != epoch {
                return Err("stage 0 was reset for a newer chain".to_string());
            }
            stage
                .open_sequence(seq, Some(Opening { params: sampling, prompt: &prompt, generated: &generated }))
                .map_err(|e| format!("stage 0: open sequence: {e}"))
        })
        .await
        .map_err(|e| format!("stage 0: open task: {e}"))??;
    }
    // All workers at once: each answers between two of its forwards.
    let mut calls = tokio::task::JoinSet::new();
    for (name, client) in &chain.workers {
        let (name, mut client, open) = (name.clone(), client.clone(), open.clone());
        calls.spawn(async move {
            match tokio::time::timeout(RPC_TIMEOUT, client.open_sequence(open)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(s)) => Err(format!("worker {name}: open sequence: {}", s.message())),
                Err(_) => Err(format!("worker {name}: open sequence timed out")),
            }
        });
    }
    let mut result = Ok(());
    while let Some(done) = calls.join_next().await {
        let r = done.map_err(|e| format!("open task: {e}")).and_then(|r| r);
        if result.is_ok() {
            result = r;
        }
    }
    result
}

/// Frees the sequence on every stage that still answers.
async fn close_everywhere(chain: &Chain, counters: &Counters, seq: u64) {
    if let Some(stage) = &chain.local {
        let stage = stage.clone();
        let kv = tokio::task::spawn_blocking(move || {
            stage.lock().ok().map(|mut s| {
                s.close_sequence(seq);
                s.shard().kv_bytes()
            })
        })
        .await;
        if let Ok(Some(kv)) = kv {
            counters.local_kv_bytes.store(kv, Ordering::Relaxed);
        }
    }
    let mut calls = tokio::task::JoinSet::new();
    for (_, client) in &chain.workers {
        let mut client = client.clone();
        calls.spawn(async move { tokio::time::timeout(RPC_TIMEOUT, client.close_sequence(pb::CloseSequenceRequest { sequence_id: seq })).await });
    }
    while calls.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(prompt_len: usize, sent: usize, generated: usize, next: Option<u32>, served: u64) -> Seq {
        let (tx, stream) = TokenStream::channel();
        // The stream stays alive for the test's duration through the leaked receiver.
        std::mem::forget(stream);
        let req = GenerationRequest { prompt_tokens: (0..prompt_len as u32).collect(), sampling: Default::default(), max_tokens: 100, stop_token_ids: vec![] };
        let mut s = Seq::new(Job { req, tx });
        (s.phase, s.sent, s.emitted, s.next, s.served) = (Phase::Running, sent, (0..generated as u32).collect(), next, served);
        s
    }

    fn cfg(max_batch: usize, prefill_chunk: usize, max_in_flight: usize) -> SchedulerConfig {
        SchedulerConfig { max_batch, prefill_chunk, max_in_flight, ..SchedulerConfig::default() }
    }

    /// `(seq, start_pos, n_tokens)` of a packed micro-batch.
    fn shape(chunks: &[SeqChunk]) -> Vec<(u64, usize, usize)> {
        chunks.iter().map(|c| (c.seq_id, c.start_pos, c.n_tokens)).collect()
    }

    #[test]
    fn a_long_prompt_enters_in_chunks_beside_decode_steps() {
        // Two streams decoding (prompts of 5, one token generated each) and a 40-token prompt.
        let mut seqs = HashMap::from([(1, seq(5, 5, 1, Some(70), 1)), (2, seq(5, 5, 1, Some(71), 2)), (3, seq(40, 0, 0, None, 0))]);
        let cfg = cfg(8, 16, 2);
        let (chunks, ids, prefill) = pack(&mut seqs, &cfg, 10, true).unwrap();
        assert!(prefill);
        // One decode stream per micro-batch (two streams over two in flight), least recently
        // served first, then the first prompt chunk.
        assert_eq!(shape(&chunks), [(1, 5, 1), (3, 0, 16)]);
        assert_eq!(ids[0], 70);
        assert_eq!(&ids[1..], &(0..16).collect::<Vec<u32>>()[..]);
        // Prompt chunks held back (one already in flight): the decode step goes alone.
        let (chunks, _, prefill) = pack(&mut seqs, &cfg, 11, false).unwrap();
        assert_eq!((shape(&chunks), prefill), (vec![(2, 5, 1)], false));
        // Allowed, the next chunk of the same prompt goes while the first is still in flight.
        let (chunks, _, _) = pack(&mut seqs, &cfg, 12, true).unwrap();
        assert_eq!(shape(&chunks), [(3, 16, 16)]);
        let (chunks, _, _) = pack(&mut seqs, &cfg, 13, true).unwrap();
        assert_eq!(shape(&chunks), [(3, 32, 8)]);
        // Everything is in flight now: nothing to pack.
        assert!(pack(&mut seqs, &cfg, 14, true).is_none());
        assert_eq!((seqs[&1].in_flight, seqs[&3].in_flight), (1, 3));
    }

    #[test]
    fn decode_streams_take_turns_and_batches_are_capped() {
        let mut seqs: HashMap<u64, Seq> = (1..=6).map(|i| (i, seq(3, 3, 2, Some(i as u32), 10 - i))).collect();
        // Six decoding streams over three micro-batches in flight: two per batch, the least
        // recently served (highest id here) first.
        let (chunks, _, _) = pack(&mut seqs, &cfg(8, 16, 3), 20, true).unwrap();
        assert_eq!(shape(&chunks), [(6, 4, 1), (5, 4, 1)]);
        // A one-sequence cap wins over the even share.
        let (chunks, _, _) = pack(&mut seqs, &cfg(1, 16, 1), 21, true).unwrap();
        assert_eq!(shape(&chunks), [(4, 4, 1)]);
        // Ending sequences and those still opening are left out.
        seqs.get_mut(&3).unwrap().ending = true;
        seqs.get_mut(&2).unwrap().phase = Phase::Opening;
        let (chunks, _, _) = pack(&mut seqs, &cfg(8, 16, 1), 22, true).unwrap();
        assert_eq!(shape(&chunks), [(1, 4, 1)]);
        assert!(pack(&mut seqs, &cfg(8, 16, 1), 23, true).is_none());
    }

    #[test]
    fn a_rewound_sequence_replays_its_context_then_feeds_its_last_token() {
        // Prompt of 5, tokens 100, 101, 102 streamed; 102 was in flight when the chain broke.
        let mut seqs = HashMap::from([(1, seq(5, 5, 0, None, 0))]);
        let s = seqs.get_mut(&1).unwrap();
        s.emitted = vec![100, 101, 102];
        s.in_flight = 1;
        s.rewind();
        assert!(s.phase == Phase::Opening && s.in_flight == 0 && !s.prefilled());
        assert_eq!((&s.context[5..], s.next), (&[100, 101][..], Some(102)));
        s.phase = Phase::Running;
        // The prompt and the streamed tokens but the last go in as prefill, in chunks...
        let (chunks, ids, prefill) = pack(&mut seqs, &cfg(8, 4, 1), 1, true).unwrap();
        assert_eq!((shape(&chunks), prefill), (vec![(1, 0, 4)], true));
        assert_eq!(ids, [0, 1, 2, 3]);
        seqs.get_mut(&1).unwrap().in_flight = 0;
        let (chunks, ids, _) = pack(&mut seqs, &cfg(8, 4, 1), 2, true).unwrap();
        assert_eq!((shape(&chunks), ids), (vec![(1, 4, 3)], vec![4, 100, 101]));
        seqs.get_mut(&1).unwrap().in_flight = 0;
        // ...then the last streamed token is the next decode step, at the position it had.
        let (chunks, ids, prefill) = pack(&mut seqs, &cfg(8, 4, 1), 3, true).unwrap();
        assert_eq!((shape(&chunks), ids, prefill), (vec![(1, 7, 1)], vec![102], false));
    }

    #[test]
    fn a_sequence_rewound_before_its_first_token_starts_over() {
        let mut s = seq(6, 4, 0, None, 0);
        s.rewind();
        assert_eq!((s.context.len(), s.sent, s.next), (6, 0, None));
    }

    #[test]
    fn prompts_share_the_prefill_budget_in_arrival_order() {
        let mut seqs = HashMap::from([(7, seq(10, 0, 0, None, 0)), (4, seq(3, 0, 0, None, 0)), (9, seq(30, 0, 0, None, 0))]);
        let (chunks, ids, _) = pack(&mut seqs, &cfg(8, 16, 2), 1, true).unwrap();
        assert_eq!(shape(&chunks), [(4, 0, 3), (7, 0, 10), (9, 0, 3)]);
        assert_eq!(ids.len(), 16);
    }
}
