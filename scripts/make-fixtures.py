#!/usr/bin/env python3
"""Generate baton's test fixtures into tests/fixtures/ (a developer tool; CI only reads the outputs).

What it writes (see tests/fixtures/README.md for every file):
  * tiny random-weight models built by transformers from configs, one directory each:
      llama, mistral, qwen2, qwen3                  (dense)
      deepseek_v3, qwen3_moe, mixtral, qwen2_moe    (MoE)
    each with config.json + model.safetensors (save_pretrained), a small byte-level BPE tokenizer
    (tokenizer.json + tokenizer_config.json with a chat_template), reference.safetensors /
    reference.json (full-sequence float32 logits of three prompts), and GGUF copies made by
    llama.cpp's own convert_hf_to_gguf.py (model-f32.gguf, model-q8_0.gguf);
  * chat-template references (chat/*.json) for the tiny fixtures and the two real models that
    scripts/fetch-models.sh provides (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct);
  * tokenization references (tokenizer/*.json) for the two real models.

Set-up, once (torch from the registry is the CUDA build, ~2.8 GB; it runs on CPU):
    python3 -m venv /tmp/fixtures-venv
    /tmp/fixtures-venv/bin/pip install --require-hashes -r scripts/fixtures-requirements.txt
Run (from the repository root; needs network access to the package registry for the converter
sdist, and the real models in $BATON_MODELS, which it fetches with scripts/fetch-models.sh --all):
    /tmp/fixtures-venv/bin/python scripts/make-fixtures.py
Options: --only NAME[,NAME] to rebuild some model fixtures, --no-gguf, --no-real (skip the parts
that need the real models), --sdist PATH (a local llama-cpp-python-0.3.36 sdist; its sha256 is
still checked), --keep-temp.

Optional cross-check with llama.cpp itself (writes tests/fixtures/llama_cpp_check.json and each
model's llama_cpp_q8_0.safetensors; needs numpy + llama_cpp, not torch):
    python3 -m venv /tmp/llama-venv
    /tmp/llama-venv/bin/pip install llama-cpp-python==0.3.36    # compiles llama.cpp, ~20-40 min
    /tmp/llama-venv/bin/python scripts/make-fixtures.py --verify-llama-cpp

The converter: llama-cpp-python==0.3.36's sdist (pinned with its sha256 in
scripts/fixtures-converter-requirements.txt) is downloaded with pip into a temporary directory
and unpacked there; convert_hf_to_gguf.py runs from that directory with the sdist's own gguf-py.
Nothing of it is copied into the repository. Because our tokenizers are new, the converter's
pre-tokenizer detection (a hash over a test string's token ids) cannot recognise them; we override
TextModel.get_vocab_base_pre at run time to return the llama.cpp pre-tokenizer name whose regex
we trained the tokenizer with (llama-bpe, qwen2, deepseek-v3).

Everything is deterministic: fixed seeds, fixed corpus, no network data.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
TRANSFORMERS_VERSION = "4.57.6"
SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp"

SEED = 1234
INIT_RANGE = 0.1
PROMPT_LENGTHS = [5, 9, 13]
PROMPT_TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Once upon a time, in a land far away, there lived 3 dragons and 12 knights.",
]

# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

# Pre-tokenizer regexes exactly as llama.cpp implements them (src/llama-vocab.cpp, same sdist),
# so that a GGUF-side tokenizer that maps `tokenizer.ggml.pre` to these regexes reproduces
# tokenizer.json.
LLAMA3_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEEPSEEK3_RES = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
]

BASE_VOCAB = 384  # byte-level alphabet (256) + merges; special tokens come on top

CORPUS = """\
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.
Once upon a time, in a land far away, there lived three dragons and twelve knights.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
Machine learning models are trained on data. The model predicts the next token of the text.
We split a large language model into stages, and each machine runs the layers of one stage.
Hidden states flow from one stage to the next; the last stage samples the next token.
You are a helpful assistant. What is the weather like today? It is sunny and warm.
Hello, world! How are you? I'm fine, thank you. I've been there, it's great, we'll see.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1000 2024 3.14159 1,000,000.
def add(a, b):
    return a + b

def fib(n):
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)

for i in range(10):
    print(i, add(i, i), fib(i))

fn main() {
    let x = vec![1, 2, 3];
    println!("{:?}", x);
}
<html><body><p class="note">Hello</p></body></html>
{"name": "baton", "layers": [0, 1, 2], "ok": true}
Héllo wörld, ça va? Привет мир. 你好，世界。 こんにちは。 🚀 ✅
"""


def train_bpe(pre_tokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    corpus = CORPUS.splitlines(keepends=True) * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def split_pre(regexes):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]
    )


# Flavours: which regex, which llama.cpp pre-tokenizer name, special tokens, BOS handling.
# "front" specials get the first ids (like Mistral's <unk>/<s>/</s> and DeepSeek's BOS/EOS);
# the others are appended after the BPE vocabulary (like Llama 3's and Qwen's).
TOKENIZER_FLAVOURS = {
    "llama3": {
        "regexes": [LLAMA3_RE],
        "gguf_pre": "llama-bpe",
        "front": [],
        "special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"],
        "added": [],
        "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None, "unk": None,
        "add_bos": True,
        "template": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    },
    "mistral": {
        "regexes": [LLAMA3_RE],
        "gguf_pre": "llama-bpe",
        "front": ["<unk>", "<s>", "</s>"],
        "special": ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
        "added": [],
        "bos": "<s>", "eos": "</s>", "pad": None, "unk": "<unk>",
        "add_bos": True,
        "template": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
    },
    "qwen2": {
        "regexes": [QWEN2_RE],
        "gguf_pre": "qwen2",
        "front": [],
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "added": ["<tool_call>", "</tool_call>"],
        "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None,
        "add_bos": False,
        "template": "Qwen-Qwen2.5-7B-Instruct.jinja",
    },
    "qwen3": {
        "regexes": [QWEN2_RE],
        "gguf_pre": "qwen2",
        "front": [],
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "added": ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                  "<think>", "</think>"],
        "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None,
        "add_bos": False,
        "template": "Qwen-Qwen3-0.6B.jinja",
    },
    "deepseek_v3": {
        "regexes": DEEPSEEK3_RES,
        "gguf_pre": "deepseek-v3",
        "front": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
        "special": [],
        # DeepSeek-V3's own tokenizer marks these as added, non-special tokens
        "added": ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
                  "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                  "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
                  "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁sep｜>"],
        "bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>",
        "pad": "<｜end▁of▁sentence｜>", "unk": None,
        "add_bos": True,
        "template": "deepseek-ai-DeepSeek-V3.1.jinja",
    },
}

_TOKENIZER_CACHE: dict = {}


def build_tokenizer(flavour: str, templates_dir: Path):
    """Returns a transformers PreTrainedTokenizerFast for a flavour (cached per flavour)."""
    if flavour in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE[flavour]
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    fl = TOKENIZER_FLAVOURS[flavour]
    base = train_bpe(split_pre(fl["regexes"]))
    state = json.loads(base.to_str())
    vocab = state["model"]["vocab"]
    # Put the "front" special tokens first by shifting the BPE vocabulary.
    nfront = len(fl["front"])
    if nfront:
        vocab = {t: i + nfront for t, i in vocab.items()}
        for i, t in enumerate(fl["front"]):
            vocab[t] = i
        state["model"]["vocab"] = vocab
    tok = Tokenizer.from_str(json.dumps(state))
    specials = [AddedToken(t, special=True, normalized=False) for t in fl["front"] + fl["special"]]
    tok.add_special_tokens(specials)
    if fl["added"]:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in fl["added"]])
    if fl["add_bos"]:
        bos = fl["bos"]
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, bos_id)],
            ),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    template = (templates_dir / fl["template"]).read_text(encoding="utf-8")
    kwargs = dict(
        tokenizer_object=tok,
        eos_token=fl["eos"],
        chat_template=template,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    for k in ("bos", "pad", "unk"):
        if fl[k] is not None:
            kwargs[f"{k}_token"] = fl[k]
    hf = PreTrainedTokenizerFast(**kwargs)
    _TOKENIZER_CACHE[flavour] = hf
    return hf


def save_tokenizer(hf, flavour: str, out: Path):
    hf.save_pretrained(out, save_jinja_files=False)  # chat_template inside tokenizer_config.json
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["add_bos_token"] = TOKENIZER_FLAVOURS[flavour]["add_bos"]
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    sm = out / "special_tokens_map.json"
    if sm.exists():
        sm.unlink()  # everything it says is in tokenizer_config.json
    assert "chat_template" in cfg, "chat_template missing from tokenizer_config.json"


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def model_specs(tok_ids):
    """tok_ids(flavour) -> dict with vocab_size and special ids. Returns the fixture specs."""
    import transformers as T

    def common(fl, **kw):
        ids = tok_ids(fl)
        base = dict(
            vocab_size=ids["vocab_size"],
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            initializer_range=INIT_RANGE,
            hidden_act="silu",
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        )
        base.update(kw)
        return base

    specs = {}
    lt = tok_ids("llama3")
    specs["llama"] = dict(
        flavour="llama3",
        cls=T.LlamaForCausalLM,
        config=T.LlamaConfig(**common(
            "llama3",
            num_hidden_layers=3,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            # like Llama-3.1-Instruct: several end-of-generation tokens
            eos_token_id=[lt["tok"]["<|end_of_text|>"], lt["tok"]["<|eom_id|>"],
                          lt["tok"]["<|eot_id|>"]],
        )),
        notes="head_dim 16, rope theta 5e5 with llama3 rope scaling: of the 8 rotary "
              "frequencies, wavelength < 16 unchanged (1), between 16 and 64 smoothly "
              "interpolated (1), > 64 divided by factor 8 (6).",
    )
    specs["mistral"] = dict(
        flavour="mistral",
        cls=T.MistralForCausalLM,
        config=T.MistralConfig(**common(
            "mistral",
            num_hidden_layers=2,
            head_dim=32,  # != hidden/heads = 16
            rope_theta=1000000.0,
            sliding_window=None,
            tie_word_embeddings=True,
        )),
        notes="explicit head_dim 32 with hidden 64 / 4 heads (q_proj is 64 -> 128, o_proj 128 -> 64); "
              "tied embeddings (no lm_head tensor).",
    )
    specs["qwen2"] = dict(
        flavour="qwen2",
        cls=T.Qwen2ForCausalLM,
        config=T.Qwen2Config(**common(
            "qwen2",
            num_hidden_layers=3,
            rope_theta=1000000.0,
            use_sliding_window=False,
            sliding_window=None,
            tie_word_embeddings=False,
        )),
        notes="q/k/v biases set to nonzero random values; untied lm_head.",
    )
    specs["qwen3"] = dict(
        flavour="qwen3",
        cls=T.Qwen3ForCausalLM,
        config=T.Qwen3Config(**common(
            "qwen3",
            num_hidden_layers=3,
            head_dim=32,
            rope_theta=1000000.0,
            use_sliding_window=False,
            sliding_window=None,
            tie_word_embeddings=True,
            attention_bias=False,
        )),
        notes="explicit head_dim 32; per-head q_norm/k_norm RMSNorm (weights random); tied embeddings.",
    )
    specs["deepseek_v3"] = dict(
        flavour="deepseek_v3",
        cls=T.DeepseekV3ForCausalLM,
        config=T.DeepseekV3Config(**common(
            "deepseek_v3",
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=128,
            moe_intermediate_size=32,
            q_lora_rank=32,
            kv_lora_rank=64,  # != q_lora_rank, != qk_nope: transposition mistakes change shapes
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_routed_experts=12,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            # Not DeepseekV3Config fields (transformers always uses sigmoid + noaux_tc), but the
            # real config.json has them and llama.cpp's converter reads scoring_func to write
            # deepseek2.expert_gating_func (without it llama.cpp falls back to softmax).
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            rope_theta=10000.0,
            rope_scaling={
                "type": "yarn", "rope_type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                "mscale": 1.0, "mscale_all_dim": 1.0,
            },
            rope_interleave=True,
            attention_bias=False,
            tie_word_embeddings=False,
            rms_norm_eps=1e-6,
        )),
        notes="MLA (q_lora 32, kv_lora 64, qk_nope 32, qk_rope 16, v 32; 4 heads), layer 0 dense, "
              "layers 1-2 MoE: 12 routed experts in 4 groups of 3 (group score = sum of its top-2 biased scores), top-2 groups, 4 experts per token, "
              "sigmoid scores + e_score_correction_bias (random nonzero) for selection, weights "
              "normalised then x2.5, one shared expert. YaRN factor 4 over 64 original positions, "
              "mscale = mscale_all_dim = 1 (so cos/sin are unscaled and the softmax scale is "
              "qk_head_dim^-0.5 * (0.1*ln(4)+1)^2). rope_interleave true.",
    )
    specs["qwen3_moe"] = dict(
        flavour="qwen3",
        cls=T.Qwen3MoeForCausalLM,
        config=T.Qwen3MoeConfig(**common(
            "qwen3",
            num_hidden_layers=3,
            head_dim=32,
            moe_intermediate_size=32,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rope_theta=1000000.0,
            use_sliding_window=False,
            sliding_window=None,
            tie_word_embeddings=False,
            attention_bias=False,
            router_aux_loss_coef=0.0,
        )),
        notes="q/k norm, head_dim 32, 6 experts top-2 with softmax routing, norm_topk_prob true, "
              "every layer MoE, no shared expert.",
    )
    specs["mixtral"] = dict(
        flavour="mistral",
        cls=T.MixtralForCausalLM,
        config=T.MixtralConfig(**common(
            "mistral",
            num_hidden_layers=3,
            intermediate_size=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_theta=1000000.0,
            sliding_window=None,
            tie_word_embeddings=False,
            router_aux_loss_coef=0.0,
        )),
        notes="4 experts, top-2, softmax over the top-2 logits (Mixtral routing), every layer MoE.",
    )
    specs["qwen2_moe"] = dict(
        flavour="qwen2",
        cls=T.Qwen2MoeForCausalLM,
        config=T.Qwen2MoeConfig(**common(
            "qwen2",
            num_hidden_layers=3,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rope_theta=1000000.0,
            use_sliding_window=False,
            sliding_window=None,
            tie_word_embeddings=False,
            router_aux_loss_coef=0.0,
        )),
        notes="q/k/v biases random nonzero; 6 experts top-2, softmax routing without "
              "renormalisation (norm_topk_prob false); shared expert (intermediate 64) scaled by "
              "sigmoid(shared_expert_gate(x)).",
    )
    return specs


def randomize_extras(model, torch):
    """Make parameters that transformers initialises to constants random, so a loader that
    forgets one of them fails the reference test."""
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("_norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # uniform [0.5, 1.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_((torch.rand(b.shape, generator=g) - 0.5) * 0.1)  # uniform [-0.05, 0.05)


def make_prompts(hf_tok):
    prompts = []
    for n, text in zip(PROMPT_LENGTHS, PROMPT_TEXTS):
        ids = hf_tok(text, add_special_tokens=True)["input_ids"]
        assert len(ids) >= n, f"prompt {text!r} has only {len(ids)} tokens, need {n}"
        ids = ids[:n]
        decoded = hf_tok.decode(ids, skip_special_tokens=False)
        prompts.append({"ids": ids, "source_text": text, "decoded": decoded})
    return prompts


def forward_reference(model, ids, torch):
    """Full-sequence float32 forward; returns logits [len, vocab] and per-layer residual stream."""
    hidden = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(_m, _inp, out, i=i):
            hidden[i] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()
        hooks.append(layer.register_forward_hook(hook))
    emb = {}
    hooks.append(model.model.embed_tokens.register_forward_hook(
        lambda _m, _i, out: emb.__setitem__("e", out[0].detach().clone())))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    logits = out.logits[0].float().contiguous()
    return logits, emb["e"], [hidden[i] for i in range(len(model.model.layers))]


def check_router_margin(model, prompts, torch):
    """DeepSeek: HF masks non-selected groups with 0.0 (not -inf); make sure every biased score
    is > 0 so that convention cannot change the selected experts."""
    mins = []
    hooks = []
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "e_score_correction_bias"):
            continue

        def pre(mod, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            s = torch.sigmoid(x @ mod.weight.float().T) + mod.e_score_correction_bias
            mins.append(float(s.min()))
        hooks.append(gate.register_forward_pre_hook(pre))
    with torch.no_grad():
        for p in prompts:
            model(input_ids=torch.tensor([p["ids"]]), use_cache=False)
    for h in hooks:
        h.remove()
    assert mins and min(mins) > 0.0, f"router biased scores not all positive: min {min(mins)}"
    return min(mins)


def build_model_fixture(name, spec, hf_tok, out_root: Path, converter, do_gguf: bool):
    import torch
    import transformers
    from safetensors.torch import save_file

    out = out_root / name
    # llama.cpp's Q8_0 logits (written by --verify-llama-cpp) stay valid if the Q8_0 file comes
    # out byte-identical; keep them in that case, drop them otherwise.
    kept_lc = None
    if (out / "llama_cpp_q8_0.safetensors").exists() and (out / "model-q8_0.gguf").exists():
        kept_lc = (hashlib.sha256((out / "model-q8_0.gguf").read_bytes()).hexdigest(),
                   (out / "llama_cpp_q8_0.safetensors").read_bytes())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    flavour = spec["flavour"]

    torch.manual_seed(SEED)
    cfg = spec["config"]
    cfg._attn_implementation = "eager"
    model = spec["cls"](cfg).float().eval()
    randomize_extras(model, torch)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(hf_tok, flavour, out)
    gen = out / "generation_config.json"
    if gen.exists():
        gen.unlink()  # not needed; config.json carries bos/eos

    # Reload from disk, so the reference is what the committed files produce.
    model = spec["cls"].from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager").eval()
    prompts = make_prompts(hf_tok)
    tensors = {}
    for i, p in enumerate(prompts):
        logits, emb, hidden = forward_reference(model, p["ids"], torch)
        tensors[f"ids.{i}"] = torch.tensor(p["ids"], dtype=torch.int64)
        tensors[f"logits.{i}"] = logits
        tensors[f"embed.{i}"] = emb.float().contiguous()
        for li, h in enumerate(hidden):
            tensors[f"hidden.{i}.{li}"] = h.float().contiguous()
    # Batch-of-one vs. the same prompt as part of a longer sequence must agree on the prefix
    # (causality check of the reference itself).
    l2, _, _ = forward_reference(model, prompts[2]["ids"][:5], torch)
    assert torch.allclose(l2, tensors["logits.2"][:5], atol=1e-5), "reference not causal?"
    # No safetensors __metadata__: its key order is not stable between runs (reference.json has it).
    save_file(tensors, str(out / "reference.safetensors"))
    router_min = None
    if name == "deepseek_v3":
        router_min = check_router_margin(model, prompts, torch)

    cfgd = json.loads((out / "config.json").read_text())
    highlights = {k: cfgd.get(k) for k in [
        "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
        "eos_token_id", "max_position_embeddings",
        # MoE / MLA
        "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts",
        "num_local_experts", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
        "n_shared_experts", "first_k_dense_replace", "norm_topk_prob", "routed_scaling_factor",
        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "rope_interleave", "decoder_sparse_step", "mlp_only_layers",
    ] if k in cfgd}
    n_params = sum(p.numel() for p in model.parameters())
    ref = {
        "model": name,
        "architecture": cfgd["architectures"][0],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": SEED,
        "initializer_range": INIT_RANGE,
        "dtype": "float32",
        "attn_implementation": "eager",
        "parameters": n_params,
        "config_highlights": highlights,
        "notes": spec["notes"],
        "tokenizer": {
            "flavour": flavour,
            "vocab_size": len(hf_tok),
            "gguf_pre": TOKENIZER_FLAVOURS[flavour]["gguf_pre"],
            "chat_template_source": "llama.cpp models/templates/" + TOKENIZER_FLAVOURS[flavour]["template"]
                                    + " (llama-cpp-python 0.3.36 sdist)",
            "adds_bos": TOKENIZER_FLAVOURS[flavour]["add_bos"],
        },
        "prompts": [
            {
                "ids": p["ids"],
                "length": len(p["ids"]),
                "source_text": p["source_text"],
                "note": "ids = tokenizer(source_text, add_special_tokens=True) truncated to length",
                "decoded": p["decoded"],
            }
            for p in prompts
        ],
        "reference_tensors": {
            "ids.P": "int64 [len] token ids of prompt P",
            "logits.P": "float32 [len, vocab] logits at every position of one full-sequence forward",
            "embed.P": "float32 [len, hidden] token embeddings (input of layer 0)",
            "hidden.P.L": "float32 [len, hidden] residual stream after decoder layer L "
                          "(before the final norm)",
        },
    }
    if router_min is not None:
        ref["router_min_biased_score"] = router_min
    gguf_info = {}
    if do_gguf:
        for outtype in ("f32", "q8_0"):
            dest = out / f"model-{outtype}.gguf"
            ok, msg = converter.convert(out, dest, outtype, TOKENIZER_FLAVOURS[flavour]["gguf_pre"])
            gguf_info[outtype] = {"file": dest.name if ok else None, "ok": ok, "log_tail": None if ok else msg}
            if ok:
                gguf_info[outtype]["tensor_types"] = gguf_type_counts(dest)
            print(f"  gguf {outtype}: {'ok' if ok else 'FAILED'}", flush=True)
    ref["gguf"] = gguf_info
    q8 = out / "model-q8_0.gguf"
    if kept_lc and q8.exists() and hashlib.sha256(q8.read_bytes()).hexdigest() == kept_lc[0]:
        (out / "llama_cpp_q8_0.safetensors").write_bytes(kept_lc[1])
    elif kept_lc:
        print("  model-q8_0.gguf changed: rerun --verify-llama-cpp for llama_cpp_q8_0.safetensors")
    (out / "reference.json").write_text(json.dumps(ref, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return ref


def gguf_type_counts(path: Path):
    import gguf

    r = gguf.GGUFReader(str(path))
    counts = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# llama.cpp converter from the llama-cpp-python sdist
# ---------------------------------------------------------------------------------------------

WRAPPER = r'''
import os, runpy, sys
root = sys.argv.pop(1)
pre = sys.argv.pop(1)
sys.path.insert(0, os.path.join(root, "gguf-py"))   # the sdist's gguf-py, as the converter does
sys.path.insert(0, root)
import conversion.base as _base

def _get_vocab_base_pre(self, tokenizer):
    # Our fixture tokenizers are new, so llama.cpp's hash-based detection cannot know them.
    # Return the llama.cpp pre-tokenizer whose regex the tokenizer was trained with.
    return pre

_base.TextModel.get_vocab_base_pre = _get_vocab_base_pre
script = os.path.join(root, "convert_hf_to_gguf.py")
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
'''


class Converter:
    def __init__(self, tmp: Path, sdist: Path | None):
        self.tmp = tmp
        if sdist is None:
            dl = tmp / "sdist"
            dl.mkdir()
            print("downloading llama-cpp-python 0.3.36 sdist (pinned hash) ...", flush=True)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                 "--require-hashes", "--disable-pip-version-check", "-q", "-d", str(dl),
                 "-r", str(SCRIPTS / "fixtures-converter-requirements.txt")],
                check=True,
            )
            sdist = dl / SDIST_NAME
        got = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if got != SDIST_SHA256:
            sys.exit(f"sdist {sdist} has sha256 {got}, expected {SDIST_SHA256}")
        src = tmp / "src"
        src.mkdir()
        want = (f"{SDIST_ROOT}/convert_hf_to_gguf.py", f"{SDIST_ROOT}/conversion/",
                f"{SDIST_ROOT}/gguf-py/", f"{SDIST_ROOT}/models/templates/")
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(want)]
            tf.extractall(src, members=members, filter="data")
        self.root = src / SDIST_ROOT
        self.templates = self.root / "models" / "templates"
        self.wrapper = tmp / "convert_wrapper.py"
        self.wrapper.write_text(WRAPPER)

    def convert(self, model_dir: Path, dest: Path, outtype: str, pre: str):
        log = self.tmp / f"convert-{model_dir.name}-{outtype}.log"
        cmd = [sys.executable, str(self.wrapper), str(self.root), pre, str(model_dir),
               "--outtype", outtype, "--outfile", str(dest)]
        with open(log, "w") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        text = log.read_text(errors="replace")
        if r.returncode != 0 or not dest.exists():
            if dest.exists():
                dest.unlink()
            return False, text[-3000:]
        return True, text[-500:]


# ---------------------------------------------------------------------------------------------
# Chat templates and tokenizers of the real models
# ---------------------------------------------------------------------------------------------

CHAT_CASES_REAL = [
    ("system+user+assistant", [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ], False),
    ("user only, generation prompt", [
        {"role": "user", "content": "Write a haiku about pipelines."},
    ], True),
    ("user only, no generation prompt", [
        {"role": "user", "content": "Hello!"},
    ], False),
    ("no system message (template default), multi-turn", [
        {"role": "user", "content": "Hi, who are you?"},
        {"role": "assistant", "content": "I am a helpful assistant."},
        {"role": "user", "content": "Tell me a joke."},
    ], True),
    ("system+user, generation prompt, content with newlines, spaces and unicode", [
        {"role": "system", "content": "  Answer in French.\nBe brief.  "},
        {"role": "user", "content": "Translate: \"héllo wörld\" 🚀\n\n  def f(x):\n      return x * 2\n"},
    ], True),
    ("long multi-turn with system", [
        {"role": "system", "content": "You are a math tutor."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And 3 * 7?"},
        {"role": "assistant", "content": "3 * 7 = 21."},
        {"role": "user", "content": "Thanks!"},
    ], True),
]

CHAT_CASES_TINY = [
    ("system+user+assistant+user, generation prompt", [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ], True),
    ("user only, generation prompt", [
        {"role": "user", "content": "Hello!"},
    ], True),
]

TOKENIZER_TEXTS = [
    "The capital of France is",
    "Hello, world!",
    "  multiple   spaces   here  ",
    "line one\nline two\n\n\ttabbed line\r\nwindows line",
    "12345",
    "3.14159 and 1,000,000 and 2024-11-23",
    "héllo wörld 你好 🚀",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() { println!(\"{}\", 42); }",
    "I'm sure you've heard it's 'quoted', isn't it? THEY'LL SEE.",
    "Ünïcödé façade — “quotes” … naïve café",
    "日本語のテキスト、한국어 텍스트, Русский текст",
    "emoji sequence 👍🏽 👨‍👩‍👧 ✅",
    "https://example.com/path?q=1&x=2#frag",
    "ALL CAPS and MiXeD cAsE",
    " leading space",
    "trailing newline\n",
    "",
]


def gguf_meta(path: Path):
    import gguf

    r = gguf.GGUFReader(str(path))

    def get(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    tokens = get("tokenizer.ggml.tokens")
    meta = {
        "bos_id": get("tokenizer.ggml.bos_token_id"),
        "eos_id": get("tokenizer.ggml.eos_token_id"),
        "add_bos": get("tokenizer.ggml.add_bos_token"),
        "pre": get("tokenizer.ggml.pre"),
        "chat_template": get("tokenizer.chat_template"),
    }
    meta["bos"] = tokens[meta["bos_id"]] if meta["bos_id"] is not None else None
    meta["eos"] = tokens[meta["eos_id"]] if meta["eos_id"] is not None else None
    return meta


def render_cases(hf_tok, template, bos, eos, cases):
    out = []
    for label, messages, agp in cases:
        rendered = hf_tok.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=agp)
        out.append({
            "name": label,
            "template": template,
            "bos_token": bos or "",
            "eos_token": eos or "",
            "messages": messages,
            "add_generation_prompt": agp,
            "rendered": rendered,
        })
    return out


def real_model_refs(out_root: Path, models_dir: Path):
    from transformers import AutoTokenizer

    real = [
        ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ("qwen2.5", "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"),
    ]
    (out_root / "chat").mkdir(parents=True, exist_ok=True)
    (out_root / "tokenizer").mkdir(parents=True, exist_ok=True)
    for short, fname in real:
        path = models_dir / fname
        meta = gguf_meta(path)
        tok = AutoTokenizer.from_pretrained(str(models_dir), gguf_file=fname)
        fix_gguf_tokenizer(tok, meta)
        # Chat: render with the GGUF's own template and its bos/eos strings.
        cases = render_cases(tok, meta["chat_template"], meta["bos"], meta["eos"], CHAT_CASES_REAL)
        for c in cases:
            c["source"] = f"{fname}: tokenizer.chat_template; transformers apply_chat_template"
        write_json(out_root / "chat" / f"{short}.json", cases)
        # Tokenizer.
        refs = tokenizer_cases(tok, [cases[0]["rendered"], cases[3]["rendered"]])
        if short == "smollm2":
            got = tok("The capital of France is", add_special_tokens=False)["input_ids"]
            assert got == [504, 3575, 282, 4649, 314], f"SmolLM2 ids wrong: {got}"
        write_json(out_root / "tokenizer" / f"{short}.json", refs)
        print(f"  {short}: {len(cases)} chat cases, {len(refs)} tokenizer cases", flush=True)


def tokenizer_cases(tok, extra_texts):
    texts = list(TOKENIZER_TEXTS) + list(extra_texts)
    refs = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"], "add_special_tokens": False}
            for t in texts]
    refs += [{"text": t, "ids": tok(t, add_special_tokens=True)["input_ids"], "add_special_tokens": True}
             for t in texts[:3] + list(extra_texts)[:1]]
    return refs


def fix_gguf_tokenizer(tok, meta):
    """transformers 4.57's GGUF tokenizer import gets a few special-token facts wrong for these
    files: for the llama architecture (SmolLM2) it swaps bos/eos (both become <|im_start|>) and
    always prepends BOS; for qwen2 it hard-codes eos <|endoftext|>. Set them from the GGUF
    metadata (tokenizer.ggml.{bos,eos}_token_id, add_bos_token) so add_special_tokens=True
    behaves as the GGUF says (llama.cpp's behaviour). The vocabulary, merges and pre-tokenizer
    are transformers' own."""
    from tokenizers import processors

    if meta["bos"] is not None:
        tok.bos_token = meta["bos"]
    if meta["eos"] is not None:
        tok.eos_token = meta["eos"]
    backend = tok.backend_tokenizer
    if meta["add_bos"]:
        bos, bos_id = meta["bos"], meta["bos_id"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    if hasattr(tok, "add_bos_token"):
        try:
            tok.add_bos_token = bool(meta["add_bos"])
        except Exception:
            pass


def write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")



# ---------------------------------------------------------------------------------------------
# Optional cross-check with llama.cpp itself (--verify-llama-cpp). Needs only numpy and the
# llama_cpp module (llama-cpp-python 0.3.36 built from the same sdist), no torch:
#   python3 -m venv /tmp/llama-venv
#   /tmp/llama-venv/bin/pip install llama-cpp-python==0.3.36   # builds llama.cpp (~20 min on 2 cores)
#   /tmp/llama-venv/bin/python scripts/make-fixtures.py --verify-llama-cpp
# ---------------------------------------------------------------------------------------------

def read_safetensors_np(path: Path):
    import numpy as np

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    dt = {"F32": np.float32, "I64": np.int64, "F16": np.float16}
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(raw[base + a:base + b], dtype=dt[v["dtype"]]).reshape(v["shape"])
    return out


def write_safetensors_np(path: Path, tensors: dict):
    import numpy as np

    header, blobs, off = {}, [], 0
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        dt = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[a.dtype]
        b = a.tobytes()
        header[k] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def verify_llama_cpp(out_root: Path, models_dir: Path):
    import numpy as np
    import llama_cpp

    report = {"llama_cpp_python": llama_cpp.__version__, "logits": {}, "tokenizer": {}}
    failures = []
    for d in sorted(p for p in out_root.iterdir() if (p / "reference.safetensors").exists()):
        ref = read_safetensors_np(d / "reference.safetensors")
        for g in sorted(d.glob("model-*.gguf")):
            # F32 KV cache (llama.cpp's default is F16, which alone costs ~1e-3 in the logits)
            llm = llama_cpp.Llama(model_path=str(g), n_ctx=64, n_batch=64, logits_all=True,
                                  n_threads=2, verbose=False, type_k=0, type_v=0)
            worst_abs, worst_rel, argmax_agree, total = 0.0, 0.0, 0, 0
            lc_logits = {}
            for i in range(len(PROMPT_LENGTHS)):
                ids = ref[f"ids.{i}"].tolist()
                want = ref[f"logits.{i}"]
                llm.reset()
                llm.eval(ids)
                got = np.array(llm.scores[:len(ids)], dtype=np.float32)
                lc_logits[f"ids.{i}"] = ref[f"ids.{i}"]
                lc_logits[f"logits.{i}"] = got
                diff = np.abs(got - want)
                worst_abs = max(worst_abs, float(diff.max()))
                worst_rel = max(worst_rel, float(diff.max() / (np.abs(want).max() + 1e-12)))
                argmax_agree += int((got.argmax(-1) == want.argmax(-1)).sum())
                total += len(ids)
            # llama.cpp's tokenizer on the GGUF vs. the HF tokenizer's ids of the prompts
            rj = json.loads((d / "reference.json").read_text(encoding="utf-8"))
            tok_ok = True
            for p in rj["prompts"]:
                t = llm.tokenize(p["source_text"].encode("utf-8"), add_bos=True, special=True)
                if t[:p["length"]] != p["ids"]:
                    tok_ok = False
            del llm
            if "q8_0" in g.name:
                # llama.cpp's own logits for the Q8_0 file: a tighter target for a Q8_0 path than
                # the float32 reference (same quantized weights, Q8_0-quantized activations).
                write_safetensors_np(d / "llama_cpp_q8_0.safetensors", lc_logits)
            key = f"{d.name}/{g.name}"
            report["logits"][key] = {"max_abs_diff": worst_abs, "max_diff_over_max_abs_logit": worst_rel,
                                     "argmax_agree": f"{argmax_agree}/{total}", "prompt_tokens_equal": tok_ok}
            print(f"  {key}: max|diff| {worst_abs:.3g} (rel {worst_rel:.3g}), argmax {argmax_agree}/{total}, "
                  f"prompt tokens {'ok' if tok_ok else 'DIFFER'}", flush=True)
            if "f32" in g.name and worst_rel > 1e-3:
                failures.append(key)

    def check_tok(label, gguf_path: Path, cases):
        llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
        bad = []
        for c in cases:
            got = llm.tokenize(c["text"].encode("utf-8"), add_bos=c["add_special_tokens"], special=True)
            if got != c["ids"]:
                bad.append({"text": c["text"], "add_special_tokens": c["add_special_tokens"],
                            "reference": c["ids"], "llama_cpp": got})
        del llm
        report["tokenizer"][label] = {"cases": len(cases), "mismatches": bad}
        print(f"  tokenizer {label}: {len(cases) - len(bad)}/{len(cases)} equal", flush=True)

    for d in sorted(p for p in out_root.iterdir() if (p / "model-f32.gguf").exists()):
        tj = out_root / "tokenizer" / f"{d.name}.json"
        if tj.exists():
            check_tok(d.name, d / "model-f32.gguf", json.loads(tj.read_text(encoding="utf-8")))
    for short, fname in [("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                         ("qwen2.5", "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf")]:
        tj = out_root / "tokenizer" / f"{short}.json"
        if tj.exists() and (models_dir / fname).exists():
            check_tok(short, models_dir / fname, json.loads(tj.read_text(encoding="utf-8")))
    write_json(out_root / "llama_cpp_check.json", report)
    if failures:
        sys.exit(f"llama.cpp disagrees with the reference logits for: {failures}")

# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures"))
    ap.add_argument("--only", default="", help="comma-separated model fixture names")
    ap.add_argument("--no-gguf", action="store_true")
    ap.add_argument("--no-real", action="store_true", help="skip chat/tokenizer refs of real models")
    ap.add_argument("--sdist", default=None, help=f"local {SDIST_NAME} (sha256 checked)")
    ap.add_argument("--keep-temp", action="store_true")
    ap.add_argument("--verify-llama-cpp", action="store_true",
                    help="only cross-check the committed fixtures with llama.cpp (llama_cpp module)")
    args = ap.parse_args()
    models_dir = Path(os.environ.get("BATON_MODELS", "~/.cache/baton/models")).expanduser()
    if args.verify_llama_cpp:
        verify_llama_cpp(Path(args.out).resolve(), models_dir)
        return

    import torch
    import transformers

    if transformers.__version__ != TRANSFORMERS_VERSION:
        sys.exit(f"transformers {transformers.__version__} found, need {TRANSFORMERS_VERSION} "
                 "(pip install --require-hashes -r scripts/fixtures-requirements.txt)")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)

    out_root = Path(args.out).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="baton-fixtures-"))
    try:
        converter = Converter(tmp, Path(args.sdist) if args.sdist else None)

        def tok_ids(fl):
            t = build_tokenizer(fl, converter.templates)
            vocab = t.get_vocab()
            spec = TOKENIZER_FLAVOURS[fl]
            return {
                "vocab_size": len(t),
                "bos": vocab[spec["bos"]] if spec["bos"] else None,
                "eos": vocab[spec["eos"]],
                "pad": vocab[spec["pad"]] if spec["pad"] else None,
                "tok": vocab,
            }

        specs = model_specs(tok_ids)
        only = [s for s in args.only.split(",") if s]
        for s in only:
            if s not in specs:
                sys.exit(f"unknown fixture {s}; known: {', '.join(specs)}")
        summary = {}
        for name, spec in specs.items():
            if only and name not in only:
                continue
            print(f"== {name}", flush=True)
            hf_tok = build_tokenizer(spec["flavour"], converter.templates)
            ref = build_model_fixture(name, spec, hf_tok, out_root, converter, not args.no_gguf)
            summary[name] = {k: v.get("ok") for k, v in ref["gguf"].items()}
            # One chat-template case per tiny fixture's template.
            fl = TOKENIZER_FLAVOURS[spec["flavour"]]
            cases = render_cases(hf_tok, hf_tok.chat_template, fl["bos"], fl["eos"], CHAT_CASES_TINY)
            for c in cases:
                c["source"] = f"tests/fixtures/{name}/tokenizer_config.json chat_template ({fl['template']})"
            write_json(out_root / "chat" / f"{name}.json", cases)
            write_json(out_root / "tokenizer" / f"{name}.json",
                       tokenizer_cases(hf_tok, [cases[0]["rendered"]]))

        if not args.no_real and not only:
            print("== real models (chat + tokenizer references)", flush=True)
            subprocess.run(["bash", str(SCRIPTS / "fetch-models.sh"), "--all"], check=True,
                           stdout=subprocess.DEVNULL, env={**os.environ, "BATON_MODELS": str(models_dir)})
            real_model_refs(out_root, models_dir)
        print("summary (gguf conversions):", json.dumps(summary), flush=True)
    finally:
        if args.keep_temp:
            print(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
