//! `baton bench serve`: a load generator against a running OpenAI-compatible API (`baton serve`,
//! `baton head`, or any other server). N clients stream completions of fixed prompt and output
//! lengths until a request count or a time cap is reached; the report gives aggregate and
//! per-stream decode speed, time to first token and inter-token latency. With
//! `--long-prompt-tokens`, each client count runs a second time with one long prompt arriving
//! mid-run, to show what a long prefill does to the other streams.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

#[derive(clap::Args)]
pub struct BenchServeArgs {
    /// Base URL of the API (http only).
    #[arg(long, default_value = "http://127.0.0.1:8421")]
    url: String,
    /// API key, sent as `Authorization: Bearer`; default: $BATON_API_KEY.
    #[arg(long, env = "BATON_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Model id; default: the first one /v1/models lists.
    #[arg(long)]
    model: Option<String>,
    /// Concurrent clients; a list runs once per value.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    clients: Vec<usize>,
    /// Requests per run; default: one per client, at least 4.
    #[arg(long)]
    requests: Option<usize>,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    output_tokens: usize,
    /// Length of the long prompt sent once mid-run in a second run per client count; 0: no such
    /// runs.
    #[arg(long, default_value_t = 2048)]
    long_prompt_tokens: usize,
    /// Client counts that get the run with the long prompt; default: every count of --clients.
    #[arg(long, value_delimiter = ',')]
    long_prompt_clients: Option<Vec<usize>>,
    /// A run stops starting requests after this many seconds (those started finish).
    #[arg(long, default_value_t = 300)]
    time_cap_s: u64,
    /// Seconds one request may take before it counts as failed.
    #[arg(long, default_value_t = 600)]
    request_timeout_s: u64,
    /// One JSON record per run instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Record {
    clients: usize,
    requests: usize,
    aggregate_tok_s: f64,
    per_stream_tok_s: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    itl_p50_ms: f64,
    itl_p99_ms: f64,
    long_prompt: bool,
    /// Time to first token of the long prompt itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    long_prompt_ttft_ms: Option<f64>,
    failed: usize,
    wall_s: f64,
}

/// What one streamed request measured.
struct Sample {
    ttft: Duration,
    /// Gaps between consecutive content chunks.
    gaps: Vec<Duration>,
    tokens: usize,
    /// From the first content chunk to the last.
    decode: Duration,
}

struct Target {
    addr: SocketAddr,
    host: String,
    key: Option<String>,
}

impl Target {
    fn parse(url: &str, key: Option<String>) -> Result<Self> {
        let rest = url.strip_prefix("http://").context("--url must start with http://")?;
        let host = rest.trim_end_matches('/').to_string();
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&host).with_context(|| format!("resolving {host}"))?.next().with_context(|| format!("{host} resolves to no address"))?;
        Ok(Self { addr, host, key })
    }

    /// Sends a request and returns the connection positioned at the start of the body, after
    /// checking the status.
    async fn open(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Response> {
        let mut s = TcpStream::connect(self.addr).await.with_context(|| format!("connecting to {}", self.addr))?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let auth = self.key.as_ref().map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        let mut r = Response { stream: s, buf: Vec::new(), chunked: false, state: Chunk::Size, done: false };
        let end = loop {
            if let Some(i) = r.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if !r.fill().await? {
                bail!("{path}: the connection closed before a response");
            }
        };
        let head = String::from_utf8_lossy(&r.buf[..end]).to_ascii_lowercase();
        r.buf.drain(..end + 4);
        r.chunked = head.contains("transfer-encoding: chunked");
        let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).context("no HTTP status")?;
        if status != 200 {
            let body = r.read_all().await.unwrap_or_default();
            bail!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(r)
    }

    async fn get_json(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let body = self.open(method, path, body).await?.read_all().await?;
        Ok(serde_json::from_slice(&body)?)
    }
}

/// A response body read as it arrives, de-chunked.
struct Response {
    stream: TcpStream,
    buf: Vec<u8>,
    chunked: bool,
    state: Chunk,
    done: bool,
}

/// Where a chunked body is: at a size line, inside a chunk (bytes left), or at a chunk's CRLF.
enum Chunk {
    Size,
    Data(usize),
    End,
}

impl Response {
    async fn fill(&mut self) -> Result<bool> {
        let mut tmp = [0u8; 8192];
        let n = self.stream.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n > 0)
    }

    /// The next body bytes; `None` at the end.
    async fn next(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if self.done {
                return Ok(None);
            }
            if !self.chunked {
                if !self.buf.is_empty() {
                    return Ok(Some(std::mem::take(&mut self.buf)));
                }
            } else {
                match self.state {
                    Chunk::Data(left) if !self.buf.is_empty() => {
                        let n = left.min(self.buf.len());
                        self.state = if n == left { Chunk::End } else { Chunk::Data(left - n) };
                        return Ok(Some(self.buf.drain(..n).collect()));
                    }
                    Chunk::End if self.buf.len() >= 2 => {
                        self.buf.drain(..2);
                        self.state = Chunk::Size;
                        continue;
                    }
                    Chunk::Size => {
                        if let Some(eol) = self.buf.windows(2).position(|w| w == b"\r\n") {
                            let line = String::from_utf8_lossy(&self.buf[..eol]).trim().to_string();
                            let size = usize::from_str_radix(line.split(';').next().unwrap_or(""), 16).with_context(|| format!("bad chunk size {line:?}"))?;
                            self.buf.drain(..eol + 2);
                            if size == 0 {
                                self.done = true;
                            } else {
                                self.state = Chunk::Data(size);
                            }
                            continue;
                        }
                    }
                    _ => {}
                }
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    async fn read_all(mut self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(b) = self.next().await? {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }
}

/// Streams one completion and times its chunks; `on_first` runs when its first text arrives.
async fn stream_one(t: &Target, model: &str, prompt: &[u32], max_tokens: usize, on_first: impl FnOnce()) -> Result<Sample> {
    let mut on_first = Some(on_first);
    let body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let sent = Instant::now();
    let mut r = t.open("POST", "/v1/completions", Some(&body)).await?;
    let mut pending = Vec::new();
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    let mut gaps = Vec::new();
    let mut tokens = None;
    while let Some(bytes) = r.next().await? {
        let now = Instant::now();
        pending.extend_from_slice(&bytes);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let Some(data) = text.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).with_context(|| format!("bad event {data:?}"))?;
            if let Some(e) = v.get("error") {
                bail!("stream error: {e}");
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = Some(n as usize);
            }
            if v["choices"][0]["text"].as_str().is_some_and(|s| !s.is_empty()) {
                if let Some(l) = last {
                    gaps.push(now - l);
                }
                first.get_or_insert(now);
                last = Some(now);
                if let Some(f) = on_first.take() {
                    f();
                }
            }
        }
    }
    let first = first.context("the stream carried no text")?;
    Ok(Sample {
        ttft: first - sent,
        gaps,
        tokens: tokens.context("the stream carried no usage")?,
        decode: last.unwrap_or(first) - first,
    })
}

/// `n` prompt token ids: a fixed code text, tokenized by the server, repeated and cut, behind a
/// per-request header so no two prompts are equal.
async fn prompt(t: &Target, model: &str, i: usize, n: usize) -> Result<Vec<u32>> {
    const TEXT: &str = "def merge_sort(items):\n    \"\"\"Sort a list by splitting it in halves and merging them.\"\"\"\n    if len(items) <= 1:\n        return items\n    mid = len(items) // 2\n    left = merge_sort(items[:mid])\n    right = merge_sort(items[mid:])\n    out = []\n    while left and right:\n        out.append(left.pop(0) if left[0] <= right[0] else right.pop(0))\n    return out + left + right\n\n";
    let ids = |v: &Value| -> Vec<u32> { v["tokens"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect()).unwrap_or_default() };
    let head = ids(&t.get_json("POST", "/tokenize", Some(&json!({"model": model, "prompt": format!("# request {i}\n")}))).await?);
    let body = ids(&t.get_json("POST", "/tokenize", Some(&json!({"model": model, "prompt": TEXT}))).await?);
    if body.is_empty() {
        bail!("/tokenize returned no tokens");
    }
    // Keep the header's BOS (if any) once; continue with the text's tokens without their BOS.
    let skip = usize::from(body.len() > 1 && head.first() == body.first());
    let mut out = head;
    while out.len() < n {
        out.extend_from_slice(&body[skip..]);
    }
    out.truncate(n);
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run_once(t: Arc<Target>, model: Arc<String>, args: &BenchServeArgs, clients: usize, long: bool) -> Result<Record> {
    let requests = args.requests.unwrap_or(clients.max(4));
    let mut prompts = Vec::with_capacity(requests);
    for i in 0..requests {
        prompts.push(prompt(&t, &model, i, args.prompt_tokens).await?);
    }
    let prompts = Arc::new(prompts);
    let long_prompt = if long { Some(prompt(&t, &model, usize::MAX, args.long_prompt_tokens).await?) } else { None };
    let next = Arc::new(AtomicUsize::new(0));
    // The long prompt arrives once half of the requests are decoding (their first token is out).
    let decoding = Arc::new(AtomicUsize::new(0));
    let halfway = Arc::new(Notify::new());
    let half = requests.div_ceil(2);
    let started = Instant::now();
    let cap = Duration::from_secs(args.time_cap_s);
    let timeout = Duration::from_secs(args.request_timeout_s);
    let output = args.output_tokens;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (t, model, prompts, next, halfway, decoding) = (t.clone(), model.clone(), prompts.clone(), next.clone(), halfway.clone(), decoding.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= prompts.len() || started.elapsed() > cap {
                    return out;
                }
                let started_decoding = || {
                    if decoding.fetch_add(1, Ordering::SeqCst) + 1 == half {
                        halfway.notify_one();
                    }
                };
                let r = tokio::time::timeout(timeout, stream_one(&t, &model, &prompts[i], output, started_decoding)).await;
                out.push(r.unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after {timeout:?}"))));
            }
        });
    }
    let long_task = long_prompt.map(|p| {
        let (t, model, halfway) = (t.clone(), model.clone(), halfway.clone());
        tokio::spawn(async move {
            halfway.notified().await;
            tokio::time::timeout(timeout, stream_one(&t, &model, &p, output, || {})).await.unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")))
        })
    });
    let mut samples = Vec::new();
    let mut failed = 0;
    while let Some(done) = tasks.join_next().await {
        for r in done? {
            match r {
                Ok(s) => samples.push(s),
                Err(e) => {
                    failed += 1;
                    eprintln!("request failed: {e:#}");
                }
            }
        }
    }
    // Should too few requests have started decoding (failures), the long prompt goes now.
    halfway.notify_one();
    let long_prompt_ttft_ms = match long_task {
        Some(task) => match task.await? {
            Ok(s) => {
                let ttft = ms(s.ttft);
                samples.push(s);
                Some(ttft)
            }
            Err(e) => {
                failed += 1;
                eprintln!("the long prompt failed: {e:#}");
                None
            }
        },
        None => None,
    };
    let wall = started.elapsed();
    // Latencies are the regular streams' (the long prompt's own first token is reported apart).
    let regular = if long_prompt_ttft_ms.is_some() { &samples[..samples.len() - 1] } else { &samples[..] };
    let mut ttft: Vec<f64> = regular.iter().map(|s| ms(s.ttft)).collect();
    let mut itl: Vec<f64> = regular.iter().flat_map(|s| s.gaps.iter().map(|&g| ms(g))).collect();
    ttft.sort_by(f64::total_cmp);
    itl.sort_by(f64::total_cmp);
    let per_stream: Vec<f64> = regular
        .iter()
        .filter(|s| s.tokens > 1 && !s.decode.is_zero())
        .map(|s| (s.tokens - 1) as f64 / s.decode.as_secs_f64())
        .collect();
    Ok(Record {
        clients,
        requests: samples.len(),
        aggregate_tok_s: samples.iter().map(|s| s.tokens).sum::<usize>() as f64 / wall.as_secs_f64(),
        per_stream_tok_s: per_stream.iter().sum::<f64>() / per_stream.len().max(1) as f64,
        ttft_p50_ms: percentile(&ttft, 50.0),
        ttft_p99_ms: percentile(&ttft, 99.0),
        itl_p50_ms: percentile(&itl, 50.0),
        itl_p99_ms: percentile(&itl, 99.0),
        long_prompt: long,
        long_prompt_ttft_ms,
        failed,
        wall_s: wall.as_secs_f64(),
    })
}

pub async fn run(args: BenchServeArgs) -> Result<()> {
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients needs counts of at least 1");
    }
    if args.prompt_tokens == 0 || args.output_tokens == 0 {
        bail!("--prompt-tokens and --output-tokens must be at least 1");
    }
    let t = Arc::new(Target::parse(&args.url, args.api_key.clone())?);
    let model = match &args.model {
        Some(m) => m.clone(),
        None => t.get_json("GET", "/v1/models", None).await?["data"][0]["id"].as_str().context("/v1/models lists no model")?.to_string(),
    };
    let model = Arc::new(model);
    if !args.json {
        println!("model {model}, prompt {} tokens, output {} tokens, long prompt {} tokens", args.prompt_tokens, args.output_tokens, args.long_prompt_tokens);
        println!("{:>7} {:>8} {:>5} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>6}", "clients", "requests", "long", "agg tok/s", "strm tok/s", "ttft p50", "ttft p99", "itl p50", "itl p99", "long ttft", "failed");
    }
    for &clients in &args.clients {
        for long in [false, true] {
            if long && (args.long_prompt_tokens == 0 || args.long_prompt_clients.as_ref().is_some_and(|c| !c.contains(&clients))) {
                continue;
            }
            let r = run_once(t.clone(), model.clone(), &args, clients, long).await?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let long_ttft = r.long_prompt_ttft_ms.map(|v| format!("{v:.0} ms")).unwrap_or_else(|| "-".into());
                println!(
                    "{:>7} {:>8} {:>5} {:>10.1} {:>10.1} {:>6.0} ms {:>6.0} ms {:>6.0} ms {:>6.0} ms {:>10} {:>6}",
                    r.clients, r.requests, if r.long_prompt { "yes" } else { "no" }, r.aggregate_tok_s, r.per_stream_tok_s, r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p50_ms, r.itl_p99_ms, long_ttft, r.failed
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
