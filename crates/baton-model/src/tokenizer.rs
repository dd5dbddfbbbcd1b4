//! Text ⇄ token ids, the way the model's own tokenizer does it.
//!
//! A [`Tokenizer`] wraps a `tokenizers::Tokenizer` plus what serving needs around it: BOS/EOS,
//! the chat template, and the ids that end generation. It comes either from an HF directory
//! (`tokenizer.json` + `tokenizer_config.json`, ...) or, for a GGUF file that carries no
//! `tokenizer.json`, is rebuilt from the `tokenizer.ggml.*` metadata the way llama.cpp reads it:
//!
//! - `gpt2` (byte-level BPE): vocabulary and merges into a BPE model; the pre-tokenizer named by
//!   `tokenizer.ggml.pre` becomes its regex splits followed by a byte-level mapping (see
//!   [`PRE_TOKENIZERS`]); a byte-level decoder.
//! - `llama` (SentencePiece BPE): merges are derived from the scores (the piece with the higher
//!   score merges first, as SentencePiece and HF's GGUF converter do); `▁` marks spaces, a space
//!   is prepended to the text when `tokenizer.ggml.add_space_prefix` says so (the default), and
//!   unknown bytes fall back to `<0xNN>` tokens.
//!
//! Control tokens (`token_type` 3) and unknown tokens (2) become special added tokens, and
//! user-defined ones (4) added tokens, so they are matched whole in the input text, as HF does.
//!
//! [`TextStream`] turns ids into text incrementally, and [`StopStrings`] holds back text that
//! might be the start of a stop sequence.

use crate::{ModelError, Result};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{NormalizerWrapper, Sequence as NormalizerSequence};
use tokenizers::normalizers::{Prepend, Replace, NFC};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// Token texts that end a turn or the text in the chat formats we know of. Those present in the
/// vocabulary join EOS in [`Tokenizer::stop_token_ids`] (llama.cpp's end-of-generation list, plus
/// the EOS spellings of Llama 2/Mistral, Llama 3 and DeepSeek).
pub const END_OF_TURN_TOKENS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "</s>",
    "<｜end▁of▁sentence｜>",
];

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEEPSEEK_V3_REGEX: &str = r"[!\x22#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a byte-level BPE vocabulary's `tokenizer.ggml.pre` is applied before the byte mapping.
struct PreTokenizer {
    /// llama.cpp's names for it.
    names: &'static [&'static str],
    /// Regexes applied in turn, each splitting the pieces of the previous one and keeping both
    /// matches and the text between them (`Split` with `Isolated`, as in the HF files).
    splits: &'static [&'static str],
    /// Whether the GPT-2 regex of the byte-level step runs last (HF's `use_regex`).
    gpt2_regex: bool,
    /// NFC-normalise the input first (Qwen2's `tokenizer.json` does).
    nfc: bool,
    /// Whole words found in the vocabulary skip the merges (HF's `ignore_merges`).
    ignore_merges: bool,
    /// llama.cpp's default for `tokenizer.ggml.add_bos_token` when the key is absent.
    add_bos: bool,
}

/// The `tokenizer.ggml.pre` values supported for byte-level BPE vocabularies, with the same
/// pre-tokenization as the HF `tokenizer.json` of the models they name and as llama.cpp.
const PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer {
        names: &[
            "gpt2",
            "gpt-2",
            "phi-2",
            "roberta-bpe",
            "mpt",
            "olmo",
            "jais",
        ],
        splits: &[],
        gpt2_regex: true,
        nfc: false,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "smollm",
            "starcoder",
            "refact",
            "codeshell",
            "exaone",
            "minerva-7b",
        ],
        splits: &[r"\p{N}"],
        gpt2_regex: true,
        nfc: false,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["llama3", "llama-v3", "llama-bpe", "falcon3"],
        splits: &[LLAMA3_REGEX],
        gpt2_regex: false,
        nfc: false,
        ignore_merges: true,
        add_bos: true,
    },
    PreTokenizer {
        names: &["dbrx", "smaug-bpe"],
        splits: &[LLAMA3_REGEX],
        gpt2_regex: false,
        nfc: false,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["qwen2", "megrez"],
        splits: &[QWEN2_REGEX],
        gpt2_regex: false,
        nfc: true,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["deepseek-v3"],
        splits: &[r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK_V3_REGEX],
        gpt2_regex: false,
        nfc: false,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["deepseek-coder"],
        splits: &[
            r"[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            r"[一-龥ࠀ-一가-퟿]+",
            r"\p{N}",
        ],
        gpt2_regex: false,
        nfc: false,
        ignore_merges: false,
        add_bos: false,
    },
];

/// The names `from_gguf` accepts in `tokenizer.ggml.pre`.
pub fn supported_pre_tokenizers() -> impl Iterator<Item = &'static str> {
    PRE_TOKENIZERS.iter().flat_map(|p| p.names.iter().copied())
}

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// How a vocabulary entry spells the bytes it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PieceStyle {
    /// GPT-2 byte-to-unicode mapping (`Ġ` is a space).
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xNN>` a raw byte.
    SentencePiece,
    /// Entries are their text.
    Plain,
}

/// A model's tokenizer with BOS/EOS, chat template and stop tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
    stop_token_ids: Vec<u32>,
    style: PieceStyle,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("stop_token_ids", &self.stop_token_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn tok_err(context: impl std::fmt::Display, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("{context}: {e}"))
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ModelError::Format {
            path: path.to_path_buf(),
            format: "JSON",
            reason: e.to_string(),
        })
}

/// A special token as `tokenizer_config.json` writes it: a string or an `AddedToken` object.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// The default template of a `chat_template` field: a string, or a list of named templates.
fn default_template(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list.iter().find_map(|t| {
            (t.get("name")?.as_str()? == "default")
                .then(|| t.get("template")?.as_str().map(str::to_owned))
                .flatten()
        }),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads an HF tokenizer directory: `tokenizer.json` (required), `tokenizer_config.json`
    /// (BOS/EOS, `add_bos_token`/`add_eos_token`, chat template), `chat_template.jinja` (newer
    /// `save_pretrained` output, which wins over the config's), and, when present,
    /// `special_tokens_map.json` and `generation_config.json` (more end-of-generation ids).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let mut inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(path.display(), e))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let special_map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Json::Null);
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);

        let special =
            |key: &str| token_text(config.get(key)).or_else(|| token_text(special_map.get(key)));
        let bos_token = special("bos_token");
        let eos_token = special("eos_token");

        let jinja = dir.join("chat_template.jinja");
        let chat_template = match std::fs::read_to_string(&jinja) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                default_template(config.get("chat_template"))
            }
            Err(source) => {
                return Err(ModelError::Io {
                    path: jinja,
                    source,
                })
            }
        };

        // HF's Llama and Gemma tokenizer classes rebuild the post-processor from these flags
        // when they load (`update_post_processor`); other classes keep `tokenizer.json`'s.
        let class = config
            .get("tokenizer_class")
            .and_then(Json::as_str)
            .unwrap_or("");
        let rebuilds = ["LlamaTokenizer", "CodeLlamaTokenizer", "GemmaTokenizer"]
            .iter()
            .any(|c| class.trim_end_matches("Fast") == *c);
        if rebuilds {
            let add_bos = config
                .get("add_bos_token")
                .and_then(Json::as_bool)
                .unwrap_or(true);
            let add_eos = config
                .get("add_eos_token")
                .and_then(Json::as_bool)
                .unwrap_or(false);
            let post = template_processing(
                &inner,
                add_bos.then_some(bos_token.as_deref()).flatten(),
                add_eos.then_some(eos_token.as_deref()).flatten(),
            )?;
            inner.with_post_processor(Some(post));
        }

        let mut stop = Vec::new();
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            stop.push(id);
        }
        match generation.get("eos_token_id") {
            Some(Json::Array(ids)) => {
                stop.extend(ids.iter().filter_map(Json::as_u64).map(|i| i as u32))
            }
            Some(v) => stop.extend(v.as_u64().map(|i| i as u32)),
            None => {}
        }
        let style = piece_style(&inner);
        Ok(Self::assemble(
            inner,
            bos_token,
            eos_token,
            chat_template,
            stop,
            style,
        ))
    }

    /// Rebuilds the tokenizer from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn from_gguf(metadata: &HashMap<String, Value>) -> Result<Self> {
        let meta = GgufMeta(metadata);
        let model = meta.str("tokenizer.ggml.model")?;
        let tokens: Vec<&str> = meta
            .array("tokenizer.ggml.tokens")?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.to_string().map(String::as_str).map_err(|_| {
                    tok_err(
                        "tokenizer.ggml.tokens",
                        format!("entry {i} is not a string"),
                    )
                })
            })
            .collect::<Result<_>>()?;
        if tokens.is_empty() {
            return Err(tok_err("tokenizer.ggml.tokens", "empty vocabulary"));
        }
        let types: Vec<i64> = match meta.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| tok_err("tokenizer.ggml.token_type", e))?
                .iter()
                .map(|t| int(t).unwrap_or(1))
                .collect(),
            None => Vec::new(),
        };
        let token_id = |key: &str| -> Result<Option<u32>> {
            match meta.get(key) {
                None => Ok(None),
                Some(v) => {
                    let id = int(v).ok_or_else(|| tok_err(key, "not an integer"))?;
                    // llama.cpp ignores an out-of-range id with a warning; so do we.
                    if id < 0 || id as usize >= tokens.len() {
                        tracing::warn!(key, id, "special token id outside the vocabulary, ignored");
                        Ok(None)
                    } else {
                        Ok(Some(id as u32))
                    }
                }
            }
        };
        let bos_id = token_id("tokenizer.ggml.bos_token_id")?;
        let eos_id = token_id("tokenizer.ggml.eos_token_id")?;
        let unk_id = token_id("tokenizer.ggml.unknown_token_id")?;
        let add_bos_key = meta.bool("tokenizer.ggml.add_bos_token")?;
        let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let (mut inner, add_bos_default, style) = match model {
            "gpt2" => {
                let pre_name = match meta.get("tokenizer.ggml.pre") {
                    Some(v) => v
                        .to_string()
                        .map_err(|e| tok_err("tokenizer.ggml.pre", e))?
                        .as_str(),
                    None => {
                        // llama.cpp falls back to a default regex here and warns that quality
                        // suffers; GPT-2's is the closest documented equivalent.
                        tracing::warn!(
                            "GGUF has no tokenizer.ggml.pre; using the gpt2 pre-tokenizer"
                        );
                        "gpt2"
                    }
                };
                let pre = PRE_TOKENIZERS
                    .iter()
                    .find(|p| p.names.contains(&pre_name))
                    .ok_or_else(|| {
                        tok_err(
                            "tokenizer.ggml.pre",
                            format!(
                                "unsupported pre-tokenizer `{pre_name}` (supported: {})",
                                supported_pre_tokenizers().collect::<Vec<_>>().join(", ")
                            ),
                        )
                    })?;
                let merges = meta
                    .array("tokenizer.ggml.merges")?
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let m = v
                            .to_string()
                            .map_err(|e| tok_err("tokenizer.ggml.merges", e))?;
                        // The separator is the first space after the first character: a merge's
                        // left part is never empty, but it may itself be a space in other
                        // encodings (llama.cpp splits the same way).
                        let at = m
                            .char_indices()
                            .skip(1)
                            .find(|&(_, c)| c == ' ')
                            .map(|(at, _)| at)
                            .ok_or_else(|| {
                                tok_err(
                                    "tokenizer.ggml.merges",
                                    format!("entry {i} `{m}` has no space"),
                                )
                            })?;
                        Ok((m[..at].to_string(), m[at + 1..].to_string()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                (
                    byte_level_bpe(vocab, merges, pre)?,
                    pre.add_bos,
                    PieceStyle::ByteLevel,
                )
            }
            "llama" => {
                let add_space_prefix = meta
                    .bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                let scores: Vec<f32> = match meta.get("tokenizer.ggml.scores") {
                    Some(v) => v
                        .to_vec()
                        .map_err(|e| tok_err("tokenizer.ggml.scores", e))?
                        .iter()
                        .map(|s| s.to_f32().unwrap_or(0.0))
                        .collect(),
                    None => {
                        return Err(tok_err(
                            "tokenizer.ggml.scores",
                            "missing (needed for a llama vocabulary)",
                        ))
                    }
                };
                let unk = unk_id.map(|i| tokens[i as usize].to_string());
                (
                    sentencepiece_bpe(&tokens, &scores, &types, vocab, unk, add_space_prefix)?,
                    true,
                    PieceStyle::SentencePiece,
                )
            }
            other => {
                return Err(tok_err(
                    "tokenizer.ggml.model",
                    format!("unsupported tokenizer model `{other}` (supported: gpt2, llama)"),
                ))
            }
        };

        // Control and unknown tokens are special; user-defined ones are matched whole but kept
        // in decoded text even when special tokens are skipped.
        let mut special = Vec::new();
        let mut added = Vec::new();
        for (i, &t) in types.iter().enumerate() {
            let Some(&text) = tokens.get(i) else { break };
            match t {
                TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => {
                    special.push(AddedToken::from(text, true))
                }
                TOKEN_TYPE_USER_DEFINED => {
                    added.push(AddedToken::from(text, false).normalized(false))
                }
                _ => {}
            }
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&added);

        let bos_token = bos_id.map(|i| tokens[i as usize].to_string());
        let eos_token = eos_id.map(|i| tokens[i as usize].to_string());
        let add_bos = add_bos_key.unwrap_or(add_bos_default);
        let post = template_processing(
            &inner,
            add_bos.then_some(bos_token.as_deref()).flatten(),
            add_eos.then_some(eos_token.as_deref()).flatten(),
        )?;
        inner.with_post_processor(Some(post));

        let mut stop: Vec<u32> = eos_id.into_iter().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            stop.extend(token_id(key)?);
        }
        let chat_template = match meta.get("tokenizer.chat_template") {
            Some(v) => Some(
                v.to_string()
                    .map_err(|e| tok_err("tokenizer.chat_template", e))?
                    .clone(),
            ),
            None => None,
        };
        Ok(Self::assemble(
            inner,
            bos_token,
            eos_token,
            chat_template,
            stop,
            style,
        ))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
        chat_template: Option<String>,
        mut stop: Vec<u32>,
        style: PieceStyle,
    ) -> Self {
        stop.extend(
            END_OF_TURN_TOKENS
                .iter()
                .filter_map(|t| inner.token_to_id(t)),
        );
        let mut seen = std::collections::HashSet::new();
        stop.retain(|id| seen.insert(*id));
        Self {
            inner,
            bos_token,
            eos_token,
            chat_template,
            stop_token_ids: stop,
            style,
        }
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`, ...) are always
    /// recognised, as HF does; `add_special_tokens` adds what the tokenizer adds around a
    /// sequence (BOS for Llama-style tokenizers, nothing for SmolLM2 or Qwen2).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| tok_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`; `skip_special_tokens` leaves out special (control) tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err("decode", e))
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let n = self.vocab_size();
        match ids.iter().find(|&&id| id as usize >= n) {
            Some(id) => Err(ModelError::Tokenizer(format!(
                "token id {id} is outside the vocabulary ({n} tokens)"
            ))),
            None => Ok(()),
        }
    }

    /// Ids whose generation ends a sequence: EOS, the GGUF's end-of-turn ids, the
    /// `generation_config.json` EOS ids, and those of [`END_OF_TURN_TOKENS`] in the vocabulary.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_token_ids
    }

    pub fn is_stop_token(&self, id: u32) -> bool {
        self.stop_token_ids.contains(&id)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Number of ids the tokenizer knows, added tokens included. A model's embedding may have
    /// more rows (padding); ids past this have no text.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of `id` as stored (`ĠParis`, `▁Paris`, `<0x0A>`, `<|im_end|>`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes `id` stands for in decoded text (` Paris`; one byte of a UTF-8 sequence for a
    /// byte token; a special token's own text). OpenAI's logprobs report these as `bytes`.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let entry = self.inner.id_to_token(id)?;
        let is_added = self.inner.get_added_tokens_decoder().contains_key(&id);
        if is_added {
            return Some(entry.into_bytes());
        }
        Some(match self.style {
            PieceStyle::ByteLevel => {
                let table = byte_level_table();
                let mut out = Vec::with_capacity(entry.len());
                for c in entry.chars() {
                    match table.get(&c) {
                        Some(&b) => out.push(b),
                        None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                out
            }
            PieceStyle::SentencePiece => match sentencepiece_byte(&entry) {
                Some(b) => vec![b],
                None => entry.replace('▁', " ").into_bytes(),
            },
            PieceStyle::Plain => self.inner.decode(&[id], false).ok()?.into_bytes(),
        })
    }

    /// The text `id` stands for, for logprobs' `token` strings: [`token_bytes`](Self::token_bytes)
    /// with an incomplete UTF-8 sequence shown as U+FFFD.
    pub fn token_to_piece(&self, id: u32) -> Option<String> {
        self.token_bytes(id)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// An incremental decoder over this tokenizer.
    pub fn text_stream(&self, skip_special_tokens: bool) -> TextStream<'_> {
        TextStream::new(self, skip_special_tokens)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Reads GGUF metadata values with errors that name the key.
struct GgufMeta<'a>(&'a HashMap<String, Value>);

impl GgufMeta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| ModelError::Tokenizer(format!("GGUF metadata has no `{key}`")))
    }

    fn str(&self, key: &str) -> Result<&str> {
        Ok(self
            .require(key)?
            .to_string()
            .map_err(|e| tok_err(key, e))?
            .as_str())
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>> {
        self.require(key)?.to_vec().map_err(|e| tok_err(key, e))
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.to_bool().map_err(|e| tok_err(key, e)))
            .transpose()
    }
}

/// Any GGUF integer as i64 (writers differ in which width they use for ids and types).
fn int(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

fn split(regex: &str) -> Result<PreTokenizerWrapper> {
    Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map(PreTokenizerWrapper::Split)
    .map_err(|e| tok_err(format!("pre-tokenizer regex `{regex}`"), e))
}

fn byte_level_bpe(
    vocab: Vocab,
    merges: Vec<(String, String)>,
    pre: &PreTokenizer,
) -> Result<tokenizers::Tokenizer> {
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| tok_err("BPE model", e))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let mut steps = pre
        .splits
        .iter()
        .map(|r| split(r))
        .collect::<Result<Vec<_>>>()?;
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false,
        true,
        pre.gpt2_regex,
    )));
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSequence::new(steps))));
    if pre.nfc {
        tok.with_normalizer(Some(NormalizerWrapper::NFC(NFC)));
    }
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
        false, true, true,
    ))));
    Ok(tok)
}

/// A SentencePiece BPE vocabulary as HF's converter builds it from a `tokenizer.model`: merges
/// are every split of a piece into two pieces of the vocabulary, ranked by the merged piece's
/// score (higher first), then by the parts' scores.
fn sentencepiece_bpe(
    tokens: &[&str],
    scores: &[f32],
    types: &[i64],
    vocab: Vocab,
    unk: Option<String>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    let score = |id: u32| scores.get(id as usize).copied().unwrap_or(0.0);
    let mut ranked: Vec<(f32, f32, f32, u32, &str, &str)> = Vec::new();
    for (id, &piece) in tokens.iter().enumerate() {
        // Control, unknown and user-defined pieces never result from merges.
        if matches!(
            types.get(id),
            Some(&(TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_USER_DEFINED))
        ) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                ranked.push((score(id as u32), score(li), score(ri), id as u32, l, r));
            }
        }
    }
    // Stable order for equal scores: by merged id, then split position, as the vocabulary lists
    // them (HF sorts stably over the same enumeration).
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(b.1.total_cmp(&a.1))
            .then(b.2.total_cmp(&a.2))
            .then(a.3.cmp(&b.3))
    });
    let merges = ranked
        .into_iter()
        .map(|(.., l, r)| (l.to_string(), r.to_string()))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(|e| tok_err("BPE model", e))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let replace =
        |from: &str, to: &str| Replace::new(from, to).map_err(|e| tok_err("normalizer", e));
    let mut norm = Vec::new();
    if add_space_prefix {
        norm.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
    }
    norm.push(NormalizerWrapper::Replace(replace(" ", "▁")?));
    tok.with_normalizer(Some(NormalizerWrapper::Sequence(NormalizerSequence::new(
        norm,
    ))));
    let mut dec = vec![
        DecoderWrapper::Replace(replace("▁", " ")?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        dec.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    tok.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(dec))));
    Ok(tok)
}

/// BOS/EOS around each sequence (and around each of a pair), as HF's `update_post_processor`.
fn template_processing(
    inner: &tokenizers::Tokenizer,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<TemplateProcessing> {
    let mut specials = Vec::new();
    for t in [bos, eos].into_iter().flatten() {
        let id = inner.token_to_id(t).ok_or_else(|| {
            tok_err(
                "post-processor",
                format!("special token `{t}` is not in the vocabulary"),
            )
        })?;
        specials.push((t.to_string(), id));
    }
    let wrap = |seq: &str, type_id: u8| {
        let mut parts = Vec::new();
        if let Some(b) = bos {
            parts.push(format!("{b}:{type_id}"));
        }
        parts.push(format!("{seq}:{type_id}"));
        if let Some(e) = eos {
            parts.push(format!("{e}:{type_id}"));
        }
        parts.join(" ")
    };
    let single = wrap("$A", 0);
    let pair = format!("{} {}", single, wrap("$B", 1));
    TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| tok_err("post-processor", e))?
        .special_tokens(specials)
        .build()
        .map_err(|e| tok_err("post-processor", e))
}

/// Which spelling the vocabulary uses, judged from the decoder the tokenizer was saved with.
fn piece_style(inner: &tokenizers::Tokenizer) -> PieceStyle {
    fn walk(d: &DecoderWrapper) -> Option<PieceStyle> {
        match d {
            DecoderWrapper::ByteLevel(_) => Some(PieceStyle::ByteLevel),
            DecoderWrapper::ByteFallback(_) | DecoderWrapper::Metaspace(_) => {
                Some(PieceStyle::SentencePiece)
            }
            DecoderWrapper::Sequence(s) => s.get_decoders().iter().find_map(walk),
            _ => None,
        }
    }
    inner
        .get_decoder()
        .and_then(walk)
        .unwrap_or(PieceStyle::Plain)
}

/// `<0xNN>` → the byte.
fn sentencepiece_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

/// GPT-2's byte-to-unicode table, inverted: printable bytes map to themselves, the others to
/// U+0100 onwards in byte order.
fn byte_level_table() -> &'static HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<HashMap<char, u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut next = 256u32;
        let mut table = HashMap::with_capacity(256);
        for b in 0..=255u8 {
            let c = if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
                next += 1;
                c
            };
            table.insert(c, b);
        }
        table
    })
}

/// Incremental detokenizer: feed generated ids one at a time, get the text that became final.
///
/// It decodes a short window of recent ids and emits what extends the previous decoding, as HF's
/// `DecodeStream` (and TGI) do, so that decoders that depend on neighbours (SentencePiece's
/// leading-space strip, byte fallback, byte-level BPE) produce exactly the text of decoding the
/// whole sequence at once. Text that ends in an incomplete UTF-8 sequence is held back until the
/// next id completes it, so a character is never split. To resume a stream, push the ids already
/// emitted and discard what those pushes return.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    /// The window: ids before `prefix_index` only provide context for the ones after.
    ids: Vec<u32>,
    /// The text of the window's ids up to `prefix_index`, decoded on their own.
    prefix: String,
    prefix_index: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    /// Adds one id; returns the newly printable text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.tokenizer.check_ids(&[id])?;
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        if text.len() <= self.prefix.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        let new = self.new_text(text)?;
        // Keep only the ids since the last emission as context for the next one.
        self.ids.drain(..self.prefix_index);
        self.prefix = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        self.prefix_index = self.ids.len();
        Ok(Some(new))
    }

    /// Whatever is still held back (an incomplete character shows as U+FFFD); the stream is
    /// then empty.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        let rest = if text.len() > self.prefix.len() {
            self.new_text(text)?
        } else {
            String::new()
        };
        self.ids.clear();
        self.prefix.clear();
        self.prefix_index = 0;
        Ok(rest)
    }

    fn new_text(&self, mut text: String) -> Result<String> {
        if !text.starts_with(&self.prefix) {
            return Err(ModelError::Tokenizer(format!(
                "incremental decoding diverged: {:?} does not extend {:?}",
                text, self.prefix
            )));
        }
        Ok(text.split_off(self.prefix.len()))
    }
}

/// Holds back generated text that might be the start of a stop sequence, and finds the first
/// complete one: text is released only once no stop sequence can begin in it, and a stop
/// sequence itself is never released (OpenAI's `stop`).
#[derive(Clone, Debug)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

/// What [`StopStrings::push`] releases.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StopCheck {
    /// Text safe to send.
    pub text: String,
    /// A stop sequence was found; `text` ends right before it and the generation should end.
    pub stopped: bool,
}

impl StopStrings {
    /// Empty strings are ignored.
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Self {
        Self {
            stops: stops
                .into_iter()
                .map(Into::into)
                .filter(|s: &String| !s.is_empty())
                .collect(),
            held: String::new(),
            stopped: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Adds generated text; returns what can be sent now.
    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stopped {
            return StopCheck {
                text: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.held.truncate(at);
            self.stopped = true;
            return StopCheck {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        // Keep the longest tail that is a proper prefix of some stop sequence.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let rest = self.held.split_off(keep_from);
        StopCheck {
            text: std::mem::replace(&mut self.held, rest),
            stopped: false,
        }
    }

    /// The held-back text, when generation ended for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_is_gpt2s() {
        let t = byte_level_table();
        assert_eq!(t.len(), 256);
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
        assert_eq!(t[&'A'], b'A');
        assert_eq!(t[&'Ā'], 0);
    }

    #[test]
    fn sentencepiece_bytes_parse() {
        assert_eq!(sentencepiece_byte("<0x0A>"), Some(b'\n'));
        assert_eq!(sentencepiece_byte("<0xE2>"), Some(0xE2));
        assert_eq!(sentencepiece_byte("<0x0A"), None);
        assert_eq!(sentencepiece_byte("<s>"), None);
    }

    #[test]
    fn every_pre_tokenizer_regex_compiles() {
        for p in PRE_TOKENIZERS {
            for r in p.splits {
                split(r).unwrap_or_else(|e| panic!("{:?}: {e}", p.names));
            }
        }
    }

    #[test]
    fn stop_strings_hold_back_partial_matches() {
        let mut s = StopStrings::new(["</answer>", "STOP"]);
        assert_eq!(s.push("Hello </an").text, "Hello ");
        assert_eq!(s.push("swer? no").text, "</answer? no");
        let c = s.push(" ST");
        assert_eq!((c.text.as_str(), c.stopped), (" ", false));
        let c = s.push("OP and more");
        assert_eq!((c.text.as_str(), c.stopped), ("", true));
        assert!(s.push("x").stopped);
        let mut s = StopStrings::new(["ab"]);
        assert_eq!(s.push("xa").text, "x");
        assert_eq!(s.finish(), "a");
    }
}
