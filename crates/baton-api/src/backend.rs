//! The seam between the HTTP API and whatever generates tokens: the head's scheduler over a
//! cluster, or [`crate::local::LocalBackend`] in one process.
//!
//! A backend takes tokenized requests and streams sampled tokens back. Text, chat templates,
//! stop strings and usage are the API's business; admission, batching, KV and cancellation are
//! the backend's.

use baton_model::generation::Finish;
use baton_model::sampling::{Sampled, SamplingParams};
use baton_model::tokenizer::Tokenizer;
use tokio::sync::mpsc;

/// One generation as the backend sees it.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt_tokens: Vec<u32>,
    pub sampling: SamplingParams,
    /// Tokens to generate at most (the stop token, when one ends the sequence, is not counted).
    pub max_tokens: usize,
    /// Ids that end the sequence when sampled; they are not streamed.
    pub stop_token_ids: Vec<u32>,
}

impl GenerationRequest {
    /// What every backend checks before admitting a request: prompt ids inside the vocabulary,
    /// prompt plus budget within the context length, valid sampling parameters.
    pub fn check(&self, tokenizer: &Tokenizer, context_length: usize) -> Result<(), SubmitError> {
        let vocab = tokenizer.vocab_size();
        if let Some(id) = self.prompt_tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(SubmitError::Invalid(format!("token id {id} is outside the vocabulary ({vocab} tokens)")));
        }
        if self.prompt_tokens.len() + self.max_tokens > context_length {
            return Err(SubmitError::ContextLength {
                prompt_tokens: self.prompt_tokens.len(),
                max_tokens: self.max_tokens,
                context_length,
            });
        }
        self.sampling.check().map_err(|e| SubmitError::Invalid(e.to_string()))
    }
}

/// What a [`TokenStream`] yields: tokens, then exactly one `Finished` or `Failed`.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    Token(Sampled),
    Finished(Finish),
    /// The generation broke off (a stage failed, ...); the text so far stands.
    Failed(String),
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full")]
    QueueFull,
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("{prompt_tokens} prompt tokens + {max_tokens} to generate exceed the context length of {context_length}")]
    ContextLength { prompt_tokens: usize, max_tokens: usize, context_length: usize },
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// The tokens of one generation, as they are sampled.
///
/// Dropping the stream cancels the generation: the backend notices that the receiving end is
/// gone, stops the sequence and frees its KV cache on every stage. An HTTP client that
/// disconnects drops it, so its generation stops too.
#[derive(Debug)]
pub struct TokenStream {
    rx: mpsc::UnboundedReceiver<StreamEvent>,
}

impl TokenStream {
    /// A stream fed by `tx`; a backend watches `tx.is_closed()` to learn of cancellation.
    pub fn channel() -> (mpsc::UnboundedSender<StreamEvent>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Self { rx })
    }

    /// The next event; `None` only if the backend vanished without finishing, which the API
    /// reports as a failure.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        self.rx.recv().await
    }
}

/// Live figures a backend reports for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct BackendStats {
    /// Admitted sequences not yet running.
    pub queued: usize,
    /// Sequences running (holding KV cache).
    pub in_flight: usize,
    /// KV cache bytes held, all stages together.
    pub kv_bytes: u64,
    pub stages: Vec<StageStats>,
    pub links: Vec<LinkStats>,
    /// The cluster's nodes, up or not and why (empty for a single process).
    pub nodes: Vec<NodeStats>,
    /// Chains built after the first (node losses, drains, rebalances).
    pub replans: u64,
    /// Streams that paused and continued on a rebuilt chain.
    pub resumed_sequences: u64,
}

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct NodeStats {
    pub node: String,
    pub up: bool,
    /// One of [`crate::metrics::NODE_STATES`]: `serving`, `spare` (known, not in the chain),
    /// `gone` (lost) or `drained`. The full reason is in the head's status and log.
    pub state: String,
    /// Times the head lost this node.
    pub losses: u64,
}

/// Forward-pass time of one stage, cumulative, and the KV cache it holds now.
#[derive(Debug, Clone)]
pub struct StageStats {
    pub stage: String,
    pub forwards: u64,
    pub forward_seconds: f64,
    pub kv_bytes: u64,
}

/// One data-plane link between stages.
#[derive(Debug, Clone)]
pub struct LinkStats {
    pub from: String,
    pub to: String,
    pub transport: String,
    pub rtt_seconds: f64,
}

/// A generation engine the API can serve. Implementations must accept concurrent `submit`
/// calls; each returned stream is independent.
pub trait Backend: Send + Sync + 'static {
    /// The id `/v1/models` lists and requests must name.
    fn model_id(&self) -> &str;
    /// Prompt plus generated tokens one sequence may hold.
    fn context_length(&self) -> usize;
    /// `Ok` when requests can be served now; otherwise why not (sent with 503).
    fn readiness(&self) -> Result<(), String>;
    fn tokenizer(&self) -> &Tokenizer;
    /// Admits a generation, or says why not; never blocks on the generation itself.
    fn submit(&self, req: GenerationRequest) -> Result<TokenStream, SubmitError>;
    fn stats(&self) -> BackendStats;
}
