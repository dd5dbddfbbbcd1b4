//! The OpenAI API served by a real cluster: `baton serve --workers 2` (head + 2 worker processes on
//! loopback, f32 wire), driven over HTTP. Greedy streams under concurrency (different prompt
//! lengths, staggered arrivals, chunked prefill, several sequences per micro-batch) equal their
//! solo output; KV returns to its baseline on every stage; logprobs come through the chain; a full
//! queue answers 429; a client that disconnects frees its sequence everywhere; a stream goes on
//! through a worker's death and `/metrics` names the node that was lost; when no worker is left,
//! the stream ends with an error event and requests get 503 with the reason.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BATON: &str = env!("CARGO_BIN_EXE_baton");
/// Generous: on a loaded 2-core machine the head and both workers share the cores.
const LIMIT: Duration = Duration::from_secs(300);

/// A `baton serve` process serving the API on a free loopback port.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// The worker processes' pids, in worker order.
    workers: Vec<u32>,
    _state: tempfile::TempDir,
}

impl Server {
    /// `baton serve --workers 2 ...`, unless `extra` says how many.
    fn start(model: &PathBuf, extra: &[&str]) -> Server {
        let workers: &[&str] = if extra.contains(&"--workers") { &[] } else { &["--workers", "2"] };
        let state = tempfile::tempdir().unwrap();
        let mut child = Command::new(BATON)
            .args(["serve", "--wire-dtype", "f32", "--listen", "127.0.0.1:0", "--model-id", "smollm2"])
            .args(workers)
            .args(extra)
            .arg("--model")
            .arg(model)
            .arg("--state-dir")
            .arg(state.path())
            .env("BATON_LOG", "warn")
            .env_remove("BATON_API_KEYS")
            .env_remove("BATON_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx): (_, Receiver<String>) = channel();
        let (ptx, pids) = channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[serve] {line}");
                if let Some(url) = line.strip_prefix("BATON_API_READY http://") {
                    let _ = tx.send(url.to_string());
                }
                if let Some(rest) = line.strip_prefix("serve: worker-") {
                    let _ = ptx.send(rest.split_whitespace().nth(2).unwrap().parse::<u32>().unwrap());
                }
            }
        });
        let addr = rx.recv_timeout(LIMIT).expect("serve did not report its API address in time").parse().unwrap();
        // Both workers are up before the API is.
        let workers = pids.try_iter().collect();
        Server { child, addr, workers, _state: state }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one request (`Connection: close`) and returns the open stream, response unread.
fn send(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> TcpStream {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    s
}

/// Status and (de-chunked) body of a whole response.
fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Vec<u8>) {
    let mut raw = Vec::new();
    send(addr, method, path, body).read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let status = head[9..12].parse().unwrap();
    let body = &raw[split + 4..];
    let body = if head.contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_vec() };
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else { return out };
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Value {
    let (status, body) = request(addr, "POST", path, Some(body));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// What a streamed response sent until it has `n` server-sent events (raw bytes, head included).
fn read_events(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(6).filter(|w| w == b"data: ").count() < n {
        let got = s.read(&mut buf).unwrap();
        assert!(got > 0, "stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..got]);
    }
    seen
}

/// The text of a streamed completion.
fn sse_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|e| {
            let c = &e["choices"][0];
            c["text"].as_str().or(c["delta"]["content"].as_str()).map(str::to_owned)
        })
        .collect()
}

fn metrics(addr: SocketAddr) -> String {
    let (status, body) = request(addr, "GET", "/metrics", None);
    assert_eq!(status, 200);
    String::from_utf8(body).unwrap()
}

/// Every sample of `name` (any labels) as `(labels, value)`.
fn series(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k[name.len()..].to_string(), v.parse().unwrap())
        })
        .collect()
}

/// Waits until every stage reports `baseline` KV bytes again and no sequence is in flight.
fn wait_for_kv(addr: SocketAddr, baseline: &[(String, f64)]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics(addr);
        let kv = series(&m, "baton_stage_kv_cache_bytes");
        let in_flight = series(&m, "baton_in_flight_sequences");
        if kv == baseline && in_flight == [(String::new(), 0.0)] {
            return;
        }
        assert!(Instant::now() < deadline, "KV not back to {baseline:?}: {kv:?}, in flight {in_flight:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stage 0's forwards and the tokens generated so far.
fn batching_figures(addr: SocketAddr) -> (f64, f64) {
    let m = metrics(addr);
    let forwards = series(&m, "baton_stage_forwards_total").into_iter().find(|(l, _)| l.starts_with("{stage=\"0 ")).expect("stage 0's forwards").1;
    (forwards, series(&m, "baton_api_generated_tokens_total")[0].1)
}

fn completion(prompt: &str, stream: bool) -> Value {
    json!({"model": "smollm2", "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": stream})
}

#[test]
fn concurrent_streams_through_the_cluster_equal_their_solo_output() {
    let model = common::smollm2();
    // Chunks of 16 prompt tokens and micro-batches of up to 4 sequences: long prompts enter in
    // several chunks, mixed with other streams' decode steps.
    let srv = Server::start(&model, &["--prefill-chunk", "16", "--max-batch", "4"]);
    let addr = srv.addr;
    let baseline = series(&metrics(addr), "baton_stage_kv_cache_bytes");
    assert_eq!(baseline.len(), 3, "one KV figure per stage: {baseline:?}");

    // 8 prompts of 5 to about 90 tokens.
    let prompts: Vec<String> = (0..8)
        .map(|i| {
            let list: Vec<String> = (1..=1 + i * i * 2).map(|n| n.to_string()).collect();
            format!("Continue the list: {},", list.join(", "))
        })
        .collect();
    let solo: Vec<String> = prompts.iter().map(|p| post(addr, "/v1/completions", &completion(p, false))["choices"][0]["text"].as_str().unwrap().to_owned()).collect();
    wait_for_kv(addr, &baseline);

    // Staggered arrivals: two at once, then each next one once another stream has its first
    // token, so prefills land in the middle of other streams' decoding.
    let (first_tx, first_rx) = channel::<usize>();
    let mut streams = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        if i >= 2 {
            let started = first_rx.recv_timeout(LIMIT).expect("a stream's first token in time");
            assert!(started < i);
        }
        let (body, tx) = (completion(p, true), first_tx.clone());
        streams.push(std::thread::spawn(move || {
            let mut s = send(addr, "POST", "/v1/completions", Some(&body));
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            let mut told = false;
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                raw.extend_from_slice(&buf[..n]);
                if !told && raw.windows(6).filter(|w| w == b"\"text\"").count() > 0 {
                    let _ = tx.send(i);
                    told = true;
                }
            }
            let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            assert!(raw.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&raw));
            sse_text(&dechunk(&raw[split + 4..]))
        }));
    }
    for (i, t) in streams.into_iter().enumerate() {
        assert_eq!(t.join().unwrap(), solo[i], "stream {i} ({} prompt chars)", prompts[i].len());
    }
    wait_for_kv(addr, &baseline);

    // 16 concurrent chat streams, each equal to its text alone.
    let chat = |i: usize, stream: bool| {
        json!({"model": "smollm2", "messages": [{"role": "user", "content": format!("Write one sentence about the number {i}.")}],
               "max_tokens": 8, "temperature": 0, "stream": stream})
    };
    let solo: Vec<String> = (0..16).map(|i| post(addr, "/v1/chat/completions", &chat(i, false))["choices"][0]["message"]["content"].as_str().unwrap().to_owned()).collect();
    let before = batching_figures(addr);
    let streams: Vec<_> = (0..16)
        .map(|i| {
            let body = chat(i, true);
            std::thread::spawn(move || {
                let (status, body) = request(addr, "POST", "/v1/chat/completions", Some(&body));
                assert_eq!(status, 200);
                sse_text(&body)
            })
        })
        .collect();
    for (i, t) in streams.into_iter().enumerate() {
        assert_eq!(t.join().unwrap(), solo[i], "chat stream {i}");
    }
    // Micro-batches carried several sequences: stage 0 ran fewer forwards than tokens came out.
    let after = batching_figures(addr);
    let (forwards, generated) = (after.0 - before.0, after.1 - before.1);
    assert!(forwards < generated, "{forwards} stage-0 forwards for {generated} generated tokens");
    wait_for_kv(addr, &baseline);

    // Logprobs travel back with each token from the last stage.
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let v = post(addr, "/v1/chat/completions", &body);
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, v["usage"]["completion_tokens"].as_u64().unwrap());
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        // Greedy: the chosen token is the most likely one.
        assert_eq!(t["token"], top[0]["token"], "{t}");
        assert!((t["logprob"].as_f64().unwrap() - top[0]["logprob"].as_f64().unwrap()).abs() < 1e-6, "{t}");
        assert!(top[0]["logprob"].as_f64() >= top[2]["logprob"].as_f64() && t["logprob"].as_f64().unwrap() <= 0.0, "{t}");
    }

    // Per-stage forward time and per-link transport and RTT are exported.
    let m = metrics(addr);
    let forwards = series(&m, "baton_stage_forward_seconds_total");
    assert_eq!(forwards.len(), 3, "{m}");
    assert!(forwards.iter().all(|(_, v)| *v > 0.0), "{forwards:?}");
    assert_eq!(series(&m, "baton_link_rtt_seconds").len(), 3, "{m}");
}

#[test]
fn a_client_that_disconnects_frees_its_sequence_on_every_stage() {
    let model = common::smollm2();
    // One admitted request at most, so that the queue-full answer can be seen too.
    let srv = Server::start(&model, &["--max-queued", "1"]);
    let addr = srv.addr;
    let (status, _) = request(addr, "GET", "/ready", None);
    assert_eq!(status, 200);
    let baseline = series(&metrics(addr), "baton_stage_kv_cache_bytes");
    let body = json!({"model": "smollm2", "prompt": "1, 2, 3,", "max_tokens": 1000, "temperature": 0, "stream": true});
    let mut s = send(addr, "POST", "/v1/completions", Some(&body));
    read_events(&mut s, 4);
    // Every stage holds KV for it now (heartbeats report the workers' within a second).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kv = series(&metrics(addr), "baton_stage_kv_cache_bytes");
        if kv.len() == baseline.len() && kv.iter().zip(&baseline).all(|(now, base)| now.1 > base.1) {
            break;
        }
        assert!(Instant::now() < deadline, "KV not held on every stage: {kv:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The scheduler's queue is full: another request is turned away at once.
    let (status, body) = request(addr, "POST", "/v1/completions", Some(&json!({"model": "smollm2", "prompt": "hi", "max_tokens": 1})));
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["error"]["code"], "rate_limit_exceeded");
    drop(s);
    wait_for_kv(addr, &baseline);
    let generated = series(&metrics(addr), "baton_api_generated_tokens_total");
    assert!(generated[0].1 < 900.0, "the generation ran on after the disconnect: {generated:?}");
}

#[test]
fn a_stream_goes_on_through_a_worker_death_and_metrics_name_the_node() {
    let model = common::smollm2();
    let srv = Server::start(&model, &[]);
    let addr = srv.addr;
    assert_eq!(srv.workers.len(), 2, "worker pids from serve's stderr");
    let body = json!({"model": "smollm2", "prompt": "Once upon a time, in a small village,", "max_tokens": 40, "temperature": 0, "stream": true});
    let (status, solo) = request(addr, "POST", "/v1/completions", Some(&body));
    assert_eq!(status, 200);
    let up = metrics(addr);
    assert_eq!(series(&up, "baton_node_up").iter().filter(|(_, v)| *v == 1.0).count(), 3, "head + 2 workers up:\n{up}");

    let mut s = send(addr, "POST", "/v1/completions", Some(&body));
    let mut seen = read_events(&mut s, 4);
    assert_eq!(unsafe { libc::kill(srv.workers[0] as i32, libc::SIGKILL) }, 0);
    s.read_to_end(&mut seen).unwrap();
    let split = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let streamed = dechunk(&seen[split + 4..]);
    assert!(!String::from_utf8_lossy(&streamed).contains("\"error\""), "{}", String::from_utf8_lossy(&streamed));
    assert_eq!(sse_text(&streamed), sse_text(&solo), "the stream differs from the undisturbed one");

    let m = metrics(addr);
    let node = |name: &str, labels: &str| series(&m, name).into_iter().find(|(l, _)| l == labels).map(|(_, v)| v);
    assert_eq!(node("baton_node_up", "{node=\"worker-0\"}"), Some(0.0), "{m}");
    assert_eq!(node("baton_node_state", "{node=\"worker-0\",state=\"gone\"}"), Some(1.0), "{m}");
    assert_eq!(node("baton_node_state", "{node=\"worker-0\",state=\"serving\"}"), Some(0.0), "{m}");
    assert!(node("baton_node_losses_total", "{node=\"worker-0\"}") >= Some(1.0), "{m}");
    assert_eq!(node("baton_node_up", "{node=\"worker-1\"}"), Some(1.0), "{m}");
    // At least one each (a loaded machine may add a re-plan for late heartbeats: harmless).
    assert!(node("baton_cluster_replans_total", "") >= Some(1.0), "{m}");
    assert!(node("baton_resumed_sequences_total", "") >= Some(1.0), "{m}");
    let (status, _) = request(addr, "GET", "/ready", None);
    assert_eq!(status, 200, "the cluster serves on head + worker-1");
}

#[test]
fn when_the_model_no_longer_fits_the_stream_gets_an_error_event_and_requests_503() {
    let model = common::smollm2();
    let srv = Server::start(&model, &["--workers", "1"]);
    let addr = srv.addr;
    let body = json!({"model": "smollm2", "prompt": "1, 2, 3,", "max_tokens": 1000, "temperature": 0, "stream": true});
    let mut s = send(addr, "POST", "/v1/completions", Some(&body));
    let mut seen = read_events(&mut s, 4);
    assert_eq!(unsafe { libc::kill(srv.workers[0] as i32, libc::SIGKILL) }, 0);
    s.read_to_end(&mut seen).unwrap();
    let split = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let events = String::from_utf8_lossy(&dechunk(&seen[split + 4..])).into_owned();
    let error = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|e| e.get("error").cloned())
        .unwrap_or_else(|| panic!("no error event in:\n{events}"));
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("worker-0") && message.contains("no worker is left"), "{error}");

    let (status, body) = request(addr, "POST", "/v1/completions", Some(&json!({"model": "smollm2", "prompt": "hi", "max_tokens": 1})));
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("no worker is left"), "{body}");
    let (status, _) = request(addr, "GET", "/ready", None);
    assert_eq!(status, 503);
}
