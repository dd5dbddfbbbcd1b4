//! The head places layers with the memory-aware planner: a model that does not fit the nodes'
//! memory (here capped in cluster.toml) stops the head before any weight loads, with the
//! shortfall and every node's figures; with room, the plan shows in `baton status`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const BATON: &str = env!("CARGO_BIN_EXE_baton");

/// Runs `baton serve` with `toml` as cluster.toml and one one-token prompt, bounded in time.
fn serve(toml: &str, model: &PathBuf) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    std::fs::write(&config, toml).unwrap();
    let mut child = Command::new(BATON)
        .args([
            "serve",
            "--workers",
            "2",
            "--name",
            "headnode",
            "--prompt",
            "Hi",
            "--max-tokens",
            "1",
        ])
        .arg("--model")
        .arg(model)
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path())
        .env("BATON_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.success(), reader.join().unwrap())
}

#[test]
fn a_model_that_does_not_fit_gives_the_shortfall_per_node() {
    let model = common::smollm2();
    let toml = "memory_headroom = \"1M\"\n[nodes.headnode]\nmemory = \"20M\"\n[nodes.worker-0]\nmemory = \"20M\"\n[nodes.worker-1]\nmemory = \"20M\"\n";
    let (ok, err) = serve(toml, &model);
    assert!(!ok, "serve started a model that cannot fit:\n{err}");
    assert!(
        err.contains("does not fit") && err.contains("short by"),
        "no shortfall in:\n{err}"
    );
    for node in ["headnode", "worker-0", "worker-1"] {
        let line = err
            .lines()
            .find(|l| l.trim_start().starts_with(node))
            .unwrap_or_else(|| panic!("no line for {node} in:\n{err}"));
        assert!(line.contains("MiB"), "{node}'s line has no figures: {line}");
    }
    assert!(
        !err.contains("loaded"),
        "weights were loaded before the plan was checked:\n{err}"
    );
}

#[test]
fn the_planner_places_layers_by_memory() {
    let model = common::smollm2();
    // worker-0 (a middle stage) can hold a few layers only: fewer than an even split's 10.
    let toml = "memory_headroom = \"1M\"\n[kv]\ncontext_length = 256\nsequences = 1\n[nodes.worker-0]\nmemory = \"24M\"\n";
    let (ok, err) = serve(toml, &model);
    assert!(ok, "serve failed:\n{err}");
    let line = err
        .lines()
        .find(|l| l.contains("placement: planned over 3 stages"))
        .unwrap_or_else(|| panic!("no planned placement in:\n{err}"));
    eprintln!("{line}");
    let worker0 = err
        .lines()
        .find(|l| l.contains("worker-0: layers"))
        .unwrap_or_else(|| panic!("no load line for worker-0 in:\n{err}"));
    let range = worker0
        .split("layers ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let (a, b) = range.split_once("..").unwrap();
    let n: usize = b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap();
    assert!(
        (1..10).contains(&n),
        "worker-0 got {n} layers ({range}) with its 24 MiB"
    );
}

/// `baton plan --model published:NAME` plans DeepSeek-V3 671B from its published config: it fits
/// 8 × 64 GB and 4 × 192 GB with KV for 8k tokens × 4 sequences, not 4 × 64 GB.
#[test]
fn published_deepseek_v3_fits_eight_64_gb_nodes_not_four() {
    // No cluster.toml applies: a fresh HOME and no BATON_CONFIG.
    let home = tempfile::tempdir().unwrap();
    let plan = |nodes: &str| {
        let out = Command::new(BATON)
            .args(["plan", "--model", "published:deepseek-v3-671b-q4_k_m", "--context", "8192", "--sequences", "4"])
            .args(["--json", "--nodes", nodes])
            .env_remove("BATON_CONFIG")
            .env("HOME", home.path())
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let nodes = |n: usize, mem: &str| (0..n).map(|i| format!("m{i}:{mem}")).collect::<Vec<_>>().join(",");
    for (n, mem) in [(8, "64G"), (4, "192G")] {
        let (ok, out, err) = plan(&nodes(n, mem));
        assert!(ok, "{n} x {mem}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let stages = v["stages"].as_array().unwrap_or_else(|| panic!("no stages in {out}"));
        assert_eq!(stages.len(), n, "{n} x {mem}: {out}");
    }
    let (ok, out, err) = plan(&nodes(4, "64G"));
    assert!(!ok && err.contains("does not fit"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let short = &v["shortfall"];
    assert_eq!(short["nodes"].as_array().map(Vec::len), Some(4), "{out}");
    let (need, have) = (short["required_bytes"].as_u64().unwrap(), short["usable_bytes"].as_u64().unwrap());
    assert_eq!(short["shortfall_bytes"].as_u64(), Some(need - have), "{out}");
    assert!(need - have > 100 << 30, "4 x 64 GB falls far short of 671B at Q4_K_M: {out}");
}
