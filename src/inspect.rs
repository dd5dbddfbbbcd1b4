//! `baton inspect`: a model's manifest from its headers.

use std::path::PathBuf;

use anyhow::{Context, Result};
use baton_model::loader::read_manifest;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// GGUF file (any part of a split set) or HF safetensors directory; default: the embedded model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let path = crate::models::resolve(args.model)?;
    let m = read_manifest(&path).with_context(|| format!("reading {}", path.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    println!("model          {}", m.name.as_deref().unwrap_or("-"));
    println!("architecture   {} ({})", m.architecture, m.format);
    println!("layers         {}", m.n_layers);
    println!("hidden size    {}", m.hidden_size);
    println!("vocabulary     {}", m.vocab_size);
    println!("context        {}", m.context_length);
    println!("weights        {}", mib(m.total_weight_bytes()));
    println!("  embedding    {}", mib(m.embedding_bytes));
    println!("  head         {}", mib(m.head_bytes));
    let by_dtype: Vec<String> = m.bytes_by_dtype.iter().map(|(k, v)| format!("{k} {}", mib(*v))).collect();
    println!("  by type      {}", by_dtype.join(", "));
    println!("KV per token   {} per layer ({}), {} all layers", m.kv_bytes_per_token[0], m.kv_dtype, m.kv_bytes_per_token.iter().sum::<u64>());
    println!();
    println!("{:>5}  {:>12}  {:>14}", "layer", "bytes", "KV B/token");
    for (i, (b, kv)) in m.layer_bytes.iter().zip(&m.kv_bytes_per_token).enumerate() {
        println!("{i:>5}  {b:>12}  {kv:>14}");
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
