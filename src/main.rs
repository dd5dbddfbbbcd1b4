//! `baton`: serve one LLM across several machines by pipeline parallelism.

mod bench_generate;
mod bench_serve;
mod bench_transport;
mod cluster_cmds;
mod discover;
mod doctor;
mod generate;
mod inspect;
mod models;
mod operate;
mod plan;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "baton", version, about = "Serve one large language model across several machines by pipeline parallelism")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text on this machine, optionally as N in-process shards.
    Generate(generate::GenerateArgs),
    /// Print a model's manifest (per-layer bytes, KV cost) from its headers.
    Inspect(inspect::InspectArgs),
    /// Place a model's layers on nodes without loading weights.
    Plan(plan::PlanArgs),
    /// Check this machine's transports, RDMA gate step by step.
    Doctor(doctor::DoctorArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Serve a stage: wait for a head to load layers and link the chain.
    Worker(cluster_cmds::WorkerArgs),
    /// Run the head: connect workers, place and load layers, run requests through the chain.
    Head(cluster_cmds::HeadArgs),
    /// Everything on this machine: head + N worker processes on loopback.
    Serve(cluster_cmds::ServeArgs),
    /// Nodes, stages, layer ranges, memory and links of the running head.
    Status(cluster_cmds::StatusArgs),
    /// Take a worker out of the running chain (streams pause and resume); then it may be stopped.
    Drain(operate::DrainArgs),
    /// Make a new worker known to the running head; it is used at the next re-plan.
    Join(operate::JoinArgs),
    /// Re-plan the running chain over every known worker now (streams pause and resume).
    Rebalance(operate::RebalanceArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode speed against the memory-bandwidth roofline.
    Generate(bench_generate::BenchGenerateArgs),
    /// Latency and throughput of every transport, against a raw socket baseline.
    Transport(bench_transport::BenchTransportArgs),
    /// Load against a running OpenAI-compatible API: tok/s, time to first token, inter-token
    /// latency, with N concurrent clients and one long prompt mid-run.
    Serve(bench_serve::BenchServeArgs),
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Doctor(args) => runtime()?.block_on(doctor::run(args)),
        Command::Bench(BenchCommand::Generate(args)) => bench_generate::run(args),
        Command::Bench(BenchCommand::Transport(args)) => runtime()?.block_on(bench_transport::run(args)),
        Command::Bench(BenchCommand::Serve(args)) => runtime()?.block_on(bench_serve::run(args)),
        Command::Worker(args) => cluster_cmds::run_worker(args),
        Command::Head(args) => cluster_cmds::run_head(args),
        Command::Serve(args) => cluster_cmds::run_serve(args),
        Command::Status(args) => cluster_cmds::run_status(args),
        Command::Drain(args) => runtime()?.block_on(operate::drain(args)),
        Command::Join(args) => runtime()?.block_on(operate::join(args)),
        Command::Rebalance(args) => runtime()?.block_on(operate::rebalance(args)),
    }
}
