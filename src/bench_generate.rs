//! `baton bench generate`: prefill and decode speed, and how close decode comes to the
//! memory-bandwidth roofline (every decoded token reads every weight once).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use baton_model::generation::{generate, GenerateOptions};
use baton_model::loader::ModelSource;
use baton_model::pipeline::{even_split, LocalPipeline, WireDType};
use baton_model::sampling::SamplingParams;
use rayon::prelude::*;
use serde::Serialize;

#[derive(clap::Args)]
pub struct BenchGenerateArgs {
    /// GGUF file or HF safetensors directory; default: the embedded model.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Best of this many runs.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Record {
    model: String,
    prompt_tokens: usize,
    prefill_tok_s: f64,
    decode_tokens: usize,
    decode_tok_s: f64,
    bytes_per_token: u64,
    mem_bw_gb_s: f64,
    roofline_tok_s: f64,
    roofline_ratio: f64,
}

/// Best-of-5 parallel read bandwidth over a buffer far larger than the caches, in GB/s.
fn memory_read_bandwidth() -> f64 {
    const WORDS: usize = 512 << 20 >> 3;
    let buf: Vec<u64> = (0..WORDS as u64).collect();
    let chunk = WORDS / rayon::current_num_threads().max(1) / 16;
    (0..5)
        .map(|_| {
            let start = Instant::now();
            let sum: u64 = buf
                .par_chunks(chunk.max(1))
                .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                .reduce(|| 0, u64::wrapping_add);
            std::hint::black_box(sum);
            (WORDS * 8) as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

pub fn run(args: BenchGenerateArgs) -> Result<()> {
    let path = crate::models::resolve(args.model)?;
    let device = crate::models::device(&args.device)?;
    let source = ModelSource::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let manifest = source.manifest();
    let mut pipeline = LocalPipeline::load(&source, &even_split(manifest.n_layers, 1)?, WireDType::F32, &device)?;
    // Speed does not depend on which tokens flow, so the prompt is synthetic.
    let vocab = manifest.vocab_size as u32;
    let prompt: Vec<u32> = (0..args.prompt_tokens as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let opts = GenerateOptions {
        max_tokens: args.decode_tokens,
        sampling: SamplingParams::default(),
        prefill_chunk: args.prompt_tokens,
    };
    let (mut prefill, mut decode) = (0f64, 0f64);
    for run in 0..args.runs.max(1) {
        // No stop tokens: every run decodes exactly the requested count.
        let g = generate(&mut pipeline, run as u64, &prompt, &[], &opts, |_| {})?;
        prefill = prefill.max(g.prefill_tok_s());
        decode = decode.max(g.decode_tok_s());
    }
    // A decoded token reads every layer and the output projection once; the embedding row and
    // the short KV cache are negligible beside them.
    let bytes_per_token = manifest.layer_bytes.iter().sum::<u64>() + manifest.head_bytes;
    let bw = memory_read_bandwidth();
    let roofline = bw * 1e9 / bytes_per_token as f64;
    let record = Record {
        model: manifest.name.clone().unwrap_or_else(|| path.display().to_string()),
        prompt_tokens: prompt.len(),
        prefill_tok_s: prefill,
        decode_tokens: args.decode_tokens,
        decode_tok_s: decode,
        bytes_per_token,
        mem_bw_gb_s: bw,
        roofline_tok_s: roofline,
        roofline_ratio: decode / roofline,
    };
    if args.json {
        println!("{}", serde_json::to_string(&record)?);
    } else {
        println!("model            {}", record.model);
        println!("prefill          {:.1} tok/s ({} tokens)", record.prefill_tok_s, record.prompt_tokens);
        println!("decode           {:.1} tok/s ({} tokens)", record.decode_tok_s, record.decode_tokens);
        println!("bytes per token  {:.1} MB", record.bytes_per_token as f64 / 1e6);
        println!("memory bandwidth {:.1} GB/s (measured, parallel read)", record.mem_bw_gb_s);
        println!("roofline         {:.1} tok/s", record.roofline_tok_s);
        println!("ratio            {:.0} % of roofline", record.roofline_ratio * 100.0);
    }
    Ok(())
}
