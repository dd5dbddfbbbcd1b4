//! The `baton` binary's single-machine commands: generate, inspect and their errors.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

fn smollm2() -> PathBuf {
    let dir = std::env::var_os("BATON_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/baton/models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/fetch-models.sh", path.display());
    path
}

/// Runs `baton args...`, failing the test if it outlives `limit`.
fn baton(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn baton");
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("baton {args:?} ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn split_3_generates_the_same_text_as_split_1() {
    let model = smollm2();
    let model = model.to_str().unwrap();
    let run = |flag: &str, text: &str, split: &str| {
        let out = baton(
            &["generate", "--model", model, flag, text, "--max-tokens", "16", "--split", split, "--wire-dtype", "f32"],
            Duration::from_secs(300),
        );
        assert!(out.status.success(), "split {split}: {}", String::from_utf8_lossy(&out.stderr));
        let stats = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(stats.contains("prefill") && stats.contains("decode"), "stats line missing: {stats}");
        String::from_utf8(out.stdout).unwrap()
    };
    let raw = run("--prompt", "The capital of France is", "1");
    assert!(raw.starts_with(" Paris."), "greedy continuation was {raw:?}");
    assert_eq!(run("--prompt", "The capital of France is", "3"), raw);
    let chat = run("--chat", "What is the capital of France?", "1");
    assert_eq!(run("--chat", "What is the capital of France?", "3"), chat);
}

#[test]
fn inspect_prints_the_manifest_as_json() {
    let model = smollm2();
    let out = baton(&["inspect", "--model", model.to_str().unwrap(), "--json"], Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["architecture"], "llama");
    assert_eq!(m["n_layers"], 30);
    let layers: u64 = m["layer_bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).sum();
    let file = std::fs::metadata(&model).unwrap().len();
    // Tied embeddings: the head counts its own copy of the embedding matrix, so layers + head
    // is every tensor of the file once.
    let weights = layers + m["head_bytes"].as_u64().unwrap();
    assert!(weights < file && weights > file * 9 / 10, "weights {weights} vs file {file}");
    assert_eq!(m["kv_bytes_per_token"][0], 2 * 3 * 64 * 4);
}

#[test]
fn bad_inputs_fail_cleanly_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"not a model").unwrap();
    let missing = dir.path().join("missing.gguf");
    let model = smollm2();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["generate", "--model", missing.to_str().unwrap(), "--prompt", "hi"], "missing.gguf"),
        (vec!["generate", "--model", garbage.to_str().unwrap(), "--prompt", "hi"], "garbage.gguf"),
        (vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "hi", "--split", "31"], "cannot split 30 layers into 31"),
        (vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "hi", "--top-p", "1.5"], "top_p"),
        (vec!["inspect", "--model", missing.to_str().unwrap()], "missing.gguf"),
    ];
    for (args, needle) in cases {
        let out = baton(&args, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}
