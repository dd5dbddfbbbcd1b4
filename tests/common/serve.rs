//! `baton serve --stdin` as a child process: JSON requests in, JSON lines out, stderr collected.
//! Included with `#[path]` by the tests that drive it.

// Each test binary compiles its own copy and uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub const BATON: &str = env!("CARGO_BIN_EXE_baton");

pub struct Serve {
    pub child: Child,
    stdin: Option<ChildStdin>,
    out: Receiver<serde_json::Value>,
    err: Receiver<String>,
    state: tempfile::TempDir,
}

impl Serve {
    /// `baton serve --stdin --wire-dtype f32 --workers N --model M` plus `extra` arguments.
    pub fn start(workers: usize, model: &PathBuf, extra: &[&str]) -> Serve {
        let state = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(BATON);
        cmd.args(["serve", "--stdin", "--wire-dtype", "f32", "--workers", &workers.to_string()])
            .args(extra)
            .arg("--model")
            .arg(model);
        Serve::spawn(cmd, state)
    }

    /// Runs `cmd` (a `baton serve --stdin` or `baton head --stdin`) with `--state-dir state`.
    pub fn spawn(mut cmd: Command, state: tempfile::TempDir) -> Serve {
        let mut child = cmd
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
        Serve { child, stdin, out, err, state }
    }

    /// The head's state directory (status file, cluster key).
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    pub fn send(&mut self, req: serde_json::Value) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{req}").unwrap();
        stdin.flush().unwrap();
    }

    pub fn next(&self, within: Duration) -> serde_json::Value {
        self.out.recv_timeout(within).expect("no output from serve in time")
    }

    /// Worker pids from the `serve: worker-N pid P ...` lines, in worker order.
    pub fn worker_pids(&self, n: usize, within: Duration) -> Vec<u32> {
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

    /// `baton <args> --state-dir <this head's>`; its stdout, after asserting success.
    pub fn baton(&self, args: &[&str]) -> String {
        let out = Command::new(BATON).args(args).arg("--state-dir").arg(self.state_dir()).output().unwrap();
        assert!(out.status.success(), "baton {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Closes stdin and waits (bounded) for serve to exit.
    pub fn finish(mut self) {
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
