//! `baton serve` on loopback: head + worker processes give exactly the single-process greedy
//! tokens (f32 wire), and a worker killed mid-generation ends the request with a clear error
//! within 5 s while the head stays up. Skipped (with a message) when SmolLM2 is not fetched.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const BATON: &str = env!("CARGO_BIN_EXE_baton");
const MAX_TOKENS: usize = 12;
const PROMPTS: [&str; 5] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
];

/// A `baton serve --stdin` process: requests in, JSON lines out, stderr lines collected.
struct Serve {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Receiver<serde_json::Value>,
    err: Receiver<String>,
    _state: tempfile::TempDir,
}

impl Serve {
    fn start(workers: usize, model: &PathBuf) -> Serve {
        let state = tempfile::tempdir().unwrap();
        let mut child = Command::new(BATON)
            .args(["serve", "--stdin", "--wire-dtype", "f32", "--workers", &workers.to_string()])
            .arg("--model")
            .arg(model)
            .arg("--state-dir")
            .arg(state.path())
            .env("BATON_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (otx, out) = channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    let _ = otx.send(v);
                }
            }
        });
        let (etx, err) = channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[serve] {line}");
                let _ = etx.send(line);
            }
        });
        let stdin = child.stdin.take();
        Serve { child, stdin, out, err, _state: state }
    }

    fn send(&mut self, req: serde_json::Value) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{req}").unwrap();
        stdin.flush().unwrap();
    }

    fn next(&self, within: Duration) -> serde_json::Value {
        self.out.recv_timeout(within).expect("no output from serve in time")
    }

    /// Worker pids from the `serve: worker-N pid P ...` lines.
    fn worker_pids(&self, n: usize, within: Duration) -> Vec<u32> {
        let deadline = Instant::now() + within;
        let mut pids = Vec::new();
        while pids.len() < n {
            let line = self.err.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("worker pids in time");
            if let Some(rest) = line.strip_prefix("serve: worker-") {
                let pid = rest.split_whitespace().nth(2).unwrap().parse().unwrap();
                pids.push(pid);
            }
        }
        pids
    }

    /// Closes stdin and waits (bounded) for serve to exit.
    fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "serve did not exit after stdin closed");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn alive(pid: u32) -> bool {
    // /proc/<pid> of a reaped process disappears; a zombie's state is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

fn single_process(model: &PathBuf, prompt: &str) -> String {
    let out = Command::new(BATON)
        .args(["generate", "--split", "1", "--wire-dtype", "f32", "--max-tokens", &MAX_TOKENS.to_string(), "--prompt", prompt])
        .arg("--model")
        .arg(model)
        .env("BATON_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "generate failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

fn same_tokens_as_single_process(workers: usize, model: &PathBuf) {
    let expected: Vec<String> = PROMPTS.iter().map(|p| single_process(model, p)).collect();
    let mut serve = Serve::start(workers, model);
    serve.worker_pids(workers, Duration::from_secs(60));
    for p in PROMPTS {
        serve.send(serde_json::json!({"prompt": p, "max_tokens": MAX_TOKENS}));
    }
    let mut got = vec![String::new(); PROMPTS.len()];
    for _ in PROMPTS {
        // Generous: a loaded CI machine shares its cores between the head and every worker.
        let v = serve.next(Duration::from_secs(300));
        assert!(v.get("error").is_none(), "request failed: {v}");
        got[v["id"].as_u64().unwrap() as usize] = v["text"].as_str().unwrap().to_string();
    }
    for (i, p) in PROMPTS.iter().enumerate() {
        assert_eq!(got[i], expected[i], "prompt {p:?} with {workers} workers");
    }
    serve.finish();
}

#[test]
fn serve_two_workers_matches_single_process() {
    same_tokens_as_single_process(2, &common::smollm2());
}

#[test]
fn serve_three_workers_matches_single_process() {
    same_tokens_as_single_process(3, &common::smollm2());
}

/// DeepSeek-V3 (MLA latent cache, grouped routing, shared expert, a dense first layer) as the
/// tiny random fixture, Q8_0: its stages exchange hidden states like any other family's.
#[test]
fn serve_two_workers_matches_single_process_on_the_deepseek_fixture() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepseek_v3/model-q8_0.gguf");
    same_tokens_as_single_process(2, &model);
}

#[test]
fn killed_worker_ends_the_request_and_the_head_stays_up() {
    let model = common::smollm2();
    let mut serve = Serve::start(2, &model);
    let pids = serve.worker_pids(2, Duration::from_secs(60));
    serve.send(serde_json::json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 4000, "stream": true}));
    let first = serve.next(Duration::from_secs(120));
    assert!(first.get("token").is_some(), "expected a streamed token, got {first}");

    unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let end = loop {
        let v = serve.next(Duration::from_secs(10));
        if v.get("token").is_none() {
            break v;
        }
    };
    let took = killed.elapsed();
    let error = end["error"].as_str().unwrap_or_else(|| panic!("expected an error, got {end}"));
    assert!(took < Duration::from_secs(5), "the request ended {took:?} after the kill");
    assert!(error.contains("worker-0") && error.contains("gone"), "unclear error: {error}");

    // The head is still up and says why new requests cannot run.
    assert!(serve.child.try_wait().unwrap().is_none(), "the head exited");
    serve.send(serde_json::json!({"prompt": "Hello", "max_tokens": 4}));
    let next = serve.next(Duration::from_secs(10));
    assert!(next["error"].as_str().is_some_and(|e| e.contains("worker-0")), "got {next}");

    // `baton status` shows the node gone.
    let status = Command::new(BATON).args(["status", "--state-dir"]).arg(serve._state.path()).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "status failed: {}", String::from_utf8_lossy(&status.stderr));
    let line = text.lines().find(|l| l.starts_with("worker-0")).unwrap_or_else(|| panic!("no worker-0 in status:\n{text}"));
    assert!(line.contains("gone"), "status line: {line}");

    // Closing stdin ends serve, and its other worker with it.
    serve.finish();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pids[1]) {
        assert!(Instant::now() < deadline, "worker {} outlived serve", pids[1]);
        std::thread::sleep(Duration::from_millis(100));
    }
}
