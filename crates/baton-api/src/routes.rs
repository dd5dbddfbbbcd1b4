//! The axum router and its handlers.
//!
//! `/v1/*` and `/tokenize` require an API key when keys are configured; `/health`, `/ready`,
//! `/metrics` and `/openapi.json` are open (probes and scrapers carry no keys).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use baton_model::chat::{ChatTemplate, Message};
use baton_model::generation::Finish;
use baton_model::sampling::Sampled;
use baton_model::tokenizer::{StopStrings, TextStream, Tokenizer};
use serde::Serialize;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::{require_key, ApiKeys};
use crate::backend::{Backend, GenerationRequest, StreamEvent, SubmitError, TokenStream};
use crate::config::ApiConfig;
use crate::errors::ApiError;
use crate::metrics::Metrics;
use crate::openai::{self, Endpoint, Prompt, Usage};
use crate::ServeError;

/// What every handler shares.
struct AppState {
    backend: Arc<dyn Backend>,
    metrics: Metrics,
    template: Option<ChatTemplate>,
    openapi: serde_json::Value,
    body_limit: usize,
    retry_after: u64,
    default_max_tokens: Option<usize>,
    max_tokens_limit: usize,
    /// When the server started: the `created` of the model card.
    started: u64,
}

type St = State<Arc<AppState>>;

/// The whole API over `backend`, configured by `cfg` (its `listen` is not used here).
pub fn router(backend: Arc<dyn Backend>, cfg: &ApiConfig) -> Result<Router, ServeError> {
    let tok = backend.tokenizer();
    let template = tok
        .chat_template()
        .map(|src| ChatTemplate::new(src, tok.bos_token(), tok.eos_token()))
        .transpose()
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let context_length = backend.context_length();
    let max_tokens_limit = cfg.max_tokens_limit.unwrap_or(context_length).min(context_length);
    let keys = ApiKeys::new(&cfg.api_keys);
    let openapi = crate::openapi::document(backend.model_id(), max_tokens_limit, !keys.is_empty());
    let state = Arc::new(AppState {
        backend,
        metrics: Metrics::new(),
        template,
        openapi,
        body_limit: cfg.body_limit,
        retry_after: cfg.retry_after_secs(),
        default_max_tokens: cfg.default_max_tokens,
        max_tokens_limit,
        started: now(),
    });
    let guarded = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/tokenize", post(tokenize))
        .route_layer(middleware::from_fn_with_state(keys, require_key));
    let open = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json));
    let mut app = guarded
        .merge(open)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(cfg.body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state);
    if !cfg.cors_origins.is_empty() {
        app = app.layer(cors(&cfg.cors_origins)?);
    }
    Ok(app)
}

fn cors(origins: &[String]) -> Result<CorsLayer, ServeError> {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| HeaderValue::from_str(o).map_err(|_| ServeError::Config(format!("bad CORS origin `{o}`"))))
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(list)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]))
}

/// Paths counted under their own label; others share `other`, so that scanners cannot grow
/// the label set.
const COUNTED: [&str; 8] =
    ["/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/health", "/ready", "/metrics", "/openapi.json"];

/// Counts every response by endpoint and status.
async fn track(State(st): St, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let endpoint = match COUNTED.iter().find(|k| **k == path) {
        Some(k) => k,
        None if path.starts_with("/v1/models/") => "/v1/models/{id}",
        None => "other",
    };
    let resp = next.run(req).await;
    st.metrics.request(endpoint, resp.status().as_u16());
    resp
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_owned())
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A response id unique within the process and unlikely to repeat across restarts.
fn response_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{prefix}-{:x}{nanos:08x}{:04x}", now(), NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff)
}

#[derive(Serialize)]
struct Status {
    status: &'static str,
}

async fn health() -> Json<Status> {
    Json(Status { status: "ok" })
}

async fn ready(State(st): St) -> Result<Json<Status>, ApiError> {
    st.backend
        .readiness()
        .map_err(|reason| ApiError::NotReady { reason, retry_after: st.retry_after })?;
    Ok(Json(Status { status: "ready" }))
}

async fn metrics(State(st): St) -> Response {
    let text = st.metrics.render(&st.backend.stats());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn openapi_json(State(st): St) -> Json<serde_json::Value> {
    Json(st.openapi.clone())
}

impl AppState {
    fn card(&self) -> openai::ModelCard {
        openai::ModelCard {
            id: self.backend.model_id().to_owned(),
            object: "model",
            created: self.started,
            owned_by: "baton",
            max_model_len: self.backend.context_length(),
        }
    }

    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        let served = self.backend.model_id();
        if model == served {
            Ok(())
        } else {
            Err(ApiError::ModelNotFound(model.to_owned(), served.to_owned()))
        }
    }

    fn body(&self, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
        body.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(self.body_limit)
            } else {
                ApiError::Invalid { message: format!("Cannot read the request body: {e}."), param: None }
            }
        })
    }

    /// The prompt's token ids: chats through the template (whose text carries its own special
    /// tokens, as HF's `apply_chat_template` tokenizes), text with the tokenizer's BOS/EOS.
    fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
        let tokenizer = self.backend.tokenizer();
        let internal = |e: baton_model::ModelError| ApiError::Internal(e.to_string());
        match prompt {
            Prompt::Chat(messages) => {
                let template = self.template.as_ref().ok_or_else(|| {
                    ApiError::invalid("messages", "This model has no chat template; use /v1/completions.")
                })?;
                let msgs: Vec<Message> = messages
                    .iter()
                    .map(|m| Message::new(m.role.as_str(), m.content.as_str()))
                    .collect();
                let text = template
                    .render(&msgs, true)
                    .map_err(|e| ApiError::invalid("messages", format!("The chat template cannot render these messages: {e}.")))?;
                tokenizer.encode(&text, false).map_err(internal)
            }
            Prompt::Text(text) => tokenizer.encode(text, true).map_err(internal),
            Prompt::Tokens(ids) => {
                let vocab = tokenizer.vocab_size();
                match ids.iter().position(|&id| id as usize >= vocab) {
                    Some(i) => Err(ApiError::invalid(
                        format!("prompt[{i}]"),
                        format!("Token id {} is outside the vocabulary of {vocab} tokens.", ids[i]),
                    )),
                    None => Ok(ids.clone()),
                }
            }
        }
    }
}

async fn list_models(State(st): St) -> Json<openai::ModelList> {
    Json(openai::ModelList { object: "list", data: vec![st.card()] })
}

async fn get_model(State(st): St, Path(id): Path<String>) -> Result<Json<openai::ModelCard>, ApiError> {
    st.check_model(&id)?;
    Ok(Json(st.card()))
}

async fn tokenize(State(st): St, body: Result<Bytes, BytesRejection>) -> Result<Json<openai::Tokenized>, ApiError> {
    let (model, prompt) = openai::parse_tokenize(&st.body(body)?)?;
    if let Some(m) = model {
        st.check_model(&m)?;
    }
    let tokens = st.prompt_tokens(&prompt)?;
    Ok(Json(openai::Tokenized { count: tokens.len(), max_model_len: st.backend.context_length(), tokens }))
}

async fn chat_completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    generate(st, Endpoint::Chat, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    generate(st, Endpoint::Completions, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// A validated, admitted generation: what both endpoints answer from.
struct Admitted {
    st: Arc<AppState>,
    endpoint: Endpoint,
    req: openai::Request,
    prompt_len: usize,
    tokens: TokenStream,
    id: String,
    created: u64,
    arrived: Instant,
}

async fn generate(st: Arc<AppState>, endpoint: Endpoint, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let req = openai::parse(endpoint, &st.body(body)?)?;
    st.check_model(&req.model)?;
    st.backend.readiness().map_err(|reason| ApiError::NotReady { reason, retry_after: st.retry_after })?;
    let prompt = st.prompt_tokens(&req.prompt)?;
    let context_length = st.backend.context_length();
    if let Some(m) = req.max_tokens.filter(|&m| m > st.max_tokens_limit) {
        return Err(ApiError::invalid("max_tokens", format!("`max_tokens` is {m}; this server allows at most {}.", st.max_tokens_limit)));
    }
    let room = context_length.saturating_sub(prompt.len());
    // Without a max_tokens, fill what the context leaves (at least one token, so an over-long
    // prompt still reports its numbers).
    let max_tokens = req
        .max_tokens
        .unwrap_or_else(|| st.default_max_tokens.unwrap_or(st.max_tokens_limit).min(room).max(1));
    if prompt.len() + max_tokens > context_length {
        return Err(ApiError::ContextLength { prompt_tokens: prompt.len(), max_tokens, context_length });
    }
    let tokens = st
        .backend
        .submit(GenerationRequest {
            prompt_tokens: prompt.clone(),
            sampling: req.sampling.clone(),
            max_tokens,
            stop_token_ids: st.backend.tokenizer().stop_token_ids().to_vec(),
        })
        .map_err(|e| match e {
            SubmitError::QueueFull => ApiError::QueueFull { retry_after: st.retry_after },
            SubmitError::NotReady(reason) => ApiError::NotReady { reason, retry_after: st.retry_after },
            SubmitError::ContextLength { prompt_tokens, max_tokens, context_length } => {
                ApiError::ContextLength { prompt_tokens, max_tokens, context_length }
            }
            SubmitError::Invalid(m) => ApiError::Invalid { message: m, param: None },
        })?;
    if let Some(user) = &req.user {
        tracing::debug!(user, prompt_tokens = prompt.len(), "generation admitted");
    }
    st.metrics.prompt_tokens(prompt.len());
    let (id, created) = (response_id(if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" }), now());
    let admitted = Admitted { st, endpoint, req, prompt_len: prompt.len(), tokens, id, created, arrived };
    if admitted.req.stream {
        Ok(stream_response(admitted))
    } else {
        whole_response(admitted).await
    }
}

/// Turns sampled tokens into the text a client may see: incremental detokenization, then
/// stop sequences held back until they can no longer match (and never shown), plus logprobs.
struct Output<'a> {
    tokenizer: &'a Tokenizer,
    text: TextStream<'a>,
    stops: StopStrings,
    logprobs: bool,
    completion_tokens: usize,
    /// Bytes of token text so far, for the legacy `text_offset`.
    offset: usize,
}

/// Text released by one step, and the logprobs of the tokens consumed for it.
#[derive(Default)]
struct Piece {
    text: String,
    logprobs: Vec<openai::TokenLogprob>,
    /// `text_offset` of each token in `logprobs`.
    offsets: Vec<usize>,
}

impl<'a> Output<'a> {
    fn new(tokenizer: &'a Tokenizer, stop: &[String], logprobs: bool) -> Self {
        Self {
            tokenizer,
            text: tokenizer.text_stream(true),
            stops: StopStrings::new(stop.iter().cloned()),
            logprobs,
            completion_tokens: 0,
            offset: 0,
        }
    }

    fn logprob(&self, id: u32, lp: f32) -> openai::TopLogprob {
        let bytes = self.tokenizer.token_bytes(id).unwrap_or_default();
        openai::TopLogprob { token: String::from_utf8_lossy(&bytes).into_owned(), logprob: openai::finite(lp), bytes }
    }

    /// Adds a token; `true` when a stop sequence ended the text.
    fn push(&mut self, s: &Sampled, piece: &mut Piece) -> Result<bool, ApiError> {
        self.completion_tokens += 1;
        if self.logprobs {
            let main = self.logprob(s.token, s.logprob);
            piece.offsets.push(self.offset);
            self.offset += main.bytes.len();
            let top = s.top_logprobs.iter().map(|&(id, lp)| self.logprob(id, lp)).collect();
            piece.logprobs.push(openai::TokenLogprob { token: main.token, logprob: main.logprob, bytes: main.bytes, top_logprobs: top });
        }
        let new = self.text.push(s.token).map_err(|e| ApiError::Internal(e.to_string()))?.unwrap_or_default();
        Ok(self.release(&new, piece))
    }

    fn release(&mut self, new: &str, piece: &mut Piece) -> bool {
        if self.stops.is_empty() {
            piece.text.push_str(new);
            return false;
        }
        let check = self.stops.push(new);
        piece.text.push_str(&check.text);
        check.stopped
    }

    /// Flushes held-back text at the end; `true` when a stop sequence ended it after all.
    fn finish(&mut self, piece: &mut Piece) -> Result<bool, ApiError> {
        let rest = self.text.finish().map_err(|e| ApiError::Internal(e.to_string()))?;
        if self.release(&rest, piece) {
            return Ok(true);
        }
        piece.text.push_str(&self.stops.finish());
        Ok(false)
    }
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

/// How the next backend event left the generation.
enum Progress {
    /// More may come.
    Going,
    Done(Finish),
}

impl Admitted {
    /// Waits for the next event and folds it into `piece`.
    async fn advance(&mut self, out: &mut Output<'_>, piece: &mut Piece, last: &mut Option<Instant>) -> Result<Progress, ApiError> {
        match self.tokens.next().await {
            Some(StreamEvent::Token(s)) => {
                let now = Instant::now();
                match last.replace(now) {
                    None => self.st.metrics.time_to_first_token(now - self.arrived),
                    Some(prev) => self.st.metrics.inter_token_latency(now - prev),
                }
                self.st.metrics.generated_token();
                Ok(if out.push(&s, piece)? { Progress::Done(Finish::Stop) } else { Progress::Going })
            }
            Some(StreamEvent::Finished(f)) => {
                let f = if out.finish(piece)? { Finish::Stop } else { f };
                Ok(Progress::Done(f))
            }
            Some(StreamEvent::Failed(e)) => Err(ApiError::Internal(e)),
            None => Err(ApiError::Internal("the backend ended the stream without finishing it".into())),
        }
    }
}

async fn whole_response(mut a: Admitted) -> Result<Response, ApiError> {
    let st = a.st.clone();
    let tokenizer = st.backend.tokenizer();
    let mut out = Output::new(tokenizer, &a.req.stop, a.req.logprobs.is_some());
    let mut piece = Piece::default();
    let mut last = None;
    let finish = loop {
        if let Progress::Done(f) = a.advance(&mut out, &mut piece, &mut last).await? {
            break f;
        }
    };
    let usage = Usage::new(a.prompt_len, out.completion_tokens);
    let model = a.req.model.clone();
    let reason = finish_reason(finish);
    Ok(match a.endpoint {
        Endpoint::Chat => Json(openai::ChatCompletion {
            id: a.id,
            object: "chat.completion",
            created: a.created,
            model,
            choices: vec![openai::ChatChoice {
                index: 0,
                message: openai::AssistantMessage { role: "assistant", content: piece.text },
                logprobs: a.req.logprobs.map(|_| openai::ChatLogprobs { content: piece.logprobs }),
                finish_reason: reason,
            }],
            usage,
        })
        .into_response(),
        Endpoint::Completions => Json(openai::Completion {
            id: a.id,
            object: "text_completion",
            created: a.created,
            model,
            choices: vec![openai::CompletionChoice {
                index: 0,
                text: piece.text,
                logprobs: a.req.logprobs.map(|_| legacy_logprobs(piece.logprobs, piece.offsets)),
                finish_reason: Some(reason),
            }],
            usage: Some(Some(usage)),
        })
        .into_response(),
    })
}

fn legacy_logprobs(lps: Vec<openai::TokenLogprob>, offsets: Vec<usize>) -> openai::CompletionLogprobs {
    let mut out = openai::CompletionLogprobs { text_offset: offsets, ..Default::default() };
    for lp in lps {
        out.top_logprobs.push(lp.top_logprobs.into_iter().map(|t| (t.token, t.logprob)).collect());
        out.tokens.push(lp.token);
        out.token_logprobs.push(lp.logprob);
    }
    out
}

/// One SSE event: `data: <json>\n\n`.
fn sse(value: &impl Serialize) -> Bytes {
    let mut buf = b"data: ".to_vec();
    // Serializing our own plain structs cannot fail; an empty object keeps the frame valid if it did.
    serde_json::to_writer(&mut buf, value).unwrap_or_else(|_| buf.extend_from_slice(b"{}"));
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

impl Admitted {
    /// The chunk carrying `piece` (or the final one, with `finish`).
    fn chunk(&self, piece: Piece, finish: Option<Finish>, first: bool) -> Bytes {
        let usage = self.req.include_usage.then_some(None);
        let reason = finish.map(finish_reason);
        match self.endpoint {
            Endpoint::Chat => sse(&openai::ChatChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.req.model.clone(),
                choices: vec![openai::ChunkChoice {
                    index: 0,
                    delta: openai::Delta {
                        role: first.then_some("assistant"),
                        content: (first || !piece.text.is_empty()).then_some(piece.text),
                    },
                    logprobs: self.req.logprobs.map(|_| openai::ChatLogprobs { content: piece.logprobs }),
                    finish_reason: reason,
                }],
                usage,
            }),
            Endpoint::Completions => sse(&openai::Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.req.model.clone(),
                choices: vec![openai::CompletionChoice {
                    index: 0,
                    text: piece.text,
                    logprobs: self.req.logprobs.map(|_| legacy_logprobs(piece.logprobs, piece.offsets)),
                    finish_reason: reason,
                }],
                usage,
            }),
        }
    }

    /// The usage-only chunk `include_usage` asks for: no choices.
    fn usage_chunk(&self, usage: Usage) -> Bytes {
        let (id, created, model) = (self.id.clone(), self.created, self.req.model.clone());
        match self.endpoint {
            Endpoint::Chat => sse(&openai::ChatChunk {
                id,
                object: "chat.completion.chunk",
                created,
                model,
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
            Endpoint::Completions => sse(&openai::Completion {
                id,
                object: "text_completion",
                created,
                model,
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
        }
    }
}

/// The SSE response. Dropping the body (client gone) drops the token stream, which cancels the
/// generation and frees its KV cache.
fn stream_response(mut a: Admitted) -> Response {
    let body = async_stream::stream! {
        let st = a.st.clone();
        let mut out = Output::new(st.backend.tokenizer(), &a.req.stop, a.req.logprobs.is_some());
        let mut last = None;
        if a.endpoint == Endpoint::Chat {
            yield Ok::<_, Infallible>(a.chunk(Piece::default(), None, true));
        }
        loop {
            let mut piece = Piece::default();
            match a.advance(&mut out, &mut piece, &mut last).await {
                Ok(Progress::Going) => {
                    if !piece.text.is_empty() || !piece.logprobs.is_empty() {
                        yield Ok(a.chunk(piece, None, false));
                    }
                }
                Ok(Progress::Done(f)) => {
                    if !piece.text.is_empty() || !piece.logprobs.is_empty() {
                        yield Ok(a.chunk(piece, None, false));
                    }
                    yield Ok(a.chunk(Piece::default(), Some(f), false));
                    if a.req.include_usage {
                        yield Ok(a.usage_chunk(Usage::new(a.prompt_len, out.completion_tokens)));
                    }
                    break;
                }
                Err(e) => {
                    #[derive(Serialize)]
                    struct ErrorEvent<'a> { error: crate::errors::ErrorObject<'a> }
                    yield Ok(sse(&ErrorEvent { error: e.object() }));
                    break;
                }
            }
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| ApiError::Internal(e.to_string()).into_response())
}
