//! `baton drain`, `baton join` and `baton rebalance`: an operator's requests to a running head,
//! over its operator service (TLS with the cluster key, like every control connection).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use baton_cluster::key::ClusterKey;
use baton_head::status::STATUS_FILE;
use baton_head::ClusterStatus;
use baton_proto::pb;

/// How to reach the head.
#[derive(clap::Args)]
pub struct HeadFlags {
    /// The head's operator service, `host:port`; default: the address in the head's status file
    /// (`baton status` shows it).
    #[arg(long)]
    pub head: Option<SocketAddr>,
    /// State directory of the head (status file, cluster key); default as for the head.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Cluster key file; default: <state dir>/cluster.key.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct DrainArgs {
    /// The worker to take out of the chain: its name or control endpoint.
    pub node: String,
    #[command(flatten)]
    pub head: HeadFlags,
}

#[derive(clap::Args)]
pub struct JoinArgs {
    /// The new worker's control endpoint, `host:port`.
    pub endpoint: String,
    #[command(flatten)]
    pub head: HeadFlags,
}

#[derive(clap::Args)]
pub struct RebalanceArgs {
    #[command(flatten)]
    pub head: HeadFlags,
}

/// Re-plans can load shards: give them time.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);

async fn client(flags: &HeadFlags) -> Result<pb::head_client::HeadClient<tonic::transport::Channel>> {
    let dir = match &flags.state_dir {
        Some(d) => d.clone(),
        None => baton_cluster::identity::default_state_dir()?,
    };
    let addr = match flags.head {
        Some(a) => a,
        None => {
            let path = dir.join(STATUS_FILE);
            let status = ClusterStatus::read(&path).with_context(|| format!("no head status at {} (give --head host:port)", path.display()))?;
            status.control.parse().with_context(|| format!("{} names no operator service (give --head host:port)", path.display()))?
        }
    };
    let key_file = flags.key_file.clone().unwrap_or_else(|| dir.join("cluster.key"));
    let key = ClusterKey::load(&key_file)?;
    let security = baton_proto::ControlSecurity::new(key.as_bytes())?;
    let channel = baton_proto::channel(addr, &security, Duration::from_secs(5)).await.with_context(|| format!("connecting to the head at {addr}"))?;
    Ok(baton_proto::head_client(channel))
}

fn print_replan(what: &str, r: &pb::ReplanReply) {
    println!("{what}: {} stream(s) resumed after a {} ms pause", r.resumed_sequences, r.pause_ms);
    for s in &r.stages {
        println!("  stage {s}");
    }
}

fn refused(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("the head refused: {}", s.message())
}

pub async fn drain(args: DrainArgs) -> Result<()> {
    let mut c = client(&args.head).await?;
    let r = tokio::time::timeout(CALL_TIMEOUT, c.drain_node(pb::DrainNodeRequest { node: args.node.clone() })).await.context("the head did not answer")?.map_err(refused)?;
    print_replan(&format!("{} drained; it may be stopped now", args.node), r.get_ref());
    Ok(())
}

pub async fn join(args: JoinArgs) -> Result<()> {
    let mut c = client(&args.head).await?;
    let r = tokio::time::timeout(CALL_TIMEOUT, c.join_node(pb::JoinNodeRequest { endpoint: args.endpoint.clone() })).await.context("the head did not answer")?.map_err(refused)?;
    println!("{} ({}) joined: {}", r.get_ref().name, args.endpoint, r.get_ref().message);
    Ok(())
}

pub async fn rebalance(args: RebalanceArgs) -> Result<()> {
    let mut c = client(&args.head).await?;
    let r = tokio::time::timeout(CALL_TIMEOUT, c.rebalance(pb::RebalanceRequest {})).await.context("the head did not answer")?.map_err(refused)?;
    print_replan("re-planned", r.get_ref());
    Ok(())
}
