//! Finding workers: a worker announces itself over mDNS; a head given no `--workers` browses for
//! its cluster's workers and asks cluster.toml's static peers (for networks where multicast does
//! not pass).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use baton_cluster::config::ClusterConfig;
use baton_cluster::discovery::{self, Advert, Advertiser, Browser, Inventory, NodeEntry, Source};
use baton_cluster::key::ClusterKey;

/// How often a worker re-announces itself (its memory figures change).
const REFRESH: Duration = Duration::from_secs(5);

/// Announces this worker. mDNS is a convenience: where it cannot start (no multicast), the
/// worker still serves heads that know its address, so this only warns.
pub fn advertise(
    name: &str,
    id: &str,
    key: &ClusterKey,
    control: SocketAddr,
    backend: &str,
    transports: Vec<String>,
) -> Option<Advertiser> {
    let (total, available) = baton_worker::sysinfo::memory();
    let advert = Advert {
        id: id.to_string(),
        name: name.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        cluster_id: key.cluster_id(),
        control_port: control.port(),
        total_memory: total,
        available_memory: available,
        backend: backend.to_string(),
        transports,
        bandwidth: None,
    };
    match Advertiser::start(advert, REFRESH) {
        Ok(a) => {
            tracing::info!("announced over mDNS as {}", a.fullname());
            Some(a)
        }
        Err(e) => {
            tracing::warn!("not announced over mDNS ({e}); heads must list this worker's address");
            None
        }
    }
}

/// The control address to reach a node at: not loopback (that is this host), IPv4 first
/// (link-local IPv6 needs a scope).
fn address(e: &NodeEntry) -> Option<SocketAddr> {
    let usable: Vec<&SocketAddr> = e
        .control_addrs
        .iter()
        .filter(|a| !a.ip().is_loopback())
        .collect();
    usable
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| usable.first())
        .map(|a| **a)
}

/// Worker control endpoints of this cluster, in chain order (by node name): browses mDNS (when
/// cluster.toml allows it) until `min` workers are known or the browse time passes, and asks
/// the static peers.
pub fn discover_workers(
    key: &ClusterKey,
    cluster: &ClusterConfig,
    min: usize,
) -> Result<Vec<String>> {
    let cluster_id = key.cluster_id();
    let browse = Duration::from_millis(cluster.discovery.browse_ms);
    let inventory = Mutex::new(Inventory::new(
        cluster_id.clone(),
        Duration::from_millis(cluster.discovery.expiry_ms),
    ));
    let mut problems = Vec::new();
    if !cluster.peers.is_empty() {
        let security = baton_proto::ControlSecurity::new(key.as_bytes())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        for (peer, why) in rt.block_on(discovery::probe_static_peers(
            &cluster.peers,
            &inventory,
            &security,
            browse.max(Duration::from_secs(5)),
        )) {
            tracing::warn!("static peer {peer}: {why}");
            problems.push(format!("static peer {peer}: {why}"));
        }
    }
    let mut entries = inventory
        .lock()
        .map(|i| i.snapshot(Instant::now()))
        .unwrap_or_default();
    if cluster.discovery.mdns && entries.len() < min {
        match Browser::start(
            &cluster_id,
            Duration::from_millis(cluster.discovery.expiry_ms),
        ) {
            Ok(browser) => {
                let found = browser.wait_until(browse, |nodes| {
                    let mut ids: Vec<&str> = nodes.iter().map(|n| n.advert.id.as_str()).collect();
                    ids.extend(entries.iter().map(|n| n.advert.id.as_str()));
                    ids.sort_unstable();
                    ids.dedup();
                    ids.len() >= min
                });
                for n in found {
                    if !entries.iter().any(|e| e.advert.id == n.advert.id) {
                        entries.push(n);
                    }
                }
            }
            Err(e) => problems.push(format!("mDNS browsing failed: {e}")),
        }
    }
    // Anyone can advertise our (public) cluster id: only nodes that prove the key are used.
    if entries.iter().any(|e| !e.sources.contains(&Source::Static)) {
        let security = baton_proto::ControlSecurity::new(key.as_bytes())?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let mut verified = Vec::new();
        for e in entries {
            let peer = address(&e).map(|a| a.to_string()).unwrap_or_default();
            let check = if e.sources.contains(&Source::Static) {
                Ok(())
            } else {
                rt.block_on(discovery::verify_member(&peer, &e.advert.id, &cluster_id, &security, Duration::from_secs(5)))
            };
            match check {
                Ok(()) => verified.push(e),
                Err(why) => {
                    tracing::warn!("ignoring {} at {peer}, found over mDNS: {why}", e.advert.name);
                    problems.push(format!("{} at {peer} ignored: {why}", e.advert.name));
                }
            }
        }
        entries = verified;
    }
    entries.sort_by(|a, b| a.advert.name.cmp(&b.advert.name));
    let workers: Vec<String> = entries
        .iter()
        .filter_map(address)
        .map(|a| a.to_string())
        .collect();
    for e in &entries {
        tracing::info!(
            "found worker {} ({}) via {:?} at {:?}",
            e.advert.name,
            e.advert.id,
            e.sources,
            e.control_addrs
        );
    }
    if workers.len() < min {
        bail!(
            "found {} worker(s) of cluster {cluster_id}, {min} wanted, after {} ms of mDNS browsing{}{}; list them with --workers or in cluster.toml's peers",
            workers.len(),
            browse.as_millis(),
            if cluster.discovery.mdns { "" } else { " (mDNS off in cluster.toml)" },
            if problems.is_empty() { String::new() } else { format!(" ({})", problems.join("; ")) }
        );
    }
    Ok(workers)
}
