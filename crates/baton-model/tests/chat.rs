//! Chat templates render byte for byte what transformers' `apply_chat_template(tokenize=False)`
//! renders (reference strings from `scripts/make-fixtures.py`), for the tiny fixture models and
//! the real SmolLM2 and Qwen2.5-Coder templates.

use baton_model::chat::{ChatTemplate, Message};
use baton_model::tokenizer::Tokenizer;
use baton_model::ModelError;
use candle_core::quantized::gguf_file;
use serde::Deserialize;
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

fn gguf_tokenizer(path: &Path) -> Tokenizer {
    let mut f = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    Tokenizer::from_gguf(&content.metadata).unwrap()
}

#[derive(Deserialize)]
struct Case {
    name: String,
    template: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    rendered: String,
}

fn cases(name: &str) -> Vec<Case> {
    let path = repo_root()
        .join("tests/fixtures/chat")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn check_cases(name: &str) -> usize {
    let cases = cases(name);
    assert!(!cases.is_empty(), "{name}: no cases");
    for c in &cases {
        let t = ChatTemplate::new(&c.template, c.bos_token.as_deref(), c.eos_token.as_deref())
            .unwrap_or_else(|e| panic!("{name} / {}: {e}", c.name));
        let got = t
            .render(&c.messages, c.add_generation_prompt)
            .unwrap_or_else(|e| panic!("{name} / {}: {e}", c.name));
        assert_eq!(got, c.rendered, "{name} / {}", c.name);
    }
    cases.len()
}

#[test]
fn tiny_fixture_templates_render_as_transformers() {
    within(60, || {
        // Llama 3.1, Mistral Nemo, Qwen2.5, Qwen3 (with its reasoning-content handling and
        // namespace loops), DeepSeek-V3.1 templates.
        for name in [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "deepseek_v3",
        ] {
            check_cases(name);
        }
    });
}

#[test]
fn smollm2_and_qwen25_templates_render_as_transformers() {
    within(60, || {
        assert_eq!(check_cases("smollm2"), 6);
        assert_eq!(check_cases("qwen2.5"), 6);
    });
}

#[test]
fn real_smollm2_gguf_template_renders_a_three_message_chat_as_transformers() {
    within(180, || {
        let tok = gguf_tokenizer(&real_model("SmolLM2-135M-Instruct.Q4_1.gguf"));
        let source = tok
            .chat_template()
            .expect("SmolLM2 carries a chat template");
        let t = ChatTemplate::new(source, tok.bos_token(), tok.eos_token()).unwrap();
        let case = cases("smollm2")
            .into_iter()
            .find(|c| c.name == "system+user+assistant")
            .unwrap();
        assert_eq!(case.template, source);
        assert_eq!(case.messages.len(), 3);
        assert_eq!(t.render(&case.messages, false).unwrap(), case.rendered);
        // All six references, rendered from the template the GGUF carries.
        for c in cases("smollm2") {
            assert_eq!(
                t.render(&c.messages, c.add_generation_prompt).unwrap(),
                c.rendered,
                "{}",
                c.name
            );
        }
    });
}

#[test]
fn real_qwen25_gguf_template_renders_as_transformers() {
    within(180, || {
        let tok = gguf_tokenizer(&real_model("Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"));
        let t = ChatTemplate::new(
            tok.chat_template().unwrap(),
            tok.bos_token(),
            tok.eos_token(),
        )
        .unwrap();
        for c in cases("qwen2.5") {
            assert_eq!(
                t.render(&c.messages, c.add_generation_prompt).unwrap(),
                c.rendered,
                "{}",
                c.name
            );
        }
    });
}

#[test]
fn hf_dir_template_and_tokens_come_from_tokenizer_config() {
    within(60, || {
        for name in ["llama", "qwen3", "deepseek_v3"] {
            let tok =
                Tokenizer::from_hf_dir(&repo_root().join("tests/fixtures").join(name)).unwrap();
            let case = &cases(name)[0];
            assert_eq!(tok.chat_template(), Some(case.template.as_str()), "{name}");
            // The references write a missing token as "".
            assert_eq!(
                tok.bos_token().unwrap_or(""),
                case.bos_token.as_deref().unwrap_or(""),
                "{name}"
            );
            assert_eq!(
                tok.eos_token().unwrap_or(""),
                case.eos_token.as_deref().unwrap_or(""),
                "{name}"
            );
        }
    });
}

fn render(source: &str, messages: &[Message]) -> Result<String, ModelError> {
    ChatTemplate::new(source, Some("<s>"), Some("</s>"))?.render(messages, true)
}

#[test]
fn hf_environment_features() {
    within(30, || {
        let msgs = [Message::new("user", "Hi \"there\" <b>&</b> é\n")];
        // trim_blocks + lstrip_blocks, as HF sets them.
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content|trim }}\n    {% endif %}\n{% endfor %}";
        assert_eq!(render(src, &msgs).unwrap(), "U:Hi \"there\" <b>&</b> é\n");
        // tojson is json.dumps(ensure_ascii=False): no HTML escaping, Python separators,
        // keys in insertion order; with indent, "," and newlines.
        assert_eq!(
            render("{{ messages[0]|tojson }}", &msgs).unwrap(),
            r#"{"role": "user", "content": "Hi \"there\" <b>&</b> é\n"}"#
        );
        assert_eq!(
            render("{{ messages[0]|tojson(indent=2) }}", &msgs).unwrap(),
            "{\n  \"role\": \"user\",\n  \"content\": \"Hi \\\"there\\\" <b>&</b> é\\n\"\n}"
        );
        assert_eq!(
            render("{{ {'b': [1, 2.5, none, true], 'a': 'x'}|tojson(sort_keys=true, separators=[',', ':']) }}", &[]).unwrap(),
            r#"{"a":"x","b":[1,2.5,null,true]}"#
        );
        assert_eq!(
            render("{{ 'é\x01'|tojson(ensure_ascii=true) }}", &[]).unwrap(),
            r#""\u00e9\u0001""#
        );
        // Python string and dict methods (minijinja-contrib pycompat).
        assert_eq!(
            render("{{ messages[0].content.strip().upper() }}|{% for k, v in messages[0].items() %}{{ k }};{% endfor %}", &msgs).unwrap(),
            "HI \"THERE\" <B>&</B> É|role;content;"
        );
        // Special tokens, tools/documents defined as none, add_generation_prompt.
        assert_eq!(
            render("{{ bos_token }}{{ tools is none }}{{ documents is none }}{{ add_generation_prompt }}{{ eos_token }}", &[]).unwrap(),
            "<s>TrueTrueTrue</s>"
        );
        // A special token the tokenizer lacks is undefined.
        let t = ChatTemplate::new(
            "[{{ bos_token }}]{{ bos_token is defined }}",
            None,
            Some("</s>"),
        )
        .unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "[]False");
        // A single trailing newline is dropped, as Jinja2 does by default.
        assert_eq!(render("x\n", &[]).unwrap(), "x");
        // namespace() and loop variables.
        assert_eq!(
            render("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{{ messages|length }}", &msgs).unwrap(),
            "11"
        );
    });
}

#[test]
fn strftime_now_uses_the_clock_and_can_be_fixed() {
    within(30, || {
        let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", None, None).unwrap();
        let today = t.render(&[], false).unwrap();
        assert_eq!(today.len(), 11, "{today}");
        let fixed = t.with_fixed_time(1_721_999_109);
        assert_eq!(fixed.render(&[], false).unwrap(), "26 Jul 2024");
    });
}

#[test]
fn extra_variables_reach_the_template() {
    within(30, || {
        let t = ChatTemplate::new(
            "{{ enable_thinking is defined }}{{ enable_thinking }}",
            None,
            None,
        )
        .unwrap();
        let serde_json::Value::Object(extra) = serde_json::json!({ "enable_thinking": false })
        else {
            unreachable!()
        };
        // Booleans print as Python prints them.
        assert_eq!(t.render_with(&[], true, &extra).unwrap(), "TrueFalse");
        assert_eq!(t.render(&[], true).unwrap(), "False");
    });
}

#[test]
fn template_errors_are_clear() {
    within(30, || {
        // A syntax error is reported when compiling.
        match ChatTemplate::new("{% for m in messages %}", None, None) {
            Err(ModelError::Template(msg)) => assert!(msg.contains("for"), "{msg}"),
            other => panic!("expected a template error, got {other:?}"),
        }
        // raise_exception's message reaches the caller.
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}",
            None,
            None,
        )
        .unwrap();
        match t.render(&[Message::new("assistant", "x")], true) {
            Err(ModelError::Template(msg)) => {
                assert!(
                    msg.contains("Conversation roles must alternate user/assistant"),
                    "{msg}"
                )
            }
            other => panic!("expected a template error, got {other:?}"),
        }
        // An attribute of an undefined value fails, as in Jinja2.
        assert!(matches!(
            render("{{ nothing.here }}", &[]),
            Err(ModelError::Template(_))
        ));
        // Printing an undefined value gives nothing, as in Jinja2.
        assert_eq!(render("[{{ nothing }}]", &[]).unwrap(), "[]");
    });
}
