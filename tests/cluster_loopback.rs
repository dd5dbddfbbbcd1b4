//! `baton serve` on loopback: head + worker processes give exactly the single-process greedy
//! tokens (f32 wire). What happens when a worker dies is tests/cluster_resume.rs.

mod common;

#[path = "common/serve.rs"]
mod serve;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serve::{Serve, BATON};

const MAX_TOKENS: usize = 12;
const PROMPTS: [&str; 5] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
];

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
    let mut serve = Serve::start(workers, model, &[]);
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
