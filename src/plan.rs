//! `baton plan`: where each layer would go, without loading any weights. Nodes come from
//! `--nodes` or, without it, from the cluster: mDNS for a bounded time plus the static peers of
//! `cluster.toml`.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use baton_cluster::config::{ClusterConfig, Headroom};
use baton_cluster::discovery::{self, Inventory, Source};
use baton_cluster::key::ClusterKey;
use baton_cluster::planner::{self, NodeCapacity, PlanError, PlanOptions};
use baton_cluster::units;
use baton_model::loader::read_manifest;
use baton_model::manifests;

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// GGUF file (any part of a split set) or HF safetensors directory; default: the embedded
    /// model. `published:NAME` plans a published model from its config, without its files
    /// (`published:deepseek-v3-671b-q4_k_m`, `published:deepseek-r1-671b-q4_k_m`,
    /// `published:kimi-k2-q4_k_m`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Nodes as NAME:MEMORY[:BANDWIDTH], comma-separated, in pipeline order, e.g.
    /// `a:64G:800,b:64G,c:24GiB:120`. MEMORY: G/GiB = 2^30 bytes, GB = 10^9. BANDWIDTH in GB/s
    /// (default 400). Without it: the nodes discovered over mDNS plus the static peers.
    #[arg(long, value_delimiter = ',', value_parser = parse_node)]
    pub nodes: Vec<NodeCapacity>,
    /// Tokens per sequence the KV cache is sized for; default: cluster.toml's `kv.context_length`.
    #[arg(long)]
    pub context: Option<u64>,
    /// Concurrent sequences; default: cluster.toml's `kv.sequences`.
    #[arg(long)]
    pub sequences: Option<u64>,
    /// Memory kept free per node (`10%`, `4GiB`); default: cluster.toml's `memory_headroom`.
    #[arg(long)]
    pub headroom: Option<Headroom>,
    /// Largest micro-batch in tokens, for activation buffers.
    #[arg(long, default_value_t = 512)]
    pub batch_tokens: u64,
    /// Give every node at least one layer.
    #[arg(long)]
    pub use_all_nodes: bool,
    /// The first node serves stage 0 (as the head does when it runs a stage).
    #[arg(long)]
    pub pin_first: bool,
    /// Ignore manual `layers` ranges in cluster.toml and search.
    #[arg(long)]
    pub ignore_manual: bool,
    /// How long to browse mDNS when `--nodes` is not given, in milliseconds; default:
    /// cluster.toml's `discovery.browse_ms`.
    #[arg(long)]
    pub browse_ms: Option<u64>,
    /// cluster.toml to use; default: $BATON_CONFIG, else ~/.config/baton/cluster.toml if present.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the plan (or the shortfall) as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Bandwidth assumed for `--nodes` entries that give none.
const DEFAULT_CLI_BANDWIDTH: u64 = 400_000_000_000;

/// `NAME:MEMORY[:BANDWIDTH]`; headroom is filled in later from `--headroom` or the config.
fn parse_node(s: &str) -> Result<NodeCapacity, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (name, mem, bw) = match parts.as_slice() {
        [name, mem] => (*name, *mem, None),
        [name, mem, bw] => (*name, *mem, Some(*bw)),
        _ => {
            return Err(format!(
                "`{s}`: expected NAME:MEMORY[:BANDWIDTH], e.g. mac1:64G:400"
            ))
        }
    };
    if name.trim().is_empty() {
        return Err(format!("`{s}`: empty node name"));
    }
    Ok(NodeCapacity {
        name: name.trim().to_string(),
        available_bytes: units::parse_bytes(mem)?,
        headroom_bytes: 0,
        bandwidth_bytes_per_s: match bw {
            Some(bw) => units::parse_bandwidth(bw)?,
            None => DEFAULT_CLI_BANDWIDTH,
        },
    })
}

pub fn run(args: PlanArgs) -> Result<()> {
    let config = ClusterConfig::load_or_default(args.config.as_deref())?;
    let published = args.model.as_deref().and_then(|m| m.to_str()).and_then(|m| m.strip_prefix("published:"));
    let (manifest, source) = match published {
        Some(name) => {
            let manifest = manifests::by_name(name).with_context(|| {
                format!("no published model `{name}`; known: {}", manifests::NAMES.join(", "))
            })?;
            (manifest, name.to_string())
        }
        None => {
            let path = crate::models::resolve(args.model.clone())?;
            let manifest = read_manifest(&path).with_context(|| format!("reading {}", path.display()))?;
            (manifest, path.display().to_string())
        }
    };

    let nodes = if args.nodes.is_empty() {
        discovered_nodes(&config, &args)?
    } else {
        let mut names = std::collections::BTreeSet::new();
        for n in &args.nodes {
            if !names.insert(n.name.as_str()) {
                bail!("node `{}` is listed twice in --nodes", n.name);
            }
        }
        args.nodes
            .iter()
            .map(|n| {
                let headroom = args
                    .headroom
                    .unwrap_or_else(|| config.headroom_for(&n.name));
                NodeCapacity {
                    headroom_bytes: headroom.resolve(n.available_bytes),
                    ..n.clone()
                }
            })
            .collect()
    };

    let mut budget = config.serving_budget(manifest.context_length as u64);
    if let Some(c) = args.context {
        budget.context_length = c;
    }
    if let Some(s) = args.sequences {
        budget.sequences = s;
    }
    if budget.context_length == 0 || budget.sequences == 0 {
        bail!("--context and --sequences must be at least 1");
    }
    let opts = PlanOptions {
        max_batch_tokens: args.batch_tokens,
        use_all_nodes: args.use_all_nodes,
        pin_first: args.pin_first,
        manual: if args.ignore_manual {
            None
        } else {
            config.manual_stages()
        },
        ..PlanOptions::default()
    };

    let name = manifest
        .name
        .clone()
        .unwrap_or(source);
    match planner::plan(&manifest, &nodes, &budget, &opts) {
        Ok(plan) if args.json => println!("{}", serde_json::to_string_pretty(&plan)?),
        Ok(plan) => {
            println!(
                "{name}: {} layers, {} of weights, over {} of {} node(s)\n",
                manifest.n_layers,
                units::format_bytes(manifest.total_weight_bytes()),
                plan.stages.len(),
                nodes.len()
            );
            println!("{plan}");
        }
        Err(PlanError::DoesNotFit(shortfall)) if args.json => {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "error": "does_not_fit", "shortfall": shortfall })
                )?
            );
            bail!("{name} does not fit");
        }
        Err(e) => bail!("{name}: {e}"),
    }
    Ok(())
}

/// The cluster as the head would see it: mDNS for a bounded time plus the static peers.
fn discovered_nodes(config: &ClusterConfig, args: &PlanArgs) -> Result<Vec<NodeCapacity>> {
    let key_file = config.key_file()?;
    let key = ClusterKey::load(&key_file)
        .with_context(|| "planning over the discovered cluster needs its key (or give --nodes)")?;
    let cluster_id = key.cluster_id();
    let browse = Duration::from_millis(args.browse_ms.unwrap_or(config.discovery.browse_ms));
    let peers = config.peers.clone();
    let mdns = config.discovery.mdns;

    // Own thread and runtime: `run` may be called from inside an async runtime.
    let entries = std::thread::scope(|s| {
        s.spawn(|| -> Result<Vec<discovery::NodeEntry>> {
            let now = std::time::Instant::now;
            let inventory = Mutex::new(Inventory::new(
                cluster_id.clone(),
                Duration::from_secs(3600),
            ));
            if mdns {
                for e in discovery::browse_for(&cluster_id, browse)? {
                    if let Ok(mut inv) = inventory.lock() {
                        inv.observe(e.advert, e.control_addrs, Source::Mdns, None, now());
                    }
                }
            }
            if !peers.is_empty() {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let timeout = browse.max(Duration::from_secs(2));
                let security = baton_proto::ControlSecurity::new(key.as_bytes())?;
                let failed = runtime.block_on(discovery::probe_static_peers(
                    &peers, &inventory, &security, timeout,
                ));
                for (peer, why) in failed {
                    eprintln!("static peer {peer}: {why}");
                }
            }
            let inventory = inventory.into_inner().unwrap_or_else(|e| e.into_inner());
            Ok(inventory.snapshot(now()))
        })
        .join()
        .unwrap_or_else(|_| bail!("discovery thread panicked"))
    })?;
    if entries.is_empty() {
        bail!(
            "no nodes found in {} ms of mDNS browsing{}; give --nodes NAME:MEMORY[:BW],... to plan without a cluster",
            browse.as_millis(),
            if peers.is_empty() { String::new() } else { format!(" or among {} static peer(s)", peers.len()) }
        );
    }
    Ok(entries
        .iter()
        .map(|e| {
            let mut cap = e.capacity(config);
            if let Some(h) = args.headroom {
                cap.headroom_bytes = h.resolve(e.advert.total_memory.max(cap.available_bytes));
            }
            cap
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_specs() {
        let n = parse_node("mac1:64G:800").unwrap();
        assert_eq!(
            (n.name.as_str(), n.available_bytes, n.bandwidth_bytes_per_s),
            ("mac1", 64 << 30, 800_000_000_000)
        );
        assert_eq!(
            parse_node("b:24GiB").unwrap().bandwidth_bytes_per_s,
            DEFAULT_CLI_BANDWIDTH
        );
        assert!(parse_node("b").is_err());
        assert!(parse_node(":4G").is_err());
        assert!(parse_node("b:lots").unwrap_err().contains("lots"));
    }
}
