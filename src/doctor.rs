//! `baton doctor`: checks this machine's data-plane transports, the RDMA gate step by step.

use std::net::IpAddr;
use std::path::PathBuf;

use baton_transport::negotiate::{local_pair, NegotiateOptions, Preference};
use baton_transport::rdma::{self, RdmaConfig};
use baton_transport::{ClusterKey, LinkConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Verbs library to load (default: $BATON_RDMA_LIB, then libibverbs.so.1 / librdma.dylib).
    #[arg(long)]
    pub rdma_lib: Option<PathBuf>,
    /// RDMA device to check (default: the one for the interface holding --local-ip, else the first).
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// Local IPv4 address of the Thunderbolt interface, to pick the device and GID it routes by.
    #[arg(long)]
    pub local_ip: Option<IpAddr>,
    /// Use baton's emulated verbs provider (for trying the checks without hardware).
    #[arg(long)]
    pub emulated: bool,
    /// Skip the loopback link negotiation.
    #[arg(long)]
    pub no_loopback: bool,
}

pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let mut rc = RdmaConfig { library: args.rdma_lib.clone(), device: args.rdma_device.clone(), ..RdmaConfig::default() };
    if args.emulated {
        let p = rdma::emulated_provider_path()
            .ok_or_else(|| anyhow::anyhow!("this build has no emulated verbs provider"))?;
        rc.library.get_or_insert_with(|| p.into());
        rc.device.get_or_insert_with(|| "rdma_emu0".into());
    }
    println!("RDMA gate (local steps), library {}:", rdma::library_path(&rc).display());
    let local_ip = args.local_ip;
    let rc2 = rc.clone();
    let gate = tokio::task::spawn_blocking(move || rdma::local_gate(&rc2, local_ip)).await?;
    match &gate {
        Ok(steps) => {
            for (step, detail) in steps {
                println!("  ok    {step}: {detail}");
            }
            println!("  RDMA is usable on this end; queue pairs and the ping-pong are checked when a link is set up.");
        }
        Err(e) => {
            println!("  FAIL  {e}");
            println!("  Links fall back to QUIC or TCP (and say so).");
        }
    }
    if args.no_loopback {
        return Ok(());
    }
    println!("Loopback link negotiation (auto):");
    let mut cfg = LinkConfig::new(ClusterKey::from_bytes(&rand::random::<[u8; 32]>())?);
    cfg.rdma = rc;
    let opts = NegotiateOptions { preference: Preference::Auto, ..NegotiateOptions::default() };
    let (a, _b) = local_pair(&cfg, &opts).await?;
    println!("  {}", a.report);
    for p in &a.report.probes {
        println!("  probe {:>5} {:>8} B: RTT p50 {:.1} µs", p.transport.to_string(), p.size_bytes, p.rtt_p50_us);
    }
    a.link.close("doctor done").await;
    Ok(())
}
