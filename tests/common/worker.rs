//! A `baton worker` process for the tests that need one: started from a prepared command (on
//! loopback, or under `ip netns exec`), waited for until it says where it listens, killed on drop.
//! Included with `#[path]` by the tests that drive workers.

// Each test binary compiles its own copy and uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Worker {
    pub child: Child,
    pub control: SocketAddr,
    pub data: SocketAddr,
}

impl Worker {
    /// `baton worker` on loopback (any free ports, TCP data links, no mDNS) named `name`, with
    /// its state in `dir` and the cluster key in `key`; logs at `BATON_LOG=warn` unless the
    /// caller sets another level on the returned command.
    pub fn command(name: &str, dir: &Path, key: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
        cmd.args(["worker", "--listen", "127.0.0.1:0", "--transport", "tcp", "--no-mdns", "--name", name])
            .arg("--state-dir")
            .arg(dir)
            .arg("--key-file")
            .arg(key)
            .env("BATON_LOG", "warn");
        cmd
    }

    /// Spawns `cmd` (a `baton worker ...`) and waits up to 60 s for its ready line.
    pub fn start(mut cmd: Command) -> Worker {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
            let _ = tx.send(lines.by_ref().find(|l| l.starts_with("BATON_WORKER_READY")));
            // Keep draining so the worker never blocks on a full pipe.
            for _ in lines {}
        });
        let ready = rx.recv_timeout(Duration::from_secs(60)).ok().flatten();
        // Killed on drop from here on, whether the line came or not.
        let mut w = Worker { child, control: ([0, 0, 0, 0], 0).into(), data: ([0, 0, 0, 0], 0).into() };
        let line = ready.expect("the worker did not come up within 60 s");
        let field = |name: &str| -> SocketAddr { line.split_whitespace().find_map(|f| f.strip_prefix(name)).unwrap().parse().unwrap() };
        (w.control, w.data) = (field("control="), field("data="));
        w
    }
}

/// Writes `key` as a cluster key file (hex, mode 0600, as `baton` insists).
pub fn write_key(path: &Path, key: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    std::io::Write::write_all(&mut f, hex.as_bytes()).unwrap();
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
