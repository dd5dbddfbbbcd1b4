//! A stage: one shard, the samplers of its sequences when it is the last stage, and the loop that
//! moves micro-batches from the upstream link through the shard to the downstream link.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_model::pipeline::WireDType;
use baton_model::sampling::{Sampler, SamplingParams};
use baton_model::shard::{Shard, ShardOutput};
use baton_transport::{Frame, FrameKind, Link};
use tokio::sync::mpsc;

use crate::wire::{self, StageFailure};
use crate::{Result, WorkerError};

/// A sequence's sampler on the last stage, and how many tokens go in before the first it samples:
/// chunks that end before then (prefill split over several micro-batches, or the replay of a
/// resumed sequence) produce no token.
struct SeqSampler {
    sampler: Sampler,
    prompt_len: usize,
}

/// What the last stage needs to open a sequence: its sampling parameters, its prompt and, for a
/// sequence resumed on a rebuilt chain, the tokens it had generated before.
pub struct Opening<'a> {
    pub params: SamplingParams,
    pub prompt: &'a [u32],
    pub generated: &'a [u32],
}

pub struct Stage {
    shard: Shard,
    wire: WireDType,
    samplers: HashMap<u64, SeqSampler>,
    tokens_processed: u64,
    forwards: u64,
    forward_time: Duration,
    /// Which chain the stage serves; [`Stage::reset`] moves it on, so that a frame of the chain
    /// before (still queued in an old stage loop) is dropped instead of touching the new state.
    epoch: u64,
}

impl Stage {
    pub fn new(shard: Shard, wire: WireDType) -> Self {
        Stage { shard, wire, samplers: HashMap::new(), tokens_processed: 0, forwards: 0, forward_time: Duration::ZERO, epoch: 0 }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Readies the loaded shard for a new chain: every sequence closed, frames of the old chain
    /// refused from now on. Returns the new epoch.
    pub fn reset(&mut self, wire: WireDType) -> u64 {
        self.shard.close_all();
        self.samplers.clear();
        self.wire = wire;
        self.epoch += 1;
        self.epoch
    }

    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// `start..end` of the shard's layers, for messages.
    pub fn label(&self) -> String {
        let r = self.shard.range();
        format!("{}..{}", r.start, r.end)
    }

    pub fn tokens_processed(&self) -> u64 {
        self.tokens_processed
    }

    /// Micro-batches run and the time spent in their forward passes (sampling included).
    pub fn forward_totals(&self) -> (u64, Duration) {
        (self.forwards, self.forward_time)
    }

    /// Opens a sequence; the last stage also installs its sampler (`opening` is then required),
    /// resumed after `opening.generated` when the sequence continues on a rebuilt chain.
    pub fn open_sequence(&mut self, seq_id: u64, opening: Option<Opening<'_>>) -> Result<()> {
        let sampler = if self.shard.is_last() {
            let o = opening.ok_or_else(|| {
                WorkerError::Request(format!("sequence {seq_id}: the last stage needs sampling parameters"))
            })?;
            Some(SeqSampler {
                sampler: Sampler::resume(o.params, o.prompt, o.generated)?,
                prompt_len: o.prompt.len() + o.generated.len(),
            })
        } else {
            None
        };
        self.shard.open_sequence(seq_id)?;
        if let Some(s) = sampler {
            self.samplers.insert(seq_id, s);
        }
        Ok(())
    }

    /// Closes a sequence; false when it was not open (closing is idempotent).
    pub fn close_sequence(&mut self, seq_id: u64) -> bool {
        self.samplers.remove(&seq_id);
        self.shard.close_sequence(seq_id).is_ok()
    }

    /// Runs one micro-batch frame: hidden states for the next stage, or on the last stage a Tokens
    /// frame with a sampled token (and its logprobs, see [`wire::sampled_payload`]) for each
    /// sequence whose prompt is complete. The last stage answers every micro-batch, with no
    /// sequences when none finished its prompt, so the head can count the micro-batches in flight.
    pub fn process(&mut self, frame: &Frame) -> Result<Option<Frame>> {
        let started = Instant::now();
        let out = self.forward(frame);
        self.forwards += 1;
        self.forward_time += started.elapsed();
        out.map(Some)
    }

    fn forward(&mut self, frame: &Frame) -> Result<Frame> {
        let batch = wire::micro_batch(frame, self.shard.device())?;
        let out = self.shard.forward(&batch)?;
        self.tokens_processed += batch.total_tokens() as u64;
        match out {
            ShardOutput::Hidden(h) => wire::hidden_frame(frame.micro_batch, &batch.seqs, &h, self.wire),
            ShardOutput::Logits(logits) => {
                let mut spans = Vec::new();
                let mut samples = Vec::new();
                for (row, chunk) in batch.seqs.iter().enumerate() {
                    let s = self.samplers.get_mut(&chunk.seq_id).ok_or_else(|| {
                        WorkerError::Request(format!("sequence {} has no sampler on the last stage", chunk.seq_id))
                    })?;
                    if chunk.start_pos + chunk.n_tokens < s.prompt_len {
                        continue;
                    }
                    samples.push(s.sampler.sample(&logits.get(row)?)?);
                    spans.push(wire::spans(std::slice::from_ref(chunk))?[0]);
                }
                Ok(Frame::tokens(frame.micro_batch, &spans, wire::sampled_payload(&samples))?)
            }
        }
    }
}

/// Traffic counters of one link, for `Stats`.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
}

impl LinkCounters {
    fn add(&self, frame: &Frame) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(frame.encoded_len() as u64, Ordering::Relaxed);
    }
}

/// Runs `frame` through the stage on a blocking thread (the forward is CPU-heavy), turning any
/// error into a control frame that names it, so the head hears of every failed micro-batch.
/// `None` when the stage has moved on from `epoch` (the frame belongs to a chain that is gone).
pub async fn run_blocking(stage: Arc<Mutex<Stage>>, frame: Frame, epoch: u64) -> Option<Frame> {
    let seqs = frame.seqs.clone();
    let micro_batch = frame.micro_batch;
    let result = tokio::task::spawn_blocking(move || {
        let mut stage = stage.lock().map_err(|_| StageFailure {
            stage: "?".into(),
            message: "stage state poisoned by an earlier panic".into(),
        })?;
        if stage.epoch != epoch {
            return Ok(None);
        }
        stage.process(&frame).map_err(|e| StageFailure { stage: stage.label(), message: e.to_string() })
    })
    .await;
    let failure = match result {
        Ok(Ok(out)) => return out,
        Ok(Err(f)) => f,
        Err(join) => StageFailure { stage: "?".into(), message: format!("forward task failed: {join}") },
    };
    tracing::warn!("{failure}");
    Some(wire::failure_frame(micro_batch, &seqs, &failure))
}

/// The stage loop: upstream frames through the shard to downstream, until either link ends. A
/// writer task sends while the next micro-batch computes; control frames (failures of earlier
/// stages) pass through untouched. When the upstream link ends, the downstream link is closed
/// with the reason, so the loss travels down the chain to the head. The loop serves the stage's
/// `epoch` and ends at the first frame after a [`Stage::reset`].
pub async fn run_loop(
    stage: Arc<Mutex<Stage>>,
    epoch: u64,
    upstream: Arc<Link>,
    downstream: Arc<Link>,
    received: Arc<LinkCounters>,
    sent: Arc<LinkCounters>,
) {
    let (tx, mut rx) = mpsc::channel::<Frame>(64);
    let down = downstream.clone();
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if let Err(e) = down.send(&frame).await {
                tracing::warn!("downstream link to {} failed: {e}", down.peer());
                return;
            }
            sent.add(&frame);
        }
    });
    let reason = loop {
        let frame = match upstream.recv().await {
            Ok(f) => f,
            Err(e) => break format!("upstream link from {} ended: {e}", upstream.peer()),
        };
        received.add(&frame);
        let out = match frame.kind {
            FrameKind::Control => Some(frame),
            FrameKind::Hidden | FrameKind::Tokens => match run_blocking(stage.clone(), frame, epoch).await {
                Some(out) => Some(out),
                None => break "the stage was reset for a new chain".to_string(),
            },
        };
        if let Some(out) = out {
            if tx.send(out).await.is_err() {
                break format!("downstream link to {} failed", downstream.peer());
            }
        }
    };
    tracing::warn!("stage loop stopped: {reason}");
    drop(tx);
    let _ = writer.await;
    downstream.close(&reason).await;
    upstream.close(&reason).await;
}
