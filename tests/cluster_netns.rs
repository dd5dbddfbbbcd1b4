//! A cluster across network namespaces: the test builds a switch (a bridge in a namespace of its
//! own), one namespace per host with a veth pair to the switch, runs three workers and a head in
//! them, and removes everything afterwards (also on failure). The head finds the workers by mDNS
//! alone, plans, loads (one worker has no model file and gets its tensors pushed) and generates
//! the single-process tokens; then the same with multicast off and static peers only.
//!
//! Needs root and `ip` (iproute2); without them it is skipped with a message. CI runs as root.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BATON: &str = env!("CARGO_BIN_EXE_baton");
const PROMPT: &str = "Once upon a time, in a small village,";
const MAX_TOKENS: &str = "8";
const HOSTS: [&str; 4] = ["head", "worker-1", "worker-2", "worker-3"];

fn can_run() -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: network namespaces need root (CI runs this test as root)");
        return false;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skipped: no `ip` binary (install iproute2)");
        return false;
    }
    true
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces and links of one test; removed on drop, whatever happened.
struct Net {
    prefix: String,
}

impl Net {
    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn addr(i: usize) -> String {
        format!("10.77.0.{}", 10 + i)
    }

    fn build() -> Net {
        let net = Net {
            prefix: format!("bt{}", std::process::id() % 100_000),
        };
        let sw = net.ns("sw");
        ip(&["netns", "add", &sw]);
        ip(&["-n", &sw, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for (i, host) in HOSTS.iter().enumerate() {
            let ns = net.ns(host);
            let (a, b) = (format!("{}h{i}", net.prefix), format!("{}s{i}", net.prefix));
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
            ip(&["link", "set", &a, "netns", &ns]);
            ip(&["link", "set", &b, "netns", &sw]);
            ip(&["-n", &ns, "link", "set", &a, "name", "eth0"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", Net::addr(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"]);
            ip(&["-n", &sw, "link", "set", &b, "master", "br0"]);
            ip(&["-n", &sw, "link", "set", &b, "up"]);
        }
        net
    }

    /// Multicast stops: no interface sends it and the switch floods none.
    fn cut_multicast(&self) {
        for (i, host) in HOSTS.iter().enumerate() {
            ip(&[
                "-n",
                &self.ns(host),
                "link",
                "set",
                "eth0",
                "multicast",
                "off",
            ]);
            ip(&[
                "-n",
                &self.ns("sw"),
                "link",
                "set",
                &format!("{}s{i}", self.prefix),
                "type",
                "bridge_slave",
                "mcast_flood",
                "off",
            ]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends, and so their peers.
        for host in HOSTS.iter().chain(["sw"].iter()) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(host)])
                .output();
        }
    }
}

/// A process in a namespace, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_worker(net: &Net, i: usize, dir: &Path, key: &Path) -> Proc {
    let name = HOSTS[i];
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.ns(name),
            BATON,
            "worker",
            "--listen",
            "0.0.0.0:8422",
            "--transport",
            "tcp",
            "--name",
            name,
        ])
        .arg("--state-dir")
        .arg(dir.join(name))
        .arg("--key-file")
        .arg(key)
        .env("BATON_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
        let _ = tx.send(lines.by_ref().find(|l| l.starts_with("BATON_WORKER_READY")));
        for _ in lines {}
    });
    let proc = Proc(child);
    rx.recv_timeout(Duration::from_secs(60))
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("{name} did not come up within 60 s"));
    proc
}

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
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .unwrap();
        std::io::Write::write_all(&mut f, "5a".repeat(32).as_bytes()).unwrap();
    }
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
        let _workers: Vec<Proc> = (1..=3)
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
            err.contains("placement: planned over 4 stages"),
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
    let _workers: Vec<Proc> = (1..=3)
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
