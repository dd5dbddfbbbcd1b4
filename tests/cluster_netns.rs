//! A cluster across network namespaces: the test builds a switch (a bridge in a namespace of its
//! own), one namespace per host with a veth pair to the switch, runs three workers and a head in
//! them, and removes everything afterwards (also on failure). The head finds the workers by mDNS
//! alone, plans, loads (one worker has no model file and gets its tensors pushed) and generates
//! the single-process tokens; then the same with multicast off and static peers only.
//!
//! Needs root and `ip` (iproute2); without them it is skipped with a message. CI runs as root.

mod common;

#[path = "common/netns.rs"]
mod netns;
#[path = "common/worker.rs"]
mod worker;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netns::{can_run, start_worker, Net};
use worker::Worker;

/// A process in a namespace, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const BATON: &str = env!("CARGO_BIN_EXE_baton");
const PROMPT: &str = "Once upon a time, in a small village,";
const MAX_TOKENS: &str = "8";

/// The head in its namespace with `config`; (stdout, stderr), bounded in time.
fn run_head(net: &Net, dir: &Path, key: &Path, config: &Path, model: &Path) -> (String, String) {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.ns("head"),
            BATON,
            "head",
            "--min-workers",
            "3",
            "--wire-dtype",
            "f32",
            "--transport",
            "tcp",
            "--name",
            "head",
        ])
        .args(["--max-tokens", MAX_TOKENS, "--prompt", PROMPT])
        .arg("--model")
        .arg(model)
        .arg("--config")
        .arg(config)
        .arg("--key-file")
        .arg(key)
        .arg("--state-dir")
        .arg(dir.join("head"))
        .env("BATON_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let mut child = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the head did not finish within 300 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    eprintln!("{err}");
    assert!(status.success(), "the head failed:\n{err}");
    (out, err)
}

fn single_process(model: &Path) -> String {
    let out = Command::new(BATON)
        .args([
            "generate",
            "--split",
            "1",
            "--wire-dtype",
            "f32",
            "--max-tokens",
            MAX_TOKENS,
            "--prompt",
            PROMPT,
        ])
        .arg("--model")
        .arg(model)
        .env("BATON_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Lines of the head saying how it found each worker.
fn found(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.contains("found worker")).collect()
}

#[test]
fn workers_in_namespaces_by_mdns_then_by_static_peers() {
    if !can_run() {
        return;
    }
    let model = common::smollm2();
    let expected = single_process(&model);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    worker::write_key(&key, &[0x5a; 32]);
    let absent = dir.path().join("absent.gguf");
    let net = Net::build();

    // 1. mDNS only: no peers configured.
    let config = dir.path().join("mdns.toml");
    std::fs::write(
        &config,
        format!(
            "[discovery]\nbrowse_ms = 20000\n[nodes.worker-3]\nmodel_path = \"{}\"\n",
            absent.display()
        ),
    )
    .unwrap();
    {
        let _workers: Vec<Worker> = (1..=3)
            .map(|i| start_worker(&net, i, dir.path(), &key))
            .collect();
        let (out, err) = run_head(&net, dir.path(), &key, &config, &model);
        assert_eq!(
            out, expected,
            "tokens over mDNS-found workers differ from the single process"
        );
        let lines = found(&err);
        assert_eq!(lines.len(), 3, "expected three workers found:\n{err}");
        assert!(
            lines
                .iter()
                .all(|l| l.contains("Mdns") && !l.contains("Static")),
            "not found by mDNS alone: {lines:?}"
        );
        assert!(
            err.contains("planned over 4 stages"),
            "no planned placement:\n{err}"
        );
        assert!(
            err.lines()
                .any(|l| l.contains("worker-3: layers") && l.contains("pushed")),
            "worker-3 did not get its tensors pushed:\n{err}"
        );
    }

    // 2. Multicast unavailable; the workers are static peers.
    net.cut_multicast();
    let config = dir.path().join("static.toml");
    let peers: Vec<String> = (1..=3)
        .map(|i| format!("\"{}:8422\"", Net::addr(i)))
        .collect();
    std::fs::write(
        &config,
        format!(
            "peers = [{}]\n[discovery]\nbrowse_ms = 3000\n[nodes.worker-3]\nmodel_path = \"{}\"\n",
            peers.join(", "),
            absent.display()
        ),
    )
    .unwrap();
    let _workers: Vec<Worker> = (1..=3)
        .map(|i| start_worker(&net, i, dir.path(), &key))
        .collect();
    let (out, err) = run_head(&net, dir.path(), &key, &config, &model);
    assert_eq!(
        out, expected,
        "tokens over static peers differ from the single process"
    );
    let lines = found(&err);
    assert_eq!(lines.len(), 3, "expected three workers found:\n{err}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("Static") && !l.contains("Mdns")),
        "not found as static peers: {lines:?}"
    );
    // Its shard from the first run is in worker-3's cache now.
    assert!(
        err.lines()
            .any(|l| l.contains("worker-3: layers") && l.contains("cache")),
        "worker-3 did not load its cached shard:\n{err}"
    );
}
