//! The real SmolLM2-135M-Instruct (Q4_1 GGUF) as fetched by scripts/fetch-models.sh.

mod common;

use baton_model::chat::{ChatTemplate, Message};
use baton_model::pipeline::{even_split, LocalPipeline, WireDType};
use baton_model::shard::{BatchInput, Logits, MicroBatch, SeqChunk};
use candle_core::Device;
use common::*;

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const FRANCE: [u32; 5] = [504, 3575, 282, 4649, 314];

fn greedy(p: &mut LocalPipeline, prompt: &[u32], n: usize) -> Vec<u32> {
    p.open_sequence(1).unwrap();
    let mut tokens = prompt.to_vec();
    let mut out = Vec::new();
    let mut start = 0;
    for _ in 0..n {
        let batch = MicroBatch {
            seqs: vec![SeqChunk { seq_id: 1, start_pos: start, n_tokens: tokens.len() - start }],
            input: BatchInput::Tokens(tokens[start..].to_vec()),
        };
        let logits = p.forward(&batch, Logits::LastToken).unwrap();
        let next = logits.squeeze(0).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        start = tokens.len();
        tokens.push(next);
        out.push(next);
    }
    p.close_sequence(1).unwrap();
    out
}

#[test]
fn greedy_paris_on_every_split() {
    let source = open(&real_model(SMOLLM2));
    let manifest = source.manifest();
    assert_eq!((manifest.n_layers, manifest.hidden_size, manifest.vocab_size), (30, 576, 49152));
    let mut whole = LocalPipeline::load(&source, &even_split(30, 1).unwrap(), WireDType::F32, &Device::Cpu).unwrap();
    let expected = greedy(&mut whole, &FRANCE, 3);
    let tokenizer = source.tokenizer().unwrap();
    assert_eq!(tokenizer.encode("The capital of France is", true).unwrap(), FRANCE);
    let text = tokenizer.decode(&expected, true).unwrap();
    assert!(text.starts_with(" Paris."), "greedy continuation was {text:?}");
    for n in [2, 3] {
        let mut split = LocalPipeline::load(&source, &even_split(30, n).unwrap(), WireDType::F32, &Device::Cpu).unwrap();
        assert_eq!(greedy(&mut split, &FRANCE, 3), expected, "--split {n} with f32 wire");
    }
}

/// The README's first question. candle's own Q8_0 kernel, which rounds the activations to 8 bits
/// before the tied output projection, made this model answer "L'Étoile, la Cité, ..." instead.
#[test]
fn chat_answer_names_paris() {
    let source = open(&real_model(SMOLLM2));
    let tokenizer = source.tokenizer().unwrap();
    let template = ChatTemplate::new(
        tokenizer.chat_template().expect("SmolLM2 ships a chat template"),
        tokenizer.bos_token(),
        tokenizer.eos_token(),
    )
    .unwrap();
    let rendered = template.render(&[Message::new("user", "What is the capital of France?")], true).unwrap();
    let prompt = tokenizer.encode(&rendered, false).unwrap();
    let mut whole = LocalPipeline::load(&source, &even_split(30, 1).unwrap(), WireDType::F32, &Device::Cpu).unwrap();
    let answer = tokenizer.decode(&greedy(&mut whole, &prompt, 8), true).unwrap();
    assert!(answer.contains("Paris"), "chat answer was {answer:?}");
}
