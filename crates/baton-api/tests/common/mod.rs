//! Shared by the API tests: the real model, a server on an ephemeral loopback port, and a
//! minimal HTTP/1.1 client that shows the exact bytes (SSE framing included).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use baton_api::local::{LocalBackend, LocalOptions};
use baton_api::{ApiConfig, Backend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const MODEL_ID: &str = "smollm2";

/// Every request and wait in these tests is bounded by this.
pub const LIMIT: Duration = Duration::from_secs(300);

/// The real model fetched by `scripts/fetch-models.sh`; missing is a failure, not a skip.
pub fn model_path() -> PathBuf {
    let dir = std::env::var_os("BATON_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/baton/models"));
    let path = dir.join(SMOLLM2);
    assert!(path.exists(), "{} is missing: run scripts/fetch-models.sh", path.display());
    path
}

pub fn load(opts: LocalOptions) -> Arc<LocalBackend> {
    let b = LocalBackend::start(&model_path(), LocalOptions { model_id: Some(MODEL_ID.into()), ..opts })
        .expect("the model opens");
    b.wait_ready(LIMIT).expect("the model loads");
    Arc::new(b)
}

/// One backend per test binary: loading costs seconds.
pub fn backend() -> Arc<LocalBackend> {
    static B: OnceLock<Arc<LocalBackend>> = OnceLock::new();
    B.get_or_init(|| load(LocalOptions::default())).clone()
}

pub struct Server {
    pub addr: std::net::SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Serves `backend` on 127.0.0.1:0 until the returned handle is dropped.
pub async fn serve(backend: Arc<dyn Backend>, cfg: ApiConfig) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        baton_api::serve_on(listener, backend, cfg, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Server { addr, _stop: tx }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }
}

fn request_bytes(addr: std::net::SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends one request and reads the whole response, within [`LIMIT`].
pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    tokio::time::timeout(LIMIT, async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&request_bytes(addr, method, path, headers, body)).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        parse(&raw)
    })
    .await
    .unwrap_or_else(|_| panic!("{method} {path} took longer than {LIMIT:?}"))
}

pub async fn post(addr: std::net::SocketAddr, path: &str, body: &serde_json::Value) -> Resp {
    http(addr, "POST", path, &[], body.to_string().as_bytes()).await
}

/// Opens a request and returns the socket, for reading a stream piecemeal or dropping it.
pub async fn open(addr: std::net::SocketAddr, path: &str, body: &serde_json::Value) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&request_bytes(addr, "POST", path, &[], body.to_string().as_bytes())).await.unwrap();
    s
}

fn parse(raw: &[u8]) -> Resp {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete head");
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_vec() };
    Resp { status, headers, body }
}

/// The payload of a chunked body.
pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// The JSON events of an SSE body, checking the framing: only `data: <json>\n\n` events, the
/// last one `data: [DONE]\n\n`.
pub fn sse_events(body: &[u8]) -> Vec<serde_json::Value> {
    let text = std::str::from_utf8(body).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "stream does not end with [DONE]: {text:?}");
    let frames: Vec<&str> = text.strip_suffix("\n\n").unwrap().split("\n\n").collect();
    let (done, events) = frames.split_last().unwrap();
    assert_eq!(*done, "data: [DONE]");
    events
        .iter()
        .map(|f| {
            let json = f.strip_prefix("data: ").unwrap_or_else(|| panic!("bad SSE frame {f:?}"));
            assert!(!json.contains('\n'), "multi-line data frame {f:?}");
            serde_json::from_str(json).unwrap_or_else(|e| panic!("bad JSON in {f:?}: {e}"))
        })
        .collect()
}

/// A metric's value in a Prometheus exposition (the first series whose name and labels match).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

pub fn chat_body(content: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({"model": MODEL_ID, "messages": [{"role": "user", "content": content}], "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}
