//! A [`Backend`] in one process: the model as a [`LocalPipeline`] on a dedicated thread, which
//! interleaves the running sequences one decode step each (so streams progress together and each
//! one's tokens are exactly what it would get alone).

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Instant;

use baton_model::generation::Finish;
use baton_model::loader::ModelSource;
use baton_model::pipeline::{even_split, LocalPipeline, WireDType};
use baton_model::sampling::Sampler;
use baton_model::shard::{BatchInput, Logits, MicroBatch, SeqChunk};
use baton_model::tokenizer::Tokenizer;
use baton_model::ModelError;
use candle_core::{Device, Tensor};
use tokio::sync::mpsc::UnboundedSender;

use crate::backend::{
    Backend, BackendStats, GenerationRequest, StageStats, StreamEvent, SubmitError, TokenStream,
};

#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The id served as `model`; defaults to the file name without extension.
    pub model_id: Option<String>,
    /// Shards the model is split into (hidden states cross each boundary in `wire`).
    pub split: usize,
    pub wire: WireDType,
    /// Sequences decoding at once; more wait in the queue.
    pub max_running: usize,
    /// Sequences admitted (running + waiting); more get [`SubmitError::QueueFull`].
    pub max_queued: usize,
    /// Prompt tokens per prefill forward.
    pub prefill_chunk: usize,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            model_id: None,
            split: 1,
            wire: WireDType::F32,
            max_running: 16,
            max_queued: 64,
            prefill_chunk: 512,
        }
    }
}

/// What readiness says while the weights load.
const LOADING: &str = "loading the model";

/// Counters shared by the API side and the engine thread.
#[derive(Default)]
struct Shared {
    /// Admitted and not finished (waiting + running).
    admitted: AtomicUsize,
    running: AtomicUsize,
    kv_bytes: AtomicU64,
    forwards: AtomicU64,
    forward_nanos: AtomicU64,
    /// `None` once loaded; otherwise what readiness reports.
    not_ready: Mutex<Option<String>>,
}

struct Job {
    req: GenerationRequest,
    tx: UnboundedSender<StreamEvent>,
}

pub struct LocalBackend {
    model_id: String,
    context_length: usize,
    tokenizer: Tokenizer,
    max_queued: usize,
    jobs: std_mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

impl LocalBackend {
    /// Opens the model's headers and tokenizer now and loads the weights on the engine thread;
    /// until they are loaded, [`Backend::readiness`] says so and requests get 503.
    pub fn start(path: &Path, opts: LocalOptions) -> Result<Self, ModelError> {
        let source = ModelSource::open(path)?;
        let tokenizer = source.tokenizer()?;
        let n_layers = source.config().n_layers;
        let ranges = even_split(n_layers, opts.split)?;
        let model_id = opts.model_id.clone().unwrap_or_else(|| {
            path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
        });
        let shared = Arc::new(Shared {
            not_ready: Mutex::new(Some(LOADING.into())),
            ..Shared::default()
        });
        let (tx, rx) = std_mpsc::channel();
        let context_length = source.config().context_length;
        let max_queued = opts.max_queued;
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("baton-local-engine".into())
            .spawn(move || {
                let pipeline = match LocalPipeline::load(&source, &ranges, opts.wire, &Device::Cpu) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!("loading the model failed: {e}");
                        *lock(&thread_shared.not_ready) = Some(format!("loading the model failed: {e}"));
                        return;
                    }
                };
                *lock(&thread_shared.not_ready) = None;
                Engine { pipeline, shared: thread_shared, opts, next_seq: 1 }.run(rx);
            })
            .map_err(|e| ModelError::Config(format!("cannot start the engine thread: {e}")))?;
        Ok(Self { model_id, context_length, tokenizer, max_queued, jobs: tx, shared })
    }

    /// Blocks until the model is loaded (or failed to load), for callers that need it ready.
    pub fn wait_ready(&self, timeout: std::time::Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.readiness() {
                Err(e) if e == LOADING && Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => return other,
            }
        }
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked (it is plain counters/state).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Backend for LocalBackend {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn context_length(&self) -> usize {
        self.context_length
    }

    fn readiness(&self) -> Result<(), String> {
        match lock(&self.shared.not_ready).as_ref() {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn submit(&self, req: GenerationRequest) -> Result<TokenStream, SubmitError> {
        self.readiness().map_err(SubmitError::NotReady)?;
        if req.prompt_tokens.is_empty() {
            return Err(SubmitError::Invalid("the prompt has no tokens".into()));
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::Invalid("max_tokens must be at least 1".into()));
        }
        req.check(&self.tokenizer, self.context_length)?;
        // Reserve a queue slot before sending, so concurrent submits cannot overshoot the limit.
        let admitted = self.shared.admitted.fetch_add(1, Ordering::SeqCst);
        if admitted >= self.max_queued {
            self.shared.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        let (tx, stream) = TokenStream::channel();
        if self.jobs.send(Job { req, tx }).is_err() {
            self.shared.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::NotReady("the engine thread has stopped".into()));
        }
        Ok(stream)
    }

    fn stats(&self) -> BackendStats {
        let s = &self.shared;
        let running = s.running.load(Ordering::SeqCst);
        BackendStats {
            queued: s.admitted.load(Ordering::SeqCst).saturating_sub(running),
            in_flight: running,
            kv_bytes: s.kv_bytes.load(Ordering::SeqCst),
            stages: vec![StageStats {
                stage: "local".into(),
                forwards: s.forwards.load(Ordering::SeqCst),
                forward_seconds: s.forward_nanos.load(Ordering::SeqCst) as f64 * 1e-9,
                kv_bytes: s.kv_bytes.load(Ordering::SeqCst),
            }],
            ..BackendStats::default()
        }
    }
}

/// One running sequence on the engine thread.
struct Running {
    seq_id: u64,
    req: GenerationRequest,
    tx: UnboundedSender<StreamEvent>,
    sampler: Sampler,
    /// Logits of the last forward; `None` before prefill.
    logits: Option<Tensor>,
    generated: usize,
}

/// How a step left a sequence.
enum Step {
    Continue,
    Done,
}

struct Engine {
    pipeline: LocalPipeline,
    shared: Arc<Shared>,
    opts: LocalOptions,
    next_seq: u64,
}

impl Engine {
    fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
        let mut running: Vec<Running> = Vec::new();
        loop {
            if running.is_empty() {
                // Idle: sleep until a job arrives; the channel closes when the backend is dropped.
                match jobs.recv() {
                    Ok(job) => self.admit(job, &mut running),
                    Err(_) => return,
                }
            }
            while running.len() < self.opts.max_running.max(1) {
                match jobs.try_recv() {
                    Ok(job) => self.admit(job, &mut running),
                    Err(_) => break,
                }
            }
            let mut i = 0;
            while i < running.len() {
                let outcome = self.step(&mut running[i]);
                let done = match outcome {
                    Ok(Step::Continue) => false,
                    Ok(Step::Done) => true,
                    Err(e) => {
                        let _ = running[i].tx.send(StreamEvent::Failed(e.to_string()));
                        true
                    }
                };
                if done {
                    let seq = running.swap_remove(i);
                    self.close(seq.seq_id);
                } else {
                    i += 1;
                }
            }
        }
    }

    fn admit(&mut self, job: Job, running: &mut Vec<Running>) {
        let seq_id = self.next_seq;
        self.next_seq += 1;
        // A client that left while queued costs nothing more.
        if job.tx.is_closed() {
            self.shared.admitted.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let opened = Sampler::new(job.req.sampling.clone(), &job.req.prompt_tokens)
            .and_then(|sampler| self.pipeline.open_sequence(seq_id).map(|()| sampler));
        match opened {
            Ok(sampler) => {
                self.shared.running.fetch_add(1, Ordering::SeqCst);
                running.push(Running { seq_id, req: job.req, tx: job.tx, sampler, logits: None, generated: 0 });
            }
            Err(e) => {
                let _ = job.tx.send(StreamEvent::Failed(e.to_string()));
                self.shared.admitted.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    fn close(&mut self, seq_id: u64) {
        if let Err(e) = self.pipeline.close_sequence(seq_id) {
            tracing::error!("closing sequence {seq_id}: {e}");
        }
        self.shared.kv_bytes.store(self.pipeline.kv_bytes(), Ordering::SeqCst);
        self.shared.running.fetch_sub(1, Ordering::SeqCst);
        self.shared.admitted.fetch_sub(1, Ordering::SeqCst);
    }

    fn forward(&mut self, seq_id: u64, start_pos: usize, tokens: &[u32]) -> Result<Tensor, ModelError> {
        let batch = MicroBatch {
            seqs: vec![SeqChunk { seq_id, start_pos, n_tokens: tokens.len() }],
            input: BatchInput::Tokens(tokens.to_vec()),
        };
        let start = Instant::now();
        let logits = self.pipeline.forward(&batch, Logits::LastToken)?;
        self.shared.forwards.fetch_add(1, Ordering::Relaxed);
        self.shared.forward_nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.shared.kv_bytes.store(self.pipeline.kv_bytes(), Ordering::SeqCst);
        Ok(logits)
    }

    /// Prefill (first call) or one decode step of `seq`.
    fn step(&mut self, seq: &mut Running) -> Result<Step, ModelError> {
        // The client dropped its stream: stop here; the caller frees the KV cache.
        if seq.tx.is_closed() {
            return Ok(Step::Done);
        }
        let logits = match seq.logits.take() {
            Some(l) => l,
            None => {
                let chunk = self.opts.prefill_chunk.max(1);
                let mut last = None;
                for (i, part) in seq.req.prompt_tokens.chunks(chunk).enumerate() {
                    last = Some(self.forward(seq.seq_id, i * chunk, part)?);
                }
                last.ok_or_else(|| ModelError::Batch("the prompt has no tokens".into()))?
            }
        };
        let sampled = seq.sampler.sample(&logits.squeeze(0)?)?;
        if seq.req.stop_token_ids.contains(&sampled.token) {
            let _ = seq.tx.send(StreamEvent::Finished(Finish::Stop));
            return Ok(Step::Done);
        }
        let token = sampled.token;
        if seq.tx.send(StreamEvent::Token(sampled)).is_err() {
            return Ok(Step::Done);
        }
        seq.generated += 1;
        if seq.generated >= seq.req.max_tokens {
            let _ = seq.tx.send(StreamEvent::Finished(Finish::Length));
            return Ok(Step::Done);
        }
        let pos = seq.req.prompt_tokens.len() + seq.generated - 1;
        seq.logits = Some(self.forward(seq.seq_id, pos, &[token])?);
        Ok(Step::Continue)
    }
}
