//! Finding nodes: workers advertise `_baton._tcp.local.` over mDNS; the head browses and keeps an
//! [`Inventory`] of nodes of its own cluster with their freshness, merged with static peers.
//!
//! **TXT record** (keys kept short: a TXT string is at most 255 bytes): `id` node id, `name`,
//! `ver` software version, `cid` cluster id (a hash of the cluster key, never the key), `port`
//! control port, `mem` total and `avail` available memory in bytes, `backend` (`cpu`, `cuda`,
//! `metal`), `tr` transports offered (`rdma,quic,tcp`), `bw` memory bandwidth in bytes/s when
//! known, and `seq`, a counter bumped at each refresh.
//!
//! **Freshness.** mDNS records live for minutes, and a browser hears of a service again only when
//! its records change, so a worker re-announces every refresh interval with `seq` (and its
//! available memory) updated. The head marks a node seen at each announcement (and at each
//! heartbeat, through [`Inventory::touch`]) and forgets it after the expiry without one, or at
//! once when the worker says goodbye (unregisters on shutdown).
//!
//! **Coexistence with a system responder** (avahi, mDNSResponder): mdns-sd shares UDP 5353 with
//! address/port reuse, and a worker announces its own host name `baton-<id>.local.` rather than the
//! machine's, so the system responder never sees a conflicting claim on the machine's name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use serde::Serialize;

use crate::config::ClusterConfig;
use crate::planner::{default_bandwidth, NodeCapacity};

/// The DNS-SD service type every baton worker advertises.
pub const SERVICE_TYPE: &str = "_baton._tcp.local.";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("mDNS: {0}")]
    Mdns(#[from] mdns_sd::Error),
    #[error("TXT record of {instance}: {reason}")]
    Txt { instance: String, reason: String },
    #[error("discovery thread: {0}")]
    Thread(std::io::Error),
}

/// What a worker announces about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Advert {
    pub id: String,
    pub name: String,
    pub version: String,
    pub cluster_id: String,
    pub control_port: u16,
    pub total_memory: u64,
    pub available_memory: u64,
    pub backend: String,
    pub transports: Vec<String>,
    /// Memory bandwidth in bytes/s, when configured or measured.
    pub bandwidth: Option<u64>,
}

impl Advert {
    fn txt(&self, seq: u64) -> Vec<(String, String)> {
        let mut txt = vec![
            ("id".to_string(), self.id.clone()),
            ("name".into(), self.name.clone()),
            ("ver".into(), self.version.clone()),
            ("cid".into(), self.cluster_id.clone()),
            ("port".into(), self.control_port.to_string()),
            ("mem".into(), self.total_memory.to_string()),
            ("avail".into(), self.available_memory.to_string()),
            ("backend".into(), self.backend.clone()),
            ("tr".into(), self.transports.join(",")),
            ("seq".into(), seq.to_string()),
        ];
        if let Some(bw) = self.bandwidth {
            txt.push(("bw".into(), bw.to_string()));
        }
        txt
    }

    /// Reads an advert back from TXT properties; `lookup` returns a key's value.
    fn from_txt(lookup: impl Fn(&str) -> Option<String>) -> Result<Advert, String> {
        let get = |k: &str| lookup(k).ok_or_else(|| format!("missing `{k}`"));
        let num = |k: &str| -> Result<u64, String> {
            get(k)?
                .parse()
                .map_err(|_| format!("`{k}` is not a number"))
        };
        let control_port = u16::try_from(num("port")?).map_err(|_| "`port` out of range")?;
        Ok(Advert {
            id: get("id")?,
            name: get("name")?,
            version: get("ver")?,
            cluster_id: get("cid")?,
            control_port,
            total_memory: num("mem")?,
            available_memory: num("avail")?,
            backend: get("backend")?,
            transports: get("tr")?
                .split(',')
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect(),
            bandwidth: lookup("bw").and_then(|v| v.parse().ok()),
        })
    }

    /// The advert equivalent of a worker's `Hello` reply, for static peers.
    pub fn from_node_info(info: &baton_proto::pb::NodeInfo, control_port: u16) -> Advert {
        Advert {
            id: info.id.clone(),
            name: info.name.clone(),
            version: info.version.clone(),
            cluster_id: info.cluster_id.clone(),
            control_port,
            total_memory: info.total_memory,
            available_memory: info.available_memory,
            backend: info.backend().short_name().to_string(),
            transports: info
                .transports()
                .map(|t| t.short_name().to_string())
                .collect(),
            bandwidth: (info.memory_bandwidth > 0).then_some(info.memory_bandwidth),
        }
    }
}

/// How a node became known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Source {
    Mdns,
    Static,
}

/// One node of the inventory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeEntry {
    pub advert: Advert,
    /// Control endpoints to try, best first (IPv4 before IPv6, loopback last).
    pub control_addrs: Vec<SocketAddr>,
    pub sources: Vec<Source>,
    /// Seconds since the node was last heard from, at the time of the snapshot.
    pub age_s: f64,
    #[serde(skip)]
    pub last_seen: Instant,
    /// mDNS instance name, for matching goodbyes.
    #[serde(skip)]
    pub(crate) instance: Option<String>,
}

impl NodeEntry {
    /// The planner's view of this node, with `config`'s per-node overrides applied.
    pub fn capacity(&self, config: &ClusterConfig) -> NodeCapacity {
        let a = &self.advert;
        let node = config.nodes.get(&a.name);
        let available = node.and_then(|n| n.memory).unwrap_or(a.available_memory);
        let total = node
            .and_then(|n| n.memory)
            .unwrap_or(a.total_memory)
            .max(available);
        NodeCapacity {
            name: a.name.clone(),
            available_bytes: available,
            headroom_bytes: config.headroom_for(&a.name).resolve(total),
            bandwidth_bytes_per_s: node
                .and_then(|n| n.memory_bandwidth)
                .or(a.bandwidth)
                .unwrap_or_else(|| default_bandwidth(&a.backend)),
        }
    }
}

/// What [`Inventory::observe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    New,
    Updated,
    /// The node belongs to another cluster and was ignored.
    OtherCluster,
}

/// Nodes of one cluster, keyed by node id. Pure bookkeeping: times are passed in.
#[derive(Debug, Clone)]
pub struct Inventory {
    cluster_id: String,
    expiry: Duration,
    nodes: BTreeMap<String, NodeEntry>,
}

impl Inventory {
    pub fn new(cluster_id: impl Into<String>, expiry: Duration) -> Self {
        Inventory {
            cluster_id: cluster_id.into(),
            expiry,
            nodes: BTreeMap::new(),
        }
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Records an announcement (mDNS) or a `Hello` reply (static peer).
    pub fn observe(
        &mut self,
        advert: Advert,
        mut addrs: Vec<SocketAddr>,
        source: Source,
        instance: Option<String>,
        now: Instant,
    ) -> Observed {
        if advert.cluster_id != self.cluster_id {
            tracing::debug!(
                node = %advert.name,
                id = %advert.id,
                cluster = %advert.cluster_id,
                "ignoring a node of another cluster"
            );
            return Observed::OtherCluster;
        }
        addrs.sort_by_key(|a| (a.ip().is_loopback(), a.is_ipv6(), *a));
        addrs.dedup();
        match self.nodes.get_mut(&advert.id) {
            Some(entry) => {
                if !entry.sources.contains(&source) {
                    entry.sources.push(source);
                    entry.sources.sort();
                }
                if source == Source::Mdns {
                    entry.instance = instance;
                }
                for a in addrs {
                    if !entry.control_addrs.contains(&a) {
                        entry.control_addrs.push(a);
                    }
                }
                entry.advert = advert;
                entry.last_seen = now;
                Observed::Updated
            }
            None => {
                tracing::info!(node = %advert.name, id = %advert.id, ?source, "node discovered");
                self.nodes.insert(
                    advert.id.clone(),
                    NodeEntry {
                        advert,
                        control_addrs: addrs,
                        sources: vec![source],
                        age_s: 0.0,
                        last_seen: now,
                        instance,
                    },
                );
                Observed::New
            }
        }
    }

    /// Marks a node alive (e.g. on a heartbeat); false if unknown.
    pub fn touch(&mut self, id: &str, now: Instant) -> bool {
        self.nodes.get_mut(id).map(|e| e.last_seen = now).is_some()
    }

    /// Forgets the node that announced `instance` (an mDNS goodbye).
    pub fn remove_instance(&mut self, instance: &str) -> Option<NodeEntry> {
        let id = self
            .nodes
            .iter()
            .find(|(_, e)| e.instance.as_deref() == Some(instance))
            .map(|(id, _)| id.clone())?;
        let entry = self.nodes.remove(&id)?;
        tracing::info!(node = %entry.advert.name, id = %id, "node left (mDNS goodbye)");
        Some(entry)
    }

    pub fn remove(&mut self, id: &str) -> Option<NodeEntry> {
        self.nodes.remove(id)
    }

    /// Drops nodes not heard from within the expiry; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<NodeEntry> {
        let expiry = self.expiry;
        let stale: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_seen) > expiry)
            .map(|(id, _)| id.clone())
            .collect();
        stale
            .into_iter()
            .filter_map(|id| {
                let e = self.nodes.remove(&id)?;
                tracing::info!(node = %e.advert.name, id = %id, "node expired");
                Some(e)
            })
            .collect()
    }

    /// The fresh nodes, by name, with their age at `now`.
    pub fn snapshot(&self, now: Instant) -> Vec<NodeEntry> {
        let mut nodes: Vec<NodeEntry> = self
            .nodes
            .values()
            .filter(|e| now.saturating_duration_since(e.last_seen) <= self.expiry)
            .cloned()
            .map(|mut e| {
                e.age_s = now.saturating_duration_since(e.last_seen).as_secs_f64();
                e
            })
            .collect();
        nodes.sort_by(|a, b| (&a.advert.name, &a.advert.id).cmp(&(&b.advert.name, &b.advert.id)));
        nodes
    }
}

/// A worker's mDNS advertisement, refreshed in the background until dropped.
pub struct Advertiser {
    daemon: ServiceDaemon,
    fullname: String,
    advert: Arc<Mutex<Advert>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn service_info(advert: &Advert, seq: u64) -> Result<ServiceInfo, mdns_sd::Error> {
    let short: String = advert.id.chars().take(8).collect();
    // Unique per node even where two machines share a name.
    let instance = format!("{}-{short}", advert.name);
    let host = format!("baton-{short}.local.");
    let txt = advert.txt(seq);
    let info = ServiceInfo::new(
        SERVICE_TYPE,
        &instance,
        &host,
        (),
        advert.control_port,
        &txt[..],
    )?;
    Ok(info.enable_addr_auto())
}

impl Advertiser {
    /// Announces `advert` now and again every `refresh`.
    pub fn start(advert: Advert, refresh: Duration) -> Result<Self, DiscoveryError> {
        let daemon = ServiceDaemon::new()?;
        let info = service_info(&advert, 0)?;
        let fullname = info.get_fullname().to_string();
        daemon.register(info)?;
        let advert = Arc::new(Mutex::new(advert));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (daemon, advert, stop) = (daemon.clone(), advert.clone(), stop.clone());
            std::thread::Builder::new()
                .name("baton-mdns-advertise".into())
                .spawn(move || {
                    let tick = Duration::from_millis(50);
                    let mut seq = 0u64;
                    let mut next = Instant::now() + refresh;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        if Instant::now() < next {
                            continue;
                        }
                        next = Instant::now() + refresh;
                        seq += 1;
                        let current = advert.lock().map(|a| a.clone());
                        let Ok(current) = current else { break };
                        match service_info(&current, seq).map(|i| daemon.register(i)) {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) | Err(e) => tracing::warn!("mDNS re-announce: {e}"),
                        }
                    }
                })
                .map_err(DiscoveryError::Thread)?
        };
        Ok(Advertiser {
            daemon,
            fullname,
            advert,
            stop,
            thread: Some(thread),
        })
    }

    /// Replaces what is announced (e.g. available memory); goes out at the next refresh.
    pub fn update(&self, advert: Advert) {
        if let Ok(mut a) = self.advert.lock() {
            *a = advert;
        }
    }

    /// The mDNS instance name announced.
    pub fn fullname(&self) -> &str {
        &self.fullname
    }
}

impl Drop for Advertiser {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Unregistering sends a goodbye, so browsers drop the node at once.
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// The head's browser: fills a shared [`Inventory`] in the background until dropped.
pub struct Browser {
    daemon: ServiceDaemon,
    inventory: Arc<Mutex<Inventory>>,
    thread: Option<JoinHandle<()>>,
}

fn observe_resolved(inventory: &Mutex<Inventory>, service: &mdns_sd::ResolvedService) {
    let lookup = |k: &str| service.get_property_val_str(k).map(str::to_string);
    let advert = match Advert::from_txt(lookup) {
        Ok(a) => a,
        Err(reason) => {
            tracing::debug!(instance = %service.fullname, "ignoring a malformed TXT record: {reason}");
            return;
        }
    };
    let addrs = service
        .get_addresses()
        .iter()
        .map(|ip| SocketAddr::new(ip.to_ip_addr(), advert.control_port))
        .collect();
    if let Ok(mut inv) = inventory.lock() {
        inv.observe(
            advert,
            addrs,
            Source::Mdns,
            Some(service.fullname.clone()),
            Instant::now(),
        );
    }
}

impl Browser {
    /// Starts browsing for nodes of `cluster_id`; nodes not heard from for `expiry` are dropped.
    pub fn start(cluster_id: &str, expiry: Duration) -> Result<Self, DiscoveryError> {
        let daemon = ServiceDaemon::new()?;
        let events = daemon.browse(SERVICE_TYPE)?;
        let inventory = Arc::new(Mutex::new(Inventory::new(cluster_id, expiry)));
        let thread = {
            let inventory = inventory.clone();
            std::thread::Builder::new()
                .name("baton-mdns-browse".into())
                .spawn(move || loop {
                    match events.recv_timeout(Duration::from_millis(250)) {
                        Ok(ServiceEvent::ServiceResolved(service)) => {
                            observe_resolved(&inventory, &service)
                        }
                        Ok(ServiceEvent::ServiceRemoved(_, fullname)) => {
                            if let Ok(mut inv) = inventory.lock() {
                                inv.remove_instance(&fullname);
                            }
                        }
                        Ok(_) => {}
                        Err(mdns_sd::RecvTimeoutError::Timeout) => {
                            if let Ok(mut inv) = inventory.lock() {
                                inv.expire(Instant::now());
                            }
                        }
                        Err(mdns_sd::RecvTimeoutError::Disconnected) => break,
                    }
                })
                .map_err(DiscoveryError::Thread)?
        };
        Ok(Browser {
            daemon,
            inventory,
            thread: Some(thread),
        })
    }

    /// The shared inventory, for merging static peers and touching on heartbeats.
    pub fn inventory(&self) -> Arc<Mutex<Inventory>> {
        self.inventory.clone()
    }

    /// The fresh nodes now.
    pub fn snapshot(&self) -> Vec<NodeEntry> {
        self.inventory
            .lock()
            .map(|i| i.snapshot(Instant::now()))
            .unwrap_or_default()
    }

    /// Waits until `done` holds for the snapshot, or `timeout` passes; returns the last snapshot.
    pub fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&[NodeEntry]) -> bool,
    ) -> Vec<NodeEntry> {
        let deadline = Instant::now() + timeout;
        loop {
            let nodes = self.snapshot();
            if done(&nodes) || Instant::now() >= deadline {
                return nodes;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.daemon.stop_browse(SERVICE_TYPE);
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Browses for `duration` and returns the nodes of `cluster_id` found (for `baton plan`).
pub fn browse_for(cluster_id: &str, duration: Duration) -> Result<Vec<NodeEntry>, DiscoveryError> {
    let browser = Browser::start(cluster_id, duration.max(Duration::from_secs(60)))?;
    std::thread::sleep(duration);
    Ok(browser.snapshot())
}

/// Asks each static peer (`host:port`) for its `Hello` over the secure control channel and adds
/// it to `inventory`. Returns the peers that could not be reached or refused, with why.
pub async fn probe_static_peers(
    peers: &[String],
    inventory: &Mutex<Inventory>,
    security: &baton_proto::ControlSecurity,
    timeout: Duration,
) -> Vec<(String, String)> {
    let mut failed = Vec::new();
    let cluster_id = match inventory.lock() {
        Ok(inv) => inv.cluster_id().to_string(),
        Err(_) => return vec![],
    };
    for peer in peers {
        match hello(peer, &cluster_id, security, timeout).await {
            Ok((info, addrs, port)) => {
                let advert = Advert::from_node_info(&info, port);
                if let Ok(mut inv) = inventory.lock() {
                    if inv.observe(advert, addrs, Source::Static, None, Instant::now())
                        == Observed::OtherCluster
                    {
                        failed.push((
                            peer.clone(),
                            format!(
                                "belongs to cluster {} (ours is {})",
                                info.cluster_id,
                                inv.cluster_id()
                            ),
                        ));
                    }
                }
            }
            Err(e) => failed.push((peer.clone(), e)),
        }
    }
    failed
}

/// Whether `peer` (found over mDNS, where anyone may advertise any cluster id) proves the
/// cluster key and is the node `id` of cluster `cluster_id`; why not otherwise.
pub async fn verify_member(
    peer: &str,
    id: &str,
    cluster_id: &str,
    security: &baton_proto::ControlSecurity,
    timeout: Duration,
) -> Result<(), String> {
    let (info, _, _) = hello(peer, cluster_id, security, timeout).await?;
    if info.cluster_id != cluster_id {
        return Err(format!("belongs to cluster {}", info.cluster_id));
    }
    if info.id != id {
        return Err(format!("is node {}, the advertisement said {id}", info.id));
    }
    Ok(())
}

async fn hello(
    peer: &str,
    cluster_id: &str,
    security: &baton_proto::ControlSecurity,
    timeout: Duration,
) -> Result<(baton_proto::pb::NodeInfo, Vec<SocketAddr>, u16), String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(peer)
        .await
        .map_err(|e| format!("cannot resolve: {e}"))?
        .collect();
    let first = *addrs.first().ok_or("resolves to no address")?;
    let port = first.port();
    let request = baton_proto::pb::HelloRequest {
        protocol: Some(baton_proto::local_protocol()),
        version: env!("CARGO_PKG_VERSION").to_string(),
        cluster_id: cluster_id.to_string(),
        ..Default::default()
    };
    let call = async {
        let mut client = baton_proto::connect(first, security, timeout)
            .await
            .map_err(|e| match e {
                baton_proto::SecureError::Refused(why) => {
                    format!("refused: it does not hold this cluster's key ({why})")
                }
                e => format!("cannot connect: {e}"),
            })?;
        client
            .hello(request)
            .await
            .map_err(|e| format!("hello failed: {}", e.message()))
    };
    let reply = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??
        .into_inner();
    let info = reply.node.ok_or("hello reply without node info")?;
    Ok((info, addrs, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advert(id: &str, name: &str, cid: &str) -> Advert {
        Advert {
            id: id.into(),
            name: name.into(),
            version: "0.1.0".into(),
            cluster_id: cid.into(),
            control_port: 8422,
            total_memory: 64 << 30,
            available_memory: 60 << 30,
            backend: "metal".into(),
            transports: vec!["rdma".into(), "tcp".into()],
            bandwidth: None,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn txt_round_trips() {
        let mut a = advert("00ff", "mac-1", "abcd");
        a.bandwidth = Some(400_000_000_000);
        let txt: BTreeMap<String, String> = a.txt(7).into_iter().collect();
        assert_eq!(txt["seq"], "7");
        assert!(txt.iter().all(|(k, v)| k.len() + v.len() < 255));
        assert_eq!(Advert::from_txt(|k| txt.get(k).cloned()).unwrap(), a);
        let err = Advert::from_txt(|k| (k != "cid").then(|| txt[k].clone())).unwrap_err();
        assert_eq!(err, "missing `cid`");
    }

    #[test]
    fn inventory_merges_ignores_other_clusters_and_expires() {
        let t0 = Instant::now();
        let mut inv = Inventory::new("ours", Duration::from_secs(10));
        assert_eq!(
            inv.observe(
                advert("1", "a", "ours"),
                vec![addr("[fe80::1]:8422"), addr("10.0.0.1:8422")],
                Source::Mdns,
                Some("a-1".into()),
                t0
            ),
            Observed::New
        );
        assert_eq!(
            inv.observe(advert("2", "b", "theirs"), vec![], Source::Mdns, None, t0),
            Observed::OtherCluster
        );
        // The same node reached as a static peer merges into one entry.
        assert_eq!(
            inv.observe(
                advert("1", "a", "ours"),
                vec![addr("10.0.0.1:8422")],
                Source::Static,
                None,
                t0
            ),
            Observed::Updated
        );
        inv.observe(advert("3", "c", "ours"), vec![], Source::Static, None, t0);
        let snap = inv.snapshot(t0 + Duration::from_secs(2));
        assert_eq!(snap.len(), 2);
        assert_eq!(snap[0].sources, vec![Source::Mdns, Source::Static]);
        assert_eq!(
            snap[0].control_addrs,
            vec![addr("10.0.0.1:8422"), addr("[fe80::1]:8422")]
        );
        assert_eq!(snap[0].instance.as_deref(), Some("a-1"));
        assert!((snap[0].age_s - 2.0).abs() < 1e-6);

        assert!(inv.touch("3", t0 + Duration::from_secs(8)));
        assert!(!inv.touch("2", t0));
        let gone = inv.expire(t0 + Duration::from_secs(11));
        assert_eq!(
            gone.iter()
                .map(|e| e.advert.name.as_str())
                .collect::<Vec<_>>(),
            vec!["a"]
        );
        assert_eq!(inv.snapshot(t0 + Duration::from_secs(11)).len(), 1);
        assert!(inv.remove_instance("a-1").is_none());
    }

    #[test]
    fn goodbye_removes_by_instance() {
        let t0 = Instant::now();
        let mut inv = Inventory::new("ours", Duration::from_secs(10));
        inv.observe(
            advert("1", "a", "ours"),
            vec![],
            Source::Mdns,
            Some("a-1._baton._tcp.local.".into()),
            t0,
        );
        assert_eq!(
            inv.remove_instance("a-1._baton._tcp.local.")
                .unwrap()
                .advert
                .id,
            "1"
        );
        assert!(inv.snapshot(t0).is_empty());
    }

    #[test]
    fn capacity_applies_config_overrides() {
        let entry = NodeEntry {
            advert: advert("1", "a", "ours"),
            control_addrs: vec![],
            sources: vec![Source::Mdns],
            age_s: 0.0,
            last_seen: Instant::now(),
            instance: None,
        };
        let config = ClusterConfig::default();
        let cap = entry.capacity(&config);
        assert_eq!(cap.available_bytes, 60 << 30);
        assert_eq!(
            cap.headroom_bytes,
            crate::config::Headroom::Percent(10.0).resolve(64 << 30)
        );
        assert_eq!(cap.bandwidth_bytes_per_s, default_bandwidth("metal"));

        let config: ClusterConfig = toml::from_str(
            "[nodes.a]\nmemory = \"32G\"\nmemory_bandwidth = \"100GB/s\"\nmemory_headroom = \"1G\"",
        )
        .unwrap();
        let cap = entry.capacity(&config);
        assert_eq!(
            (cap.available_bytes, cap.headroom_bytes),
            (32 << 30, 1 << 30)
        );
        assert_eq!(cap.bandwidth_bytes_per_s, 100_000_000_000);
    }
}
