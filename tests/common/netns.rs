//! Network namespaces for cluster tests: a switch (a bridge in a namespace of its own), one
//! namespace per host with a veth pair to the switch, removed on drop (also on failure). Included
//! with `#[path]`, beside common/worker.rs, by the tests that need it; they run only as root with
//! `ip` (iproute2).

// Each test binary compiles its own copy and uses part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::worker::Worker;

pub const HOSTS: [&str; 4] = ["head", "worker-1", "worker-2", "worker-3"];

/// Whether namespaces can be made here; says why not when they cannot.
pub fn can_run() -> bool {
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

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces and links of one test; removed on drop, whatever happened.
pub struct Net {
    prefix: String,
}

impl Net {
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    pub fn addr(i: usize) -> String {
        format!("10.77.0.{}", 10 + i)
    }

    pub fn build() -> Net {
        // Unique per process and per call: tests of one binary may build nets at once.
        static NETS: AtomicUsize = AtomicUsize::new(0);
        let net = Net {
            prefix: format!("bt{}{}", std::process::id() % 100_000, NETS.fetch_add(1, Ordering::Relaxed)),
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
    pub fn cut_multicast(&self) {
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

impl Net {
    /// Host `i` drops off the switch: its packets go nowhere, and no connection of it is reset
    /// (as when a machine loses power).
    pub fn unplug(&self, i: usize) {
        ip(&["-n", &self.ns("sw"), "link", "set", &format!("{}s{i}", self.prefix), "down"]);
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

/// `baton worker` as host `i` (named after it, control on port 8422, TCP data links).
pub fn start_worker(net: &Net, i: usize, dir: &Path, key: &Path) -> Worker {
    let name = HOSTS[i];
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &net.ns(name), env!("CARGO_BIN_EXE_baton"), "worker", "--listen", "0.0.0.0:8422", "--transport", "tcp", "--name", name])
        .arg("--state-dir")
        .arg(dir.join(name))
        .arg("--key-file")
        .arg(key)
        .env("BATON_LOG", "info");
    Worker::start(cmd)
}
