//! `baton generate`: text generation on this machine, optionally as N in-process shards.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use baton_model::chat::{ChatTemplate, Message};
use baton_model::generation::{generate, GenerateOptions};
use baton_model::loader::ModelSource;
use baton_model::pipeline::{even_split, LocalPipeline, WireDType};
use baton_model::sampling::SamplingParams;
use baton_model::tokenizer::{TextStream, Tokenizer};

#[derive(clap::Args, Clone)]
pub struct SamplingFlags {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub min_p: Option<f32>,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingFlags {
    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            ..SamplingParams::default()
        };
        p.validate()?;
        Ok(p)
    }
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// GGUF file or HF safetensors directory; default: the embedded model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Raw prompt, tokenized as is.
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    pub prompt: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    pub chat: Option<String>,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingFlags,
    /// Run the model as N shards in this process, hidden states crossing in the wire dtype.
    #[arg(long, default_value_t = 1)]
    pub split: usize,
    #[arg(long, default_value = "bf16")]
    pub wire_dtype: WireDType,
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// cpu, cuda or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Prompt token ids for a raw prompt or a chat message.
pub fn prompt_tokens(tokenizer: &Tokenizer, prompt: Option<&str>, chat: Option<&str>, system: Option<&str>) -> Result<Vec<u32>> {
    if let Some(text) = prompt {
        return Ok(tokenizer.encode(text, true)?);
    }
    let text = chat.context("either --prompt or --chat is required")?;
    let template = tokenizer
        .chat_template()
        .context("the model has no chat template; use --prompt")?;
    let template = ChatTemplate::new(template, tokenizer.bos_token(), tokenizer.eos_token())?;
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(Message { role: "system".into(), content: system.into() });
    }
    messages.push(Message { role: "user".into(), content: text.into() });
    let rendered = template.render(&messages, true)?;
    // The template already wrote any BOS it wants.
    Ok(tokenizer.encode(&rendered, false)?)
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let path = crate::models::resolve(args.model)?;
    let device = crate::models::device(&args.device)?;
    let source = ModelSource::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let tokenizer = source.tokenizer()?;
    let prompt = prompt_tokens(&tokenizer, args.prompt.as_deref(), args.chat.as_deref(), args.system.as_deref())?;
    let ranges = even_split(source.config().n_layers, args.split)?;
    let mut pipeline = LocalPipeline::load(&source, &ranges, args.wire_dtype, &device)?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params()?,
        prefill_chunk: args.prefill_chunk,
    };
    let mut stream = TextStream::new(&tokenizer, true);
    let mut stdout = std::io::stdout().lock();
    let mut emit_error = None;
    let generation = generate(&mut pipeline, 0, &prompt, tokenizer.stop_token_ids(), &opts, |s| {
        match stream.push(s.token) {
            Ok(Some(text)) => {
                let _ = stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush());
            }
            Ok(None) => {}
            Err(e) => emit_error = Some(e),
        }
    })?;
    if let Some(e) = emit_error {
        return Err(e.into());
    }
    stdout.write_all(stream.finish()?.as_bytes())?;
    writeln!(stdout)?;
    eprintln!(
        "prompt tokens {}, prefill {:.1} tok/s, generated {} tokens ({:?}), decode {:.1} tok/s",
        generation.prompt_tokens,
        generation.prefill_tok_s(),
        generation.tokens.len(),
        generation.finish,
        generation.decode_tok_s()
    );
    Ok(())
}
