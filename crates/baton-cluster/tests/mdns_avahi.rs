//! mDNS discovery beside a system mDNS responder: starts avahi-daemon (unless one already runs),
//! then advertises a worker and discovers it on this host's interfaces (loopback included), checks
//! that a node of another cluster is ignored, that re-announcements keep the entry fresh, and that
//! a goodbye removes it, each within a bounded time. avahi-daemon must be installed
//! (`scripts/cluster-ci.sh` installs it); without it the test fails, since CI provides it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use baton_cluster::discovery::{Advert, Advertiser, Browser, Source};
use baton_cluster::identity::NodeId;
use baton_cluster::key::ClusterKey;

const AVAHI_CONF: &str = "\
[server]
use-ipv4=yes
use-ipv6=no
enable-dbus=no
ratelimit-interval-usec=1000000
ratelimit-burst=1000
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
";

/// An avahi-daemon this test started (stopped on drop), or one that was already running (left).
struct Avahi {
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

fn find_avahi() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("avahi-daemon"))
        .find(|p| p.is_file())
}

fn start_avahi() -> Avahi {
    let bin = find_avahi().unwrap_or_else(|| {
        panic!(
            "avahi-daemon is not installed, and this test needs it to prove that baton's mDNS \
             coexists with a system responder: run scripts/cluster-ci.sh (apt-get install \
             avahi-daemon)"
        )
    });
    let dir = tempfile::tempdir().unwrap();
    if Command::new(&bin)
        .arg("--check")
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
    {
        return Avahi {
            child: None,
            _dir: dir,
        };
    }
    let conf = dir.path().join("avahi-daemon.conf");
    std::fs::write(&conf, AVAHI_CONF).unwrap();
    // Foreground, no D-Bus and no privilege drop: runs anywhere root runs, leaves nothing behind.
    let mut child = Command::new(&bin)
        .arg("-f")
        .arg(&conf)
        .args(["--no-drop-root", "--no-chroot", "--no-rlimits"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut log = Vec::new();
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let done = line.contains("Server startup complete");
                log.push(line);
                if done {
                    return Avahi {
                        child: Some(child),
                        _dir: dir,
                    };
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "avahi-daemon exited ({status}) during startup:\n{}",
                        log.join("\n")
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "avahi-daemon did not start within 15 s:\n{}",
        log.join("\n")
    );
}

impl Avahi {
    fn still_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Avahi {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        // SIGTERM first so that the daemon removes its pid file.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn advert(name: &str, cluster_id: &str, port: u16) -> Advert {
    Advert {
        id: NodeId::random().to_string(),
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        cluster_id: cluster_id.into(),
        control_port: port,
        total_memory: 64 << 30,
        available_memory: 60 << 30,
        backend: "cpu".into(),
        transports: vec!["quic".into(), "tcp".into()],
        bandwidth: Some(50_000_000_000),
    }
}

#[test]
fn advertise_and_discover_beside_avahi() {
    let mut avahi = start_avahi();
    let cluster = ClusterKey::random().cluster_id();
    let ours = advert("mdns-test-worker", &cluster, 18422);
    let theirs = advert(
        "mdns-test-stranger",
        &ClusterKey::random().cluster_id(),
        18432,
    );

    let browser = Browser::start(&cluster, Duration::from_secs(30)).unwrap();
    let refresh = Duration::from_millis(500);
    let stranger = Advertiser::start(theirs.clone(), refresh).unwrap();
    let worker = Advertiser::start(ours.clone(), refresh).unwrap();

    let started = Instant::now();
    let nodes = browser.wait_until(Duration::from_secs(10), |n| {
        n.iter().any(|e| e.advert.id == ours.id)
    });
    let found = nodes
        .iter()
        .find(|e| e.advert.id == ours.id)
        .unwrap_or_else(|| {
            panic!("worker not discovered within 10 s beside avahi-daemon; inventory: {nodes:?}")
        });
    eprintln!(
        "discovered in {:?} at {:?}",
        started.elapsed(),
        found.control_addrs
    );
    assert_eq!(found.advert, ours);
    assert_eq!(found.sources, vec![Source::Mdns]);
    assert!(!found.control_addrs.is_empty());
    assert!(found.control_addrs.iter().all(|a| a.port() == 18422));

    // Re-announcements keep the entry fresh; the other cluster's node never enters.
    std::thread::sleep(Duration::from_secs(3));
    let nodes = browser.snapshot();
    let entry = nodes
        .iter()
        .find(|e| e.advert.id == ours.id)
        .expect("worker still listed");
    assert!(
        entry.age_s < 2.5,
        "not refreshed: last seen {:.1} s ago",
        entry.age_s
    );
    assert!(
        nodes.iter().all(|e| e.advert.id != theirs.id),
        "other cluster's node listed: {nodes:?}"
    );
    assert!(
        avahi.still_running(),
        "avahi-daemon died beside baton's responder"
    );

    // A goodbye removes the worker promptly.
    drop(worker);
    let nodes = browser.wait_until(Duration::from_secs(10), |n| {
        n.iter().all(|e| e.advert.id != ours.id)
    });
    assert!(
        nodes.iter().all(|e| e.advert.id != ours.id),
        "worker still listed after goodbye"
    );
    drop(stranger);
    drop(browser);
    assert!(avahi.still_running());
}
