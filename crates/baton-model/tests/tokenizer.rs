//! Tokenizers from HF directories and from GGUF metadata give transformers' ids (references from
//! `scripts/make-fixtures.py`); decoding, incremental decoding, stop tokens and errors.

use baton_model::tokenizer::{StopStrings, Tokenizer};
use baton_model::ModelError;
use candle_core::quantized::gguf_file::{self, Value};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// Runs `f` on its own thread and fails the test if it takes longer than `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test took longer than {secs} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the closure returned without sending"),
        },
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// A real model from the fetch cache; its absence fails the test.
fn real_model(file: &str) -> PathBuf {
    let dir = std::env::var_os("BATON_MODELS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/baton/models")))
        .expect("neither BATON_MODELS nor HOME is set");
    let path = dir.join(file);
    assert!(
        path.is_file(),
        "{} is missing: run `scripts/fetch-models.sh --all` first",
        path.display()
    );
    path
}

fn gguf_metadata(path: &Path) -> HashMap<String, Value> {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    gguf_file::Content::read(&mut f).unwrap().metadata
}

fn gguf_tokenizer(path: &Path) -> Tokenizer {
    Tokenizer::from_gguf(&gguf_metadata(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    add_special_tokens: bool,
}

fn cases(name: &str) -> Vec<Case> {
    let path = fixture("tokenizer").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Every reference case encodes to its ids, and decodes back.
fn check(tok: &Tokenizer, name: &str, what: &str) {
    let cases = cases(name);
    assert!(cases.len() > 10, "{name}: too few cases");
    for c in &cases {
        let ids = tok.encode(&c.text, c.add_special_tokens).unwrap();
        assert_eq!(
            ids, c.ids,
            "{what} {name}: {:?} (add_special_tokens {})",
            c.text, c.add_special_tokens
        );
        if !c.add_special_tokens {
            assert_eq!(
                tok.decode(&ids, false).unwrap(),
                c.text,
                "{what} {name}: decode"
            );
        }
    }
}

const TINY: [&str; 8] = [
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "deepseek_v3",
];

#[test]
fn hf_dirs_encode_as_transformers() {
    within(60, || {
        for name in TINY {
            let tok = Tokenizer::from_hf_dir(&fixture(name)).unwrap();
            check(&tok, name, "tokenizer.json");
        }
    });
}

#[test]
fn gguf_metadata_tokenizers_encode_as_transformers() {
    // llama.cpp's converter wrote these GGUFs from the same HF tokenizers: the rebuilt
    // tokenizer (llama-bpe, qwen2 and deepseek-v3 pre-tokenizers) must give the same ids.
    within(60, || {
        for name in TINY {
            let tok = gguf_tokenizer(&fixture(name).join("model-f32.gguf"));
            check(&tok, name, "GGUF");
        }
    });
}

#[test]
fn real_smollm2_tokenizes_the_known_prompt() {
    within(180, || {
        let tok = gguf_tokenizer(&real_model("SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert_eq!(
            tok.encode("The capital of France is", true).unwrap(),
            vec![504, 3575, 282, 4649, 314]
        );
        assert_eq!(
            tok.encode("The capital of France is", false).unwrap(),
            vec![504, 3575, 282, 4649, 314]
        );
        check(&tok, "smollm2", "GGUF");
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.bos_token(), Some("<|im_start|>"));
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        // <|im_end|> (EOS) and <|endoftext|> end generation.
        let stops = tok.stop_token_ids();
        assert!(stops.contains(&2) && stops.contains(&0), "{stops:?}");
        assert!(tok.chat_template().is_some());
    });
}

#[test]
fn real_qwen25_coder_tokenizes_as_transformers() {
    within(180, || {
        let tok = gguf_tokenizer(&real_model("Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"));
        check(&tok, "qwen2.5", "GGUF");
        assert_eq!(tok.vocab_size(), 151_936);
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        let stops = tok.stop_token_ids();
        assert!(
            stops.contains(&151_645) && stops.contains(&151_643),
            "{stops:?}"
        );
        // Special tokens written in the text are matched whole.
        let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
        assert_eq!(ids.first(), Some(&151_644));
        assert_eq!(ids.last(), Some(&151_645));
    });
}

#[test]
fn stop_tokens_include_eos_end_of_turn_and_generation_config() {
    within(60, || {
        // The Llama-3 flavour: <|end_of_text|> 385, <|eom_id|> 388, <|eot_id|> 389.
        let hf = Tokenizer::from_hf_dir(&fixture("llama")).unwrap();
        let gguf = gguf_tokenizer(&fixture("llama").join("model-f32.gguf"));
        for tok in [&hf, &gguf] {
            for id in [385, 388, 389] {
                assert!(tok.is_stop_token(id), "{id} in {:?}", tok.stop_token_ids());
            }
            assert!(!tok.is_stop_token(384), "BOS does not stop");
        }
        // Qwen flavour: <|endoftext|> 384 and <|im_end|> 386.
        let tok = Tokenizer::from_hf_dir(&fixture("qwen3")).unwrap();
        assert!(tok.is_stop_token(384) && tok.is_stop_token(386));
        assert!(!tok.is_stop_token(385), "<|im_start|> does not stop");
        // DeepSeek: <｜end▁of▁sentence｜> 1.
        let tok = gguf_tokenizer(&fixture("deepseek_v3").join("model-f32.gguf"));
        assert!(tok.is_stop_token(1));
    });
}

#[test]
fn skip_special_tokens_drops_control_tokens_only() {
    within(60, || {
        for tok in [
            Tokenizer::from_hf_dir(&fixture("qwen3")).unwrap(),
            gguf_tokenizer(&fixture("qwen3").join("model-f32.gguf")),
        ] {
            let text = "<|im_start|>user\n<think>hi</think><|im_end|>";
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
            // <think> is an added but not special token: it stays.
            assert_eq!(tok.decode(&ids, true).unwrap(), "user\n<think>hi</think>");
        }
    });
}

const STREAM_TEXTS: [&str; 4] = [
    "héllo wörld 你好 🚀 and 🦙.cpp\n\ttabs",
    "Ünïcödé: ½ → ∞; emoji 👩‍💻 done",
    "  leading spaces and trailing  ",
    "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>",
];

/// Pushing ids one by one yields exactly the whole decoding, never a broken character.
fn check_stream(tok: &Tokenizer, text: &str, skip: bool) {
    let ids = tok.encode(text, false).unwrap();
    let mut stream = tok.text_stream(skip);
    let mut out = String::new();
    for &id in &ids {
        if let Some(piece) = stream.push(id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "{piece:?} of {text:?}");
            out.push_str(&piece);
        }
    }
    out.push_str(&stream.finish().unwrap());
    assert_eq!(out, tok.decode(&ids, skip).unwrap(), "{text:?}");
}

#[test]
fn text_stream_equals_whole_decoding() {
    within(180, || {
        let mut toks = vec![gguf_tokenizer(&real_model(
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ))];
        for name in ["llama", "qwen3", "deepseek_v3"] {
            toks.push(Tokenizer::from_hf_dir(&fixture(name)).unwrap());
        }
        for tok in &toks {
            for text in STREAM_TEXTS {
                check_stream(tok, text, false);
                check_stream(tok, text, true);
            }
        }
        // An incomplete character is held back, then finish() shows it.
        let tok = &toks[0];
        let ids = tok.encode("🚀", false).unwrap();
        assert!(ids.len() > 1, "the rocket is several byte tokens: {ids:?}");
        let mut stream = tok.text_stream(false);
        assert_eq!(stream.push(ids[0]).unwrap(), None);
        assert_eq!(stream.finish().unwrap(), "\u{FFFD}");
    });
}

#[test]
fn token_pieces_and_bytes() {
    within(180, || {
        let tok = gguf_tokenizer(&real_model("SmolLM2-135M-Instruct.Q4_1.gguf"));
        // " Paris": the vocabulary entry, and the text it stands for.
        let ids = tok.encode(" Paris", false).unwrap();
        assert_eq!(ids.len(), 1);
        assert_eq!(tok.id_to_token(ids[0]).as_deref(), Some("ĠParis"));
        assert_eq!(tok.token_to_piece(ids[0]).as_deref(), Some(" Paris"));
        assert_eq!(tok.token_to_id("ĠParis"), Some(ids[0]));
        assert_eq!(tok.token_to_piece(2).as_deref(), Some("<|im_end|>"));
        // The bytes of the pieces add up to the text, even where a piece is part of a character.
        for text in STREAM_TEXTS {
            let ids = tok.encode(text, false).unwrap();
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&id| tok.token_bytes(id).unwrap())
                .collect();
            assert_eq!(bytes, text.as_bytes(), "{text:?}");
        }
        assert_eq!(tok.token_bytes(49_152), None);
    });
}

#[test]
fn bad_inputs_give_clear_errors() {
    within(60, || {
        // A directory without tokenizer.json: an I/O error naming the file.
        let dir = tempfile::tempdir().unwrap();
        match Tokenizer::from_hf_dir(dir.path()) {
            Err(ModelError::Io { path, .. }) => assert!(path.ends_with("tokenizer.json")),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        // A corrupt tokenizer.json.
        std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
        match Tokenizer::from_hf_dir(dir.path()) {
            Err(ModelError::Tokenizer(msg)) => assert!(msg.contains("tokenizer.json"), "{msg}"),
            other => panic!("expected a tokenizer error, got {other:?}"),
        }

        // GGUF metadata: a missing vocabulary, an unknown pre-tokenizer or model.
        let base = gguf_metadata(&fixture("qwen2").join("model-f32.gguf"));
        let expect_err =
            |meta: &HashMap<String, Value>, needle: &str| match Tokenizer::from_gguf(meta) {
                Err(ModelError::Tokenizer(msg)) => assert!(msg.contains(needle), "{needle}: {msg}"),
                other => panic!("{needle}: expected a tokenizer error, got {other:?}"),
            };
        let mut m = base.clone();
        m.remove("tokenizer.ggml.tokens");
        expect_err(&m, "tokenizer.ggml.tokens");
        let mut m = base.clone();
        m.insert(
            "tokenizer.ggml.pre".into(),
            Value::String("no-such-pre".into()),
        );
        expect_err(&m, "no-such-pre");
        let mut m = base.clone();
        m.insert("tokenizer.ggml.model".into(), Value::String("t5".into()));
        expect_err(&m, "t5");
        let mut m = base.clone();
        m.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("nospace".into())]),
        );
        expect_err(&m, "merges");
        // A missing pre-tokenizer falls back to GPT-2's (documented, with a warning).
        let mut m = base;
        m.remove("tokenizer.ggml.pre");
        assert!(Tokenizer::from_gguf(&m).is_ok());

        // Ids outside the vocabulary.
        let tok = Tokenizer::from_hf_dir(&fixture("qwen2")).unwrap();
        let n = tok.vocab_size() as u32;
        assert!(matches!(
            tok.decode(&[1, n], false),
            Err(ModelError::Tokenizer(_))
        ));
        assert!(tok.text_stream(false).push(n).is_err());
    });
}

#[test]
fn stop_strings_never_release_a_stop_sequence() {
    within(30, || {
        let mut s = StopStrings::new(["\n\nUser:", "###"]);
        let mut out = String::new();
        let mut stopped = false;
        for piece in ["Paris is", " the capital.", "\n", "\nUs", "er: next"] {
            let c = s.push(piece);
            out.push_str(&c.text);
            if c.stopped {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(out, "Paris is the capital.");
        // A partial match that does not complete is released.
        let mut s = StopStrings::new(["###"]);
        assert_eq!(s.push("a #").text, "a ");
        assert_eq!(s.push("# b").text, "## b");
        assert_eq!(s.push("#").text, "");
        assert_eq!(s.finish(), "#");
        // Multi-byte characters are never split.
        let mut s = StopStrings::new(["éé"]);
        assert_eq!(s.push("aé").text, "a");
        assert_eq!(s.push("x").text, "éx");
        assert!(StopStrings::new([""]).is_empty());
    });
}
