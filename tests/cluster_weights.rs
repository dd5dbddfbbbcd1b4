//! Weights for a worker without the model file: the head pushes exactly that worker's tensors,
//! the cluster generates the single-process tokens, a push whose connection drops midway resumes
//! instead of restarting, and the next start loads the shard from the worker's cache.

mod common;

#[path = "common/worker.rs"]
mod worker;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use worker::Worker;

const BATON: &str = env!("CARGO_BIN_EXE_baton");
const PROMPT: &str = "The capital of France is";
const MAX_TOKENS: &str = "8";
/// The proxy cuts the first connection that carries more than this towards the worker: only a
/// weight push does.
const CUT_AFTER: u64 = 8 << 20;

fn start_worker(name: &str, state: &Path, key: &Path) -> Worker {
    let mut cmd = Worker::command(name, state, key);
    cmd.env("BATON_LOG", "info");
    Worker::start(cmd)
}

/// A TCP proxy to `target` that cuts the first connection carrying more than [`CUT_AFTER`]
/// bytes towards it, once. Returns its address and whether it has cut.
fn cutting_proxy(target: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let flag = cut.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let Ok(server) = std::net::TcpStream::connect(target) else {
                return;
            };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let flag = flag.clone();
            // Towards the worker: counted, and cut once past the limit.
            std::thread::spawn(move || {
                let (mut from, mut to) = (client, server);
                let mut buf = [0u8; 64 << 10];
                let mut sent = 0u64;
                loop {
                    let n = match std::io::Read::read(&mut from, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    sent += n as u64;
                    if sent > CUT_AFTER && !flag.swap(true, Ordering::SeqCst) {
                        break;
                    }
                    if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = from.shutdown(std::net::Shutdown::Both);
                let _ = to.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let (mut from, mut to) = (s2, c2);
                let _ = std::io::copy(&mut from, &mut to);
                let _ = from.shutdown(std::net::Shutdown::Both);
                let _ = to.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (addr, cut)
}

/// `baton head` over `workers` with `config`, one prompt; (stdout, stderr), bounded in time.
fn head(workers: &str, dir: &Path, key: &Path, config: &Path, model: &Path) -> (String, String) {
    let mut child = Command::new(BATON)
        .args([
            "head",
            "--wire-dtype",
            "f32",
            "--transport",
            "tcp",
            "--max-tokens",
            MAX_TOKENS,
            "--prompt",
            PROMPT,
            "--workers",
            workers,
            "--name",
            "head",
        ])
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
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the head did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
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

#[test]
fn a_worker_without_the_model_gets_its_tensors_resumes_a_dropped_push_and_caches_them() {
    let model = common::smollm2();
    let expected = single_process(&model);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    worker::write_key(&key, &[0xab; 32]);
    // worker-b's model path does not exist: it must get its tensors from the head.
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!(
            "[nodes.worker-b]\nmodel_path = \"{}\"\n",
            dir.path().join("absent.gguf").display()
        ),
    )
    .unwrap();
    let a = start_worker("worker-a", &dir.path().join("a"), &key);
    let b = start_worker("worker-b", &dir.path().join("b"), &key);
    let (proxy, cut) = cutting_proxy(b.control);

    let (out, err) = head(
        &format!("{},{proxy}", a.control),
        dir.path(),
        &key,
        &config,
        &model,
    );
    assert_eq!(out, expected, "tokens differ from the single process");
    assert!(
        cut.load(Ordering::SeqCst),
        "the proxy never cut the push (is the shard under {CUT_AFTER} bytes?)"
    );
    assert!(
        err.contains("broke off"),
        "no dropped push reported:\n{err}"
    );
    assert!(
        err.contains("resuming the push"),
        "the push restarted instead of resuming:\n{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("worker-b: layers") && l.contains("pushed")),
        "worker-b's shard was not pushed:\n{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("worker-a: layers") && l.contains("local")),
        "worker-a did not use its own copy:\n{err}"
    );
    let cache = dir.path().join("b").join("weights");
    let shards: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map_while(Result::ok)
        .collect();
    assert_eq!(
        shards.len(),
        1,
        "one cached shard expected in {}",
        cache.display()
    );
    assert!(shards[0].path().join("shard.gguf").exists());

    // A restarted worker-b finds the shard in its cache: nothing is pushed. worker-a, still
    // running, keeps the shard it holds for the next head.
    drop(b);
    let b = start_worker("worker-b", &dir.path().join("b"), &key);
    let (out, err) = head(
        &format!("{},{}", a.control, b.control),
        dir.path(),
        &key,
        &config,
        &model,
    );
    assert_eq!(out, expected, "tokens differ after loading from the cache");
    assert!(
        err.lines()
            .any(|l| l.contains("worker-b: layers") && l.contains("cache")),
        "worker-b did not load from its cache:\n{err}"
    );
    assert!(
        !err.contains("pushing layers"),
        "weights were pushed again:\n{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("worker-a: layers") && l.contains("kept")),
        "worker-a did not keep its loaded shard:\n{err}"
    );
}
