//! Streams survive losing a node: `baton serve` on loopback (f32 wire), five concurrent streams
//! (four greedy, one seeded at temperature 0.8) run once undisturbed, then again while a worker is
//! killed with SIGKILL, drained with `baton drain`, or a new worker is joined and the chain
//! rebalanced (and rebalanced again, keeping every shard). A drain without the cluster key is
//! refused. Every stream completes with exactly the undisturbed tokens, none repeated or lost.
//! When the model no longer fits (the only worker killed), the streams end with an error naming the
//! node and new requests are refused with the reason. Across network namespaces (root only), the
//! same streams survive a drain, a worker killed and a host that drops off the network.

mod common;

#[path = "common/netns.rs"]
mod netns;
#[path = "common/serve.rs"]
mod serve;
#[path = "common/worker.rs"]
mod worker;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve::{Serve, BATON};
use worker::Worker;

const MAX_TOKENS: u64 = 40;
/// Tokens every stream has streamed before the disturbance: it hits them all mid-generation.
const BEFORE: usize = 4;
/// A whole run, pause included, on a loaded 2-core CI machine.
const RUN_LIMIT: Duration = Duration::from_secs(420);

fn requests() -> Vec<Value> {
    let greedy = ["1, 2, 3, 4, 5, 6,", "Once upon a time, in a small village,", "def fibonacci(n):", "The history of Rome begins"];
    let mut r: Vec<Value> = greedy.iter().map(|p| json!({"prompt": p, "max_tokens": MAX_TOKENS, "stream": true, "temperature": 0.0})).collect();
    r.push(json!({"prompt": "My favourite food is", "max_tokens": MAX_TOKENS, "stream": true, "temperature": 0.8, "seed": 7}));
    r
}

/// Sends [`requests`] (their ids start at `first_id`), calls `disturb` once every stream has
/// streamed [`BEFORE`] tokens and none has finished, and returns each stream's tokens. Each final
/// result must list exactly the tokens streamed before it.
fn run(serve: &mut Serve, first_id: u64, disturb: impl FnOnce(&Serve)) -> Vec<Vec<u64>> {
    let reqs = requests();
    for r in &reqs {
        serve.send(r.clone());
    }
    let n = reqs.len();
    let mut streamed = vec![Vec::new(); n];
    let mut done = vec![None; n];
    let mut disturb = Some(disturb);
    let deadline = Instant::now() + RUN_LIMIT;
    while done.iter().any(Option::is_none) {
        let v = serve.next(deadline.saturating_duration_since(Instant::now()));
        let i = (v["id"].as_u64().unwrap_or_else(|| panic!("no id in {v}")) - first_id) as usize;
        if let Some(e) = v.get("error") {
            panic!("stream {i} failed: {e}");
        }
        if let Some(t) = v.get("token") {
            streamed[i].push(t.as_u64().unwrap());
        } else {
            let tokens: Vec<u64> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
            assert_eq!(tokens, streamed[i], "stream {i}: the result differs from what was streamed");
            done[i] = Some(tokens);
        }
        if streamed.iter().all(|s| s.len() >= BEFORE) && disturb.is_some() {
            assert!(done.iter().all(Option::is_none), "a stream finished before the disturbance: make the streams longer");
            (disturb.take().unwrap())(serve);
        }
    }
    assert!(disturb.is_none(), "the streams ended before the disturbance");
    done.into_iter().map(Option::unwrap).collect()
}

fn kill(pid: u32) {
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0, "kill {pid}");
}

fn status(serve: &Serve) -> Value {
    serde_json::from_str(&serve.baton(&["status", "--json"])).unwrap()
}

fn node<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["nodes"].as_array().unwrap().iter().find(|n| n["name"] == name).unwrap_or_else(|| panic!("no {name} in {status}"))
}

fn assert_same(undisturbed: &[Vec<u64>], disturbed: &[Vec<u64>], what: &str) {
    for (i, (a, b)) in undisturbed.iter().zip(disturbed).enumerate() {
        assert_eq!(a, b, "stream {i} {what}: tokens differ from the undisturbed run");
    }
}

#[test]
fn streams_resume_after_a_worker_is_killed() {
    let mut serve = Serve::start(3, &common::smollm2(), &[]);
    let pids = serve.worker_pids(3, Duration::from_secs(60));
    let undisturbed = run(&mut serve, 0, |_| {});
    let disturbed = run(&mut serve, 5, |_| kill(pids[1]));
    assert_same(&undisturbed, &disturbed, "after worker-1 was killed");

    let s = status(&serve);
    assert_eq!(s["state"], "serving", "{s}");
    // At least the one re-plan (a loaded machine may add one for late heartbeats: harmless).
    assert!(s["replans"].as_u64().unwrap() >= 1, "{s}");
    let gone = node(&s, "worker-1");
    assert_eq!((&gone["alive"], &gone["state"]), (&json!(false), &json!("gone")), "{gone}");
    assert!(gone["detail"].as_str().unwrap().contains("health stream") || gone["detail"].as_str().unwrap().contains("unreachable"), "{gone}");
    assert!(s["stages"].as_array().unwrap().iter().all(|st| st["node"] != "worker-1"), "{s}");
    // New requests run on the rebuilt chain.
    let again = run(&mut serve, 10, |_| {});
    assert_same(&undisturbed, &again, "on the rebuilt chain");
    serve.finish();
}

#[test]
fn streams_resume_after_a_worker_is_drained_and_it_can_then_stop() {
    let mut serve = Serve::start(2, &common::smollm2(), &[]);
    let pids = serve.worker_pids(2, Duration::from_secs(60));
    let undisturbed = run(&mut serve, 0, |_| {});
    // Without the cluster key, the head's operator service gives nothing.
    let dir = tempfile::tempdir().unwrap();
    let stranger = dir.path().join("stranger.key");
    worker::write_key(&stranger, &[0x7c; 32]);
    let refused = Command::new(BATON).args(["drain", "worker-0", "--state-dir"]).arg(serve.state_dir()).arg("--key-file").arg(&stranger).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("different cluster keys"), "a stranger's drain: {err}");
    assert_eq!(node(&status(&serve), "worker-0")["state"], "serving", "the stranger drained it");
    let disturbed = run(&mut serve, 5, |serve| {
        let out = serve.baton(&["drain", "worker-0"]);
        assert!(out.contains("worker-0 drained") && out.contains("5 stream(s) resumed"), "{out}");
        // Out of the chain, it can be stopped without anyone noticing.
        kill(pids[0]);
    });
    assert_same(&undisturbed, &disturbed, "across the drain");
    let s = status(&serve);
    assert_eq!(s["state"], "serving", "{s}");
    assert_eq!(node(&s, "worker-0")["state"], "drained", "{s}");
    assert_eq!(s["stages"].as_array().unwrap().len(), 2, "head + worker-1: {s}");
    serve.finish();
}

/// A `baton worker` process on loopback holding the head's cluster key; killed when dropped.
fn late_worker(serve: &Serve, dir: &std::path::Path) -> Worker {
    Worker::start(Worker::command("late-worker", dir, &serve.state_dir().join("cluster.key")))
}

#[test]
fn a_joined_worker_is_used_at_the_rebalance_and_streams_resume() {
    let mut serve = Serve::start(1, &common::smollm2(), &[]);
    serve.worker_pids(1, Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let late = late_worker(&serve, dir.path());
    let undisturbed = run(&mut serve, 0, |_| {});

    let out = serve.baton(&["join", &late.control.to_string()]);
    assert!(out.contains("late-worker") && out.contains("next re-plan"), "{out}");
    let s = status(&serve);
    assert_eq!(node(&s, "late-worker")["state"], "spare", "{s}");
    assert_eq!(s["stages"].as_array().unwrap().len(), 2, "not used before the re-plan: {s}");

    let disturbed = run(&mut serve, 5, |serve| {
        let out = serve.baton(&["rebalance"]);
        assert!(out.contains("5 stream(s) resumed"), "{out}");
    });
    assert_same(&undisturbed, &disturbed, "across the rebalance");
    let s = status(&serve);
    assert_eq!(node(&s, "late-worker")["state"], "serving", "{s}");
    assert_eq!(s["stages"].as_array().unwrap().len(), 3, "head + worker-0 + late-worker: {s}");

    // Nothing changed since: a re-plan keeps every shard and only re-prefills the streams.
    let again = run(&mut serve, 10, |serve| {
        let out = serve.baton(&["rebalance"]);
        assert_eq!(out.matches("(kept)").count(), 3, "{out}");
    });
    assert_same(&undisturbed, &again, "across a rebalance that kept every shard");
    serve.finish();
}

#[test]
fn when_the_model_no_longer_fits_streams_end_with_the_reason() {
    let mut serve = Serve::start(1, &common::smollm2(), &[]);
    let pids = serve.worker_pids(1, Duration::from_secs(60));
    serve.send(json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 4000, "stream": true}));
    let first = serve.next(Duration::from_secs(120));
    assert!(first.get("token").is_some(), "expected a streamed token, got {first}");

    kill(pids[0]);
    let killed = Instant::now();
    let end = loop {
        let v = serve.next(Duration::from_secs(20));
        if v.get("token").is_none() {
            break v;
        }
    };
    let error = end["error"].as_str().unwrap_or_else(|| panic!("expected an error, got {end}"));
    assert!(killed.elapsed() < Duration::from_secs(10), "the stream ended {:?} after the kill", killed.elapsed());
    assert!(error.contains("worker-0") && error.contains("no worker is left"), "unclear error: {error}");

    // The head stays up and refuses new requests with the reason.
    assert!(serve.child.try_wait().unwrap().is_none(), "the head exited");
    serve.send(json!({"prompt": "Hello", "max_tokens": 4}));
    let next = serve.next(Duration::from_secs(10));
    assert!(next["error"].as_str().is_some_and(|e| e.contains("no worker is left")), "got {next}");

    let text = serve.baton(&["status"]);
    let line = text.lines().find(|l| l.starts_with("worker-0")).unwrap_or_else(|| panic!("no worker-0 in status:\n{text}"));
    assert!(line.contains("gone"), "status line: {line}");
    serve.finish();
}

#[test]
fn in_namespaces_streams_resume_after_a_drain_a_kill_and_a_host_dropping_off() {
    if !netns::can_run() {
        return;
    }
    let model = common::smollm2();
    let net = netns::Net::build();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    worker::write_key(&key, &[0x6b; 32]);
    let workers: Vec<Worker> = (1..=3).map(|i| netns::start_worker(&net, i, dir.path(), &key)).collect();
    let endpoints: Vec<String> = (1..=3).map(|i| format!("{}:8422", netns::Net::addr(i))).collect();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &net.ns("head"), BATON, "head", "--stdin", "--wire-dtype", "f32", "--transport", "tcp", "--name", "head"])
        .args(["--workers", &endpoints.join(",")])
        .arg("--model")
        .arg(&model)
        .arg("--key-file")
        .arg(&key);
    let mut head = Serve::spawn(cmd, tempfile::tempdir().unwrap());

    // The operator commands run in the head's namespace, where its operator service listens.
    let operate = |head: &Serve, args: &[&str]| -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &net.ns("head"), BATON])
            .args(args)
            .arg("--state-dir")
            .arg(head.state_dir())
            .arg("--key-file")
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "baton {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };

    let undisturbed = run(&mut head, 0, |_| {});
    let drained = run(&mut head, 5, |head| {
        let out = operate(head, &["drain", "worker-3"]);
        assert!(out.contains("5 stream(s) resumed"), "{out}");
    });
    assert_same(&undisturbed, &drained, "across the drain of worker-3");
    // Back in, for the losses to come.
    operate(&head, &["join", &endpoints[2]]);
    operate(&head, &["rebalance"]);
    let killed = run(&mut head, 10, |_| kill(workers[1].child.id()));
    assert_same(&undisturbed, &killed, "after worker-2 was killed");
    // No packet of worker-1 arrives any more and none of its connections is reset: the head
    // notices the silence (3 s without heartbeats) and goes on with worker-3 alone.
    let unplugged = run(&mut head, 15, |_| net.unplug(1));
    assert_same(&undisturbed, &unplugged, "after worker-1 dropped off the network");

    let s = status(&head);
    assert_eq!(s["state"], "serving", "{s}");
    assert!(s["replans"].as_u64().unwrap() >= 4, "drain, rebalance, kill, unplug: {s}");
    for (name, why) in [("worker-2", "health stream"), ("worker-1", "")] {
        let n = node(&s, name);
        assert_eq!(n["state"], "gone", "{n}");
        assert!(n["detail"].as_str().unwrap().contains(why), "{n}");
    }
    let stages: Vec<&str> = s["stages"].as_array().unwrap().iter().map(|st| st["node"].as_str().unwrap()).collect();
    assert_eq!(stages, ["head", "worker-3"], "{s}");
    head.finish();
}

#[test]
fn with_rebalance_when_idle_a_joined_worker_is_taken_in_once_no_request_runs() {
    let mut serve = Serve::start(1, &common::smollm2(), &["--rebalance-when-idle"]);
    serve.worker_pids(1, Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let late = late_worker(&serve, dir.path());
    let undisturbed = run(&mut serve, 0, |_| {});
    // Joined while streams run: the head waits for them to finish, then re-plans on its own.
    let during = run(&mut serve, 5, |serve| {
        let out = serve.baton(&["join", &late.control.to_string()]);
        assert!(out.contains("once no request runs"), "{out}");
        // Not taken in under load (unless a loss re-planned meanwhile: every re-plan uses it).
        let s = status(serve);
        assert!(node(&s, "late-worker")["state"] == "spare" || s["replans"] != 0, "taken in under load: {s}");
    });
    assert_same(&undisturbed, &during, "while a worker joined");
    let deadline = Instant::now() + Duration::from_secs(60);
    while node(&status(&serve), "late-worker")["state"] != "serving" {
        assert!(Instant::now() < deadline, "no re-plan once idle: {}", status(&serve));
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = status(&serve);
    assert_eq!(node(&s, "late-worker")["state"], "serving", "{s}");
    assert_eq!(s["stages"].as_array().unwrap().len(), 3, "{s}");
    assert_same(&undisturbed, &run(&mut serve, 10, |_| {}), "on the rebalanced chain");
    serve.finish();
}
