//! Decode speed of the tiny MoE fixtures, single shard vs split in-process, and where a decode
//! step's layer time goes (attention, routing, experts, dense MLP).
//!
//! ```sh
//! cargo run --release -p baton-model --example moe_decode [-- TOKENS [FIXTURE...]]
//! ```
//! Decoding is greedy from an 8-token prompt, one sequence, f32 wire between shards. Timings
//! are process-wide ([`profile`]), so "other" is embedding, head, wire copies and bookkeeping.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_model::loader::ModelSource;
use baton_model::pipeline::{even_split, LocalPipeline, WireDType};
use baton_model::profile;
use baton_model::shard::{BatchInput, Logits, MicroBatch, SeqChunk};
use candle_core::Device;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let tokens: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let mut names: Vec<String> = args.collect();
    if names.is_empty() {
        names = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "qwen3"].map(String::from).to_vec();
    }
    // BATON_FIXTURES lets a copied binary run where the source tree lives elsewhere.
    let fixtures = std::env::var_os("BATON_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"));
    profile::enable();
    println!("| fixture | file | shards | decode tok/s | attention | routing | experts | dense MLP | other |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for name in &names {
        for file in ["model.safetensors", "model-q8_0.gguf"] {
            let source = ModelSource::open(&fixtures.join(name).join(file))?;
            let n_layers = source.config().n_layers;
            for shards in 1..=3 {
                let mut p = LocalPipeline::load(&source, &even_split(n_layers, shards)?, WireDType::F32, &Device::Cpu)?;
                let (elapsed, split) = decode(&mut p, tokens)?;
                let pct = |d: Duration| format!("{:.0} %", 100.0 * d.as_secs_f64() / elapsed.as_secs_f64());
                let other = elapsed.saturating_sub(split.attention + split.routing + split.experts + split.dense_mlp);
                println!(
                    "| {name} | {file} | {shards} | {:.0} | {} | {} | {} | {} | {} |",
                    tokens as f64 / elapsed.as_secs_f64(),
                    pct(split.attention),
                    pct(split.routing),
                    pct(split.experts),
                    pct(split.dense_mlp),
                    pct(other),
                );
            }
        }
    }
    Ok(())
}

/// Prefills 8 tokens, then decodes `tokens` greedily; returns the decode time and its profile.
fn decode(p: &mut LocalPipeline, tokens: usize) -> Result<(Duration, profile::Profile), Box<dyn std::error::Error>> {
    let prompt: Vec<u32> = vec![1, 60, 70, 80, 90, 100, 110, 120];
    p.open_sequence(1)?;
    let step = |p: &mut LocalPipeline, pos: usize, ids: Vec<u32>| {
        let batch = MicroBatch {
            seqs: vec![SeqChunk { seq_id: 1, start_pos: pos, n_tokens: ids.len() }],
            input: BatchInput::Tokens(ids),
        };
        let logits = p.forward(&batch, Logits::LastToken)?;
        Ok::<u32, baton_model::ModelError>(logits.get(0)?.argmax(0)?.to_scalar::<u32>()?)
    };
    let mut next = step(p, 0, prompt.clone())?;
    profile::take();
    let start = Instant::now();
    for i in 0..tokens {
        next = step(p, prompt.len() + i, vec![next])?;
    }
    let elapsed = start.elapsed();
    let split = profile::take();
    p.close_sequence(1)?;
    Ok((elapsed, split))
}
