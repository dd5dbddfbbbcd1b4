//! OpenAI request parsing and response bodies.
//!
//! Requests are read from a JSON value field by field rather than derived, so that every
//! refusal names the offending field (`messages[1].content[0].type`) and says what was expected.
//! Unknown fields are ignored (clients send vendor extras); fields we cannot honour yet (`n` other
//! than 1, tools, `response_format` other than text, `logit_bias`, ...) are refused, never ignored.

use std::collections::BTreeMap;

use baton_model::sampling::{SamplingParams, MAX_TOP_LOGPROBS};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::errors::ApiError;

/// Most stop sequences a request may give.
pub const MAX_STOP: usize = 16;
/// Longest stop sequence, in bytes: every generated token is searched for every stop sequence,
/// so their length is work per token that a client would otherwise choose freely.
pub const MAX_STOP_BYTES: usize = 1024;

/// One chat message, content flattened to text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What the model continues.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Rendered through the chat template.
    Chat(Vec<Message>),
    Text(String),
    Tokens(Vec<u32>),
}

/// Whether the request came to `/v1/chat/completions` or `/v1/completions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// A validated request of either endpoint.
#[derive(Debug, Clone)]
pub struct Request {
    pub model: String,
    pub prompt: Prompt,
    /// `max_tokens` or `max_completion_tokens`; `None` leaves it to the server.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `Some(k)`: report each token's logprob and `k` alternatives.
    pub logprobs: Option<usize>,
    pub user: Option<String>,
}

/// A JSON object read field by field; `null` counts as absent, as in OpenAI's API.
struct Fields<'a>(&'a Map<String, Value>);

fn invalid(field: &str, msg: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(field, format!("Invalid value for `{field}`: {msg}."))
}

impl<'a> Fields<'a> {
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn string(&self, k: &str) -> Result<Option<&'a str>, ApiError> {
        self.get(k).map(|v| v.as_str().ok_or_else(|| invalid(k, "expected a string"))).transpose()
    }

    fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        self.get(k).map(|v| v.as_bool().ok_or_else(|| invalid(k, "expected a boolean"))).transpose()
    }

    /// A number within `[lo, hi]`; `open_lo` excludes `lo`.
    fn number(&self, k: &str, lo: f64, hi: f64, open_lo: bool) -> Result<Option<f32>, ApiError> {
        let Some(v) = self.get(k) else { return Ok(None) };
        let x = v.as_f64().ok_or_else(|| invalid(k, "expected a number"))?;
        let below = if open_lo { x <= lo } else { x < lo };
        if below || x > hi || !x.is_finite() {
            let l = if open_lo { "(" } else { "[" };
            return Err(invalid(k, format_args!("{x} is outside {l}{lo}, {hi}]")));
        }
        Ok(Some(x as f32))
    }

    /// An integer within `[lo, hi]`.
    fn integer(&self, k: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.get(k) else { return Ok(None) };
        let x = v.as_i64().ok_or_else(|| invalid(k, "expected an integer"))?;
        if x < lo || x > hi {
            return Err(invalid(k, format_args!("{x} is outside [{lo}, {hi}]")));
        }
        Ok(Some(x))
    }

    /// Refuses a field we do not support whenever it is present and not its neutral value.
    fn refuse(&self, k: &str, neutral: impl Fn(&Value) -> bool, why: &str) -> Result<(), ApiError> {
        match self.get(k) {
            Some(v) if !neutral(v) => Err(ApiError::invalid(k, format!("`{k}` is not supported: {why}."))),
            _ => Ok(()),
        }
    }
}

fn is_empty_container(v: &Value) -> bool {
    match v {
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Parses and validates a request body for `endpoint`.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Request, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::Invalid {
        message: format!("The request body is not valid JSON: {e}."),
        param: None,
    })?;
    let Value::Object(map) = &value else {
        return Err(ApiError::Invalid { message: "The request body must be a JSON object.".into(), param: None });
    };
    let f = Fields(map);
    let model = f.string("model")?.ok_or_else(|| ApiError::invalid("model", "`model` is required."))?.to_owned();

    f.refuse("n", |v| v.as_i64() == Some(1), "only n = 1 is served")?;
    f.refuse("logit_bias", is_empty_container, "logit biases are not applied")?;
    let prompt = match endpoint {
        Endpoint::Chat => {
            for k in ["tools", "functions"] {
                f.refuse(k, is_empty_container, "tool calling is not served")?;
            }
            for k in ["tool_choice", "function_call"] {
                f.refuse(k, |v| v == "none", "tool calling is not served")?;
            }
            f.refuse(
                "response_format",
                |v| v.get("type").and_then(Value::as_str) == Some("text"),
                "only plain text responses are served",
            )?;
            f.refuse("audio", |_| false, "audio output is not served")?;
            f.refuse("modalities", |v| *v == serde_json::json!(["text"]), "only text is served")?;
            Prompt::Chat(parse_messages(f.get("messages"))?)
        }
        Endpoint::Completions => {
            f.refuse("best_of", |v| v.as_i64() == Some(1), "only best_of = 1 is served")?;
            f.refuse("echo", |v| *v == Value::Bool(false), "echoing the prompt is not served")?;
            f.refuse("suffix", |v| v == "", "insertion is not served")?;
            parse_prompt(f.get("prompt"))?
        }
    };

    let max_tokens = match (f.integer("max_tokens", 1, u32::MAX.into())?, f.integer("max_completion_tokens", 1, u32::MAX.into())?) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid("max_tokens", "`max_tokens` and `max_completion_tokens` differ; give one."))
        }
        (a, b) => a.or(b).map(|x| x as usize),
    };

    let mut sampling = SamplingParams {
        temperature: f.number("temperature", 0.0, 2.0, false)?.unwrap_or(1.0),
        top_p: f.number("top_p", 0.0, 1.0, true)?,
        // vLLM's clients send -1 (and some 0) for "off".
        top_k: f.integer("top_k", -1, u32::MAX.into())?.filter(|&k| k > 0).map(|k| k as usize),
        min_p: f.number("min_p", 0.0, 1.0, false)?,
        repetition_penalty: f.number("repetition_penalty", 0.0, 10.0, true)?.unwrap_or(1.0),
        presence_penalty: f.number("presence_penalty", -2.0, 2.0, false)?.unwrap_or(0.0),
        frequency_penalty: f.number("frequency_penalty", -2.0, 2.0, false)?.unwrap_or(0.0),
        ..SamplingParams::default()
    };
    // A seed is any 64-bit integer; negative ones keep their bits.
    if let Some(v) = f.get("seed") {
        sampling.seed = match (v.as_u64(), v.as_i64()) {
            (Some(u), _) => u,
            (None, Some(i)) => i as u64,
            _ => return Err(invalid("seed", "expected an integer")),
        };
    }

    let logprobs = match endpoint {
        Endpoint::Chat => {
            let top = f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS as i64)?;
            match (f.bool("logprobs")?.unwrap_or(false), top) {
                (true, top) => Some(top.unwrap_or(0) as usize),
                (false, Some(_)) => {
                    return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs` set to true."))
                }
                (false, None) => None,
            }
        }
        Endpoint::Completions => f.integer("logprobs", 0, MAX_TOP_LOGPROBS as i64)?.map(|k| k as usize),
    };
    sampling.top_logprobs = logprobs.unwrap_or(0);
    sampling.check().map_err(|e| ApiError::invalid(e.field, format!("Invalid value for `{}`: {}.", e.field, e.message)))?;

    let stop_string = |field: &str, v: &Value| match v.as_str() {
        Some(s) if s.len() > MAX_STOP_BYTES => Err(invalid(field, format_args!("a stop sequence is at most {MAX_STOP_BYTES} bytes"))),
        Some(s) => Ok(s.to_owned()),
        None => Err(invalid(field, "expected a string")),
    };
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(s @ Value::String(_)) => vec![stop_string("stop", s)?],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP {
                return Err(invalid("stop", format_args!("at most {MAX_STOP} stop sequences")));
            }
            items.iter().enumerate().map(|(i, s)| stop_string(&format!("stop[{i}]"), s)).collect::<Result<_, _>>()?
        }
        Some(_) => return Err(invalid("stop", "expected a string or an array of strings")),
    };

    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage").map_err(|_| invalid("stream_options.include_usage", "expected a boolean"))?.unwrap_or(false),
        Some(_) => return Err(invalid("stream_options", "expected an object")),
    };
    let user = f.string("user")?.map(str::to_owned);
    Ok(Request { model, prompt, max_tokens, sampling, stop, stream, include_usage, logprobs, user })
}

/// Parses a `/tokenize` body: `{"model"?, "prompt": string}` or `{"model"?, "messages": [...]}`
/// (rendered through the chat template, as a chat completion would be).
pub fn parse_tokenize(body: &[u8]) -> Result<(Option<String>, Prompt), ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::Invalid {
        message: format!("The request body is not valid JSON: {e}."),
        param: None,
    })?;
    let Value::Object(map) = &value else {
        return Err(ApiError::Invalid { message: "The request body must be a JSON object.".into(), param: None });
    };
    let f = Fields(map);
    let model = f.string("model")?.map(str::to_owned);
    let prompt = match (f.get("prompt"), f.get("messages")) {
        (Some(_), Some(_)) => return Err(ApiError::invalid("prompt", "Give `prompt` or `messages`, not both.")),
        (None, Some(m)) => Prompt::Chat(parse_messages(Some(m))?),
        (Some(Value::String(s)), None) => Prompt::Text(s.clone()),
        (Some(_), None) => return Err(invalid("prompt", "expected a string")),
        (None, None) => return Err(ApiError::invalid("prompt", "`prompt` or `messages` is required.")),
    };
    Ok((model, prompt))
}

#[derive(Debug, Clone, Serialize)]
pub struct Tokenized {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
}

fn parse_messages(v: Option<&Value>) -> Result<Vec<Message>, ApiError> {
    let Some(Value::Array(items)) = v else {
        return Err(ApiError::invalid("messages", "`messages` is required: an array of messages."));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must hold at least one message."));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(o) = m else { return Err(invalid(&format!("messages[{i}]"), "expected an object")) };
            let f = Fields(o);
            let role = match f.get("role").and_then(Value::as_str) {
                Some(r @ ("system" | "user" | "assistant")) => r,
                // OpenAI's newer name for the system role; templates know only `system`.
                Some("developer") => "system",
                Some(r @ ("tool" | "function")) => {
                    return Err(ApiError::invalid(format!("messages[{i}].role"), format!("`{r}` messages are not supported: tool calling is not served.")))
                }
                _ => return Err(invalid(&format!("messages[{i}].role"), "expected one of system, developer, user, assistant")),
            };
            f.refuse("tool_calls", is_empty_container, "tool calling is not served")
                .map_err(|_| ApiError::invalid(format!("messages[{i}].tool_calls"), "`tool_calls` are not supported: tool calling is not served."))?;
            let content = match f.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parse_parts(i, parts)?,
                _ => return Err(invalid(&format!("messages[{i}].content"), "expected a string or an array of text parts")),
            };
            Ok(Message { role: role.to_owned(), content })
        })
        .collect()
}

/// Text parts, joined as OpenAI joins them for text-only models: with newlines.
fn parse_parts(i: usize, parts: &[Value]) -> Result<String, ApiError> {
    let texts = parts
        .iter()
        .enumerate()
        .map(|(j, p)| {
            let field = format!("messages[{i}].content[{j}]");
            match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(t)) => Ok(t),
                (Some("text"), None) => Err(invalid(&format!("{field}.text"), "expected a string")),
                (Some(other), _) => Err(ApiError::invalid(
                    format!("{field}.type"),
                    format!("Content parts of type `{other}` are not supported; only `text` is served."),
                )),
                (None, _) => Err(invalid(&format!("{field}.type"), "expected `text`")),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(texts.join("\n"))
}

fn parse_prompt(v: Option<&Value>) -> Result<Prompt, ApiError> {
    let bad = || invalid("prompt", "expected a string, an array of one string, or an array of token ids");
    match v {
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Ok(Prompt::Text(a[0].as_str().unwrap_or_default().to_owned())),
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => a
            .iter()
            .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(bad))
            .collect::<Result<_, _>>()
            .map(Prompt::Tokens),
        Some(Value::Array(a)) if a.len() > 1 && a.iter().all(Value::is_string) => {
            Err(ApiError::invalid("prompt", "Several prompts in one request are not supported; send one per request."))
        }
        None => Err(ApiError::invalid("prompt", "`prompt` is required.")),
        Some(_) => Err(bad()),
    }
}

// ---- responses ----

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// A logprob as JSON can carry it: OpenAI reports impossible tokens as -9999.
pub fn finite(lp: f32) -> f32 {
    if lp.is_finite() { lp } else { -9999.0 }
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// Absent without `include_usage`; with it, `null` on every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// The legacy completions logprobs: parallel arrays per token.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// A whole completion (`usage` set) or one streamed chunk of one (`usage` as for [`ChatChunk`]).
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Extension (as vLLM): prompt plus completion tokens one request may hold.
    pub max_model_len: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(endpoint: Endpoint, body: &str) -> (Option<String>, String) {
        match parse(endpoint, body.as_bytes()) {
            Err(ApiError::Invalid { param, message }) => (param, message),
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn refusals_name_the_field() {
        let chat = |extra: &str| format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#);
        for (extra, field) in [
            (r#","temperature":3"#, "temperature"),
            (r#","top_p":0"#, "top_p"),
            (r#","n":2"#, "n"),
            (r#","tools":[{"type":"function"}]"#, "tools"),
            (r#","response_format":{"type":"json_object"}"#, "response_format"),
            (r#","stop":[1]"#, "stop[0]"),
            (r#","max_tokens":0"#, "max_tokens"),
            (r#","top_logprobs":3"#, "top_logprobs"),
            (r#","stream_options":{"include_usage":1}"#, "stream_options.include_usage"),
        ] {
            assert_eq!(err(Endpoint::Chat, &chat(extra)).0.as_deref(), Some(field), "{extra}");
        }
        let (param, _) = err(Endpoint::Chat, r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#);
        assert_eq!(param.as_deref(), Some("messages[0].content[0].type"));
        assert_eq!(err(Endpoint::Chat, "{").0, None);
        assert_eq!(err(Endpoint::Completions, r#"{"model":"m","prompt":["a","b"]}"#).0.as_deref(), Some("prompt"));
    }

    #[test]
    fn stop_sequences_are_bounded_in_count_and_length() {
        let chat = |stop: serde_json::Value| {
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": stop}).to_string()
        };
        let long = "x".repeat(MAX_STOP_BYTES + 1);
        assert_eq!(err(Endpoint::Chat, &chat(long.clone().into())).0.as_deref(), Some("stop"));
        assert_eq!(err(Endpoint::Chat, &chat(serde_json::json!(["a", long]))).0.as_deref(), Some("stop[1]"));
        assert_eq!(err(Endpoint::Chat, &chat(serde_json::json!(vec!["a"; MAX_STOP + 1]))).0.as_deref(), Some("stop"));
        let at_limit = "x".repeat(MAX_STOP_BYTES);
        let r = parse(Endpoint::Chat, chat(serde_json::json!(vec![at_limit.as_str(); MAX_STOP])).as_bytes()).unwrap();
        assert_eq!(r.stop.len(), MAX_STOP);
    }

    #[test]
    fn accepted_fields() {
        let r = parse(
            Endpoint::Chat,
            br#"{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                "n":1,"seed":-1,"stop":"x","max_completion_tokens":5,"logprobs":true,"top_logprobs":2,"top_k":-1,
                "response_format":{"type":"text"},"tools":[],"user":"u"}"#,
        )
        .unwrap();
        assert!(matches!(&r.prompt, Prompt::Chat(m) if m[0] == Message { role: "system".into(), content: "a\nb".into() }));
        assert_eq!((r.sampling.seed, r.max_tokens, r.logprobs, r.sampling.top_k), (u64::MAX, Some(5), Some(2), None));
        assert_eq!(r.stop, vec!["x"]);
        let r = parse(Endpoint::Completions, br#"{"model":"m","prompt":[1,2,3],"logprobs":1}"#).unwrap();
        assert!(matches!(r.prompt, Prompt::Tokens(ref t) if t == &[1, 2, 3]));
        assert_eq!(r.sampling.temperature, 1.0);
    }
}
