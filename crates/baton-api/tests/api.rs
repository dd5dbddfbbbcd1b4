//! The HTTP API over the real SmolLM2 model on an ephemeral loopback port: responses, errors,
//! the SSE byte format, cancellation on disconnect, and concurrent streams.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_api::backend::{Backend, BackendStats, GenerationRequest, SubmitError, TokenStream};
use baton_api::local::LocalOptions;
use baton_api::ApiConfig;
use baton_model::tokenizer::Tokenizer;
use common::*;
use serde_json::json;
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_and_completions_with_the_real_model() {
    let backend = backend();
    let srv = serve(backend.clone(), ApiConfig::default()).await;
    let r = post(srv.addr, "/v1/chat/completions", &chat_body("What is the capital of France?", json!({"max_tokens": 16}))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL_ID);
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "{content:?}");
    let usage = &v["usage"];
    assert_eq!(usage["total_tokens"], usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap());

    // Usage counts are the tokenizer's: the prompt as /tokenize renders it, the completion as
    // generated (a `length` finish generated exactly max_tokens).
    let tok = post(srv.addr, "/tokenize", &json!({"messages": [{"role": "user", "content": "What is the capital of France?"}]})).await.json();
    assert_eq!(usage["prompt_tokens"], tok["count"]);

    let prompt = "The capital of France is";
    let ids = backend.tokenizer().encode(prompt, true).unwrap();
    let r = post(srv.addr, "/v1/completions", &json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 2})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect::<String>(), text);

    // Token-id prompts give the same text.
    let r = post(srv.addr, "/v1/completions", &json!({"model": MODEL_ID, "prompt": ids, "max_tokens": 5, "temperature": 0})).await.json();
    assert_eq!(r["choices"][0]["text"], text);

    let models = http(srv.addr, "GET", "/v1/models", &[], b"").await.json();
    assert_eq!(models["data"][0]["id"], MODEL_ID);
    assert_eq!(http(srv.addr, "GET", "/health", &[], b"").await.status, 200);
    assert_eq!(http(srv.addr, "GET", "/ready", &[], b"").await.status, 200);
    let doc = http(srv.addr, "GET", "/openapi.json", &[], b"").await.json();
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/v1/chat/completions"]["post"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_sequences_are_never_emitted() {
    let srv = serve(backend(), ApiConfig::default()).await;
    let body = json!({"model": MODEL_ID, "prompt": "Count: 1, 2, 3,", "max_tokens": 24, "temperature": 0});
    let full = post(srv.addr, "/v1/completions", &body).await.json()["choices"][0]["text"].as_str().unwrap().to_owned();
    // A stop string that spans token boundaries, taken from the middle of the greedy text.
    let at = full.find(" 6,").unwrap_or_else(|| panic!("unexpected continuation {full:?}"));
    for stream in [false, true] {
        let mut b = body.clone();
        b["stop"] = json!(["never-there", " 6, 7"]);
        b["stream"] = json!(stream);
        let r = post(srv.addr, "/v1/completions", &b).await;
        assert_eq!(r.status, 200);
        let (text, reason) = if stream {
            let events = sse_events(&r.body);
            let text: String = events.iter().map(|e| e["choices"][0]["text"].as_str().unwrap()).collect();
            (text, events.last().unwrap()["choices"][0]["finish_reason"].clone())
        } else {
            let v = r.json();
            (v["choices"][0]["text"].as_str().unwrap().to_owned(), v["choices"][0]["finish_reason"].clone())
        };
        assert_eq!(text, full[..at], "stream={stream}");
        assert_eq!(reason, "stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_bytes() {
    let srv = serve(backend(), ApiConfig::default()).await;
    let body = chat_body("Say hello.", json!({"max_tokens": 8, "stream": true, "stream_options": {"include_usage": true}}));
    let r = post(srv.addr, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let raw = r.text();
    assert!(raw.starts_with("data: {\"id\":\"chatcmpl-"), "{raw:?}");
    let events = sse_events(&r.body);
    // role first, then content deltas, a finish chunk, and the usage chunk with no choices.
    assert_eq!(events[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let n = events.len();
    assert_eq!(events[n - 2]["choices"][0]["finish_reason"], "length");
    assert_eq!(events[n - 1]["choices"], json!([]));
    assert_eq!(events[n - 1]["usage"]["completion_tokens"], 8);
    for e in &events[..n - 1] {
        assert_eq!(e["object"], "chat.completion.chunk");
        assert!(e["usage"].is_null() && e.get("usage").is_some(), "usage must be null before the last chunk: {e}");
        assert_eq!(e["id"], events[0]["id"]);
    }
    let streamed: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    plain.as_object_mut().unwrap().remove("stream_options");
    let whole = post(srv.addr, "/v1/chat/completions", &plain).await.json();
    assert_eq!(streamed, whole["choices"][0]["message"]["content"].as_str().unwrap());
}

fn error_of(r: &Resp) -> serde_json::Value {
    let v = r.json();
    let e = v["error"].clone();
    assert!(e["message"].is_string() && e["type"].is_string(), "{v}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors() {
    let backend = backend();
    let cfg = ApiConfig { body_limit: 4096, ..ApiConfig::default() };
    let srv = serve(backend.clone(), cfg).await;
    let a = srv.addr;

    let r = http(a, "POST", "/v1/chat/completions", &[], b"{\"model\": ").await;
    assert_eq!(r.status, 400);
    assert!(error_of(&r)["message"].as_str().unwrap().contains("not valid JSON"));

    for (extra, param) in [
        (json!({"temperature": 5}), "temperature"),
        (json!({"n": 3}), "n"),
        (json!({"tools": [{"type": "function", "function": {"name": "f"}}]}), "tools"),
        (json!({"response_format": {"type": "json_object"}}), "response_format"),
        (json!({"max_tokens": "many"}), "max_tokens"),
    ] {
        let r = post(a, "/v1/chat/completions", &chat_body("hi", extra.clone())).await;
        assert_eq!(r.status, 400, "{extra}");
        assert_eq!(error_of(&r)["param"], param, "{extra}");
    }

    let ctx = backend.context_length();
    let r = post(a, "/v1/chat/completions", &chat_body("hi", json!({"max_tokens": ctx - 1}))).await;
    assert_eq!(r.status, 400);
    let e = error_of(&r);
    assert_eq!(e["code"], "context_length_exceeded");
    let m = e["message"].as_str().unwrap();
    assert!(m.contains(&format!("maximum context length is {ctx} tokens")) && m.contains(&format!("{} for the completion", ctx - 1)), "{m}");

    let r = post(a, "/v1/chat/completions", &json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(r.status, 404);
    assert_eq!(error_of(&r)["code"], "model_not_found");
    assert_eq!(http(a, "GET", "/v1/nothing", &[], b"").await.status, 404);
    assert_eq!(http(a, "GET", "/v1/models/gpt-4", &[], b"").await.status, 404);

    let big = chat_body(&"x".repeat(5000), json!({}));
    let r = post(a, "/v1/chat/completions", &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(error_of(&r)["code"], "request_too_large");

    // Requests by status are counted.
    let m = http(a, "GET", "/metrics", &[], b"").await.text();
    assert_eq!(metric(&m, "baton_api_requests_total{endpoint=\"/v1/chat/completions\",status=\"413\"}"), Some(1.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys() {
    let open = serve(backend(), ApiConfig::default()).await;
    assert_eq!(http(open.addr, "GET", "/v1/models", &[], b"").await.status, 200);
    let srv = serve(backend(), ApiConfig { api_keys: vec!["k-1".into(), "k-2".into()], ..ApiConfig::default() }).await;
    let r = http(srv.addr, "GET", "/v1/models", &[], b"").await;
    assert_eq!(r.status, 401);
    assert_eq!(error_of(&r)["code"], "invalid_api_key");
    assert_eq!(http(srv.addr, "GET", "/v1/models", &[("Authorization", "Bearer nope")], b"").await.status, 401);
    assert_eq!(http(srv.addr, "GET", "/v1/models", &[("Authorization", "Bearer k-2")], b"").await.status, 200);
    let body = chat_body("hi", json!({"max_tokens": 2})).to_string();
    assert_eq!(http(srv.addr, "POST", "/v1/chat/completions", &[], body.as_bytes()).await.status, 401);
    assert_eq!(http(srv.addr, "POST", "/v1/chat/completions", &[("Authorization", "Bearer k-1")], body.as_bytes()).await.status, 200);
    // Probes stay open.
    assert_eq!(http(srv.addr, "GET", "/health", &[], b"").await.status, 200);
}

/// The real backend, reporting itself not ready: what a cluster that lost a stage does.
struct Unready(Arc<baton_api::local::LocalBackend>);

impl Backend for Unready {
    fn model_id(&self) -> &str {
        self.0.model_id()
    }
    fn context_length(&self) -> usize {
        self.0.context_length()
    }
    fn readiness(&self) -> Result<(), String> {
        Err("stage 1 is down".into())
    }
    fn tokenizer(&self) -> &Tokenizer {
        self.0.tokenizer()
    }
    fn submit(&self, _req: GenerationRequest) -> Result<TokenStream, SubmitError> {
        Err(SubmitError::NotReady("stage 1 is down".into()))
    }
    fn stats(&self) -> BackendStats {
        self.0.stats()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_full_and_not_ready_say_when_to_retry() {
    let cfg = ApiConfig { retry_after: Duration::from_secs(3), ..ApiConfig::default() };
    let srv = serve(Arc::new(Unready(backend())), cfg.clone()).await;
    for r in [
        post(srv.addr, "/v1/chat/completions", &chat_body("hi", json!({}))).await,
        http(srv.addr, "GET", "/ready", &[], b"").await,
    ] {
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("3"));
        assert!(error_of(&r)["message"].as_str().unwrap().contains("stage 1 is down"));
    }

    // One admitted sequence at most: a second request while the first streams gets 429.
    let one = load(LocalOptions { max_queued: 1, ..LocalOptions::default() });
    let srv = serve(one, cfg).await;
    let mut first = open(srv.addr, "/v1/completions", &json!({"model": MODEL_ID, "prompt": "1, 2, 3,", "max_tokens": 4000, "temperature": 0, "stream": true})).await;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(LIMIT, first.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    let r = post(srv.addr, "/v1/completions", &json!({"model": MODEL_ID, "prompt": "hi", "max_tokens": 1})).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("3"));
    assert_eq!(error_of(&r)["code"], "rate_limit_exceeded");
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    http(addr, "GET", "/metrics", &[], b"").await.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_cancels_and_frees_kv() {
    // Its own backend, so other tests' sequences do not show in its figures.
    let srv = serve(load(LocalOptions::default()), ApiConfig::default()).await;
    let mut s = open(srv.addr, "/v1/completions", &json!({"model": MODEL_ID, "prompt": "1, 2, 3,", "max_tokens": 4000, "temperature": 0, "stream": true})).await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(6).filter(|w| w == b"data: ").count() < 4 {
        let n = tokio::time::timeout(LIMIT, s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let m = scrape(srv.addr).await;
    assert_eq!(metric(&m, "baton_in_flight_sequences"), Some(1.0), "{m}");
    assert!(metric(&m, "baton_kv_cache_bytes").unwrap() > 0.0, "{m}");
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = scrape(srv.addr).await;
        if metric(&m, "baton_in_flight_sequences") == Some(0.0) && metric(&m, "baton_kv_cache_bytes") == Some(0.0) {
            let generated = metric(&m, "baton_api_generated_tokens_total").unwrap();
            assert!(generated < 1000.0, "the generation ran on after the disconnect: {generated} tokens");
            break;
        }
        assert!(Instant::now() < deadline, "KV not freed after the disconnect: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_streams_equal_their_solo_text() {
    let srv = serve(backend(), ApiConfig::default()).await;
    let prompts: Vec<String> = (0..16).map(|i| format!("Write one sentence about the number {i}.")).collect();
    let body = |p: &str, stream: bool| chat_body(p, json!({"max_tokens": 8, "stream": stream}));
    let mut solo = Vec::new();
    for p in &prompts {
        let v = post(srv.addr, "/v1/chat/completions", &body(p, false)).await.json();
        solo.push(v["choices"][0]["message"]["content"].as_str().unwrap().to_owned());
    }
    let addr = srv.addr;
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let b = body(p, true);
            tokio::spawn(async move {
                let r = post(addr, "/v1/chat/completions", &b).await;
                assert_eq!(r.status, 200);
                sse_events(&r.body).iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str().map(str::to_owned)).collect::<String>()
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), solo[i], "stream {i}");
    }
}
