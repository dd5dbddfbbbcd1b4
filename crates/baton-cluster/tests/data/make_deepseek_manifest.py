#!/usr/bin/env python3
"""Writes deepseek-v3-q4_k_m.json: the baton Manifest of DeepSeek-V3 (671B) quantised to Q4_K_M,
computed from the published architecture rather than read from a 400 GB file.

Architecture (DeepSeek-V3 config.json): 61 layers, hidden 7168, vocab 129280, 128 heads,
MLA with q_lora_rank 1536, kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128,
v_head_dim 128; layers 0-2 dense (intermediate 18432), layers 3-60 MoE with 256 routed experts
(moe_intermediate 2048) + 1 shared expert of the same size, 8 active; context 163840.

Tensors per layer as llama.cpp names them in GGUF (the multi-token-prediction layer 61 is not
counted: llama.cpp does not run it):
  attn_norm, ffn_norm, attn_q_a_norm, attn_kv_a_norm    f32
  attn_q_a      7168 x 1536          attn_q_b      1536 x 128*(128+64)
  attn_kv_a_mqa 7168 x (512+64)      attn_kv_b     512 x 128*(128+128)
  attn_output   128*128 x 7168
  dense:  ffn_gate, ffn_up 7168 x 18432; ffn_down 18432 x 7168
  MoE:    ffn_gate_inp 7168 x 256 (f32), exp_probs_b 256 (f32),
          ffn_{gate,up}_exps 256 x 7168 x 2048, ffn_down_exps 256 x 2048 x 7168,
          ffn_{gate,up}_shexp 7168 x 2048, ffn_down_shexp 2048 x 7168
  token_embd 129280 x 7168, output_norm 7168 (f32), output 7168 x 129280

Q4_K_M type mix, following llama.cpp's llama_tensor_get_type for LLAMA_FTYPE_MOSTLY_Q4_K_M:
  - default Q4_K (144 bytes per 256 weights = 4.5 bits/weight);
  - output.weight Q6_K (210 bytes per 256 = 6.5625 bits/weight);
  - ffn_down* Q6_K in the layers where use_more_bits(i, n) holds (first and last eighth, and every
    third layer in between), else Q4_K; attn_v has no MLA counterpart, so attention stays Q4_K;
  - token_embd Q4_K; norms, router and expert bias f32.
This lands at ~4.8 bits/weight overall (~404 GB), close to published DeepSeek-V3 Q4_K_M files.

KV cache: MLA caches the compressed latent (512) and the shared RoPE key (64) per token per layer,
at f16: (512 + 64) x 2 = 1152 bytes. Activations: one f32 hidden state = 7168 x 4 bytes.
"""

import json
import os

N_LAYERS = 61
HIDDEN = 7168
VOCAB = 129280
HEADS = 128
Q_LORA, KV_LORA, ROPE, NOPE, V_HEAD = 1536, 512, 64, 128, 128
DENSE_LAYERS, DENSE_FF = 3, 18432
EXPERTS, MOE_FF = 256, 2048

BYTES_PER_BLOCK = {"q4_k": 144, "q6_k": 210}  # per 256 weights


def quant_bytes(dtype, n):
    if dtype == "f32":
        return 4 * n
    assert n % 256 == 0, (dtype, n)
    return n // 256 * BYTES_PER_BLOCK[dtype]


def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def layer_tensors(i):
    down = "q6_k" if use_more_bits(i, N_LAYERS) else "q4_k"
    t = [
        ("f32", HIDDEN), ("f32", HIDDEN), ("f32", Q_LORA), ("f32", KV_LORA),
        ("q4_k", HIDDEN * Q_LORA),
        ("q4_k", Q_LORA * HEADS * (NOPE + ROPE)),
        ("q4_k", HIDDEN * (KV_LORA + ROPE)),
        ("q4_k", KV_LORA * HEADS * (NOPE + V_HEAD)),
        ("q4_k", HEADS * V_HEAD * HIDDEN),
    ]
    if i < DENSE_LAYERS:
        t += [("q4_k", HIDDEN * DENSE_FF), ("q4_k", HIDDEN * DENSE_FF), (down, DENSE_FF * HIDDEN)]
    else:
        t += [
            ("f32", HIDDEN * EXPERTS), ("f32", EXPERTS),
            ("q4_k", EXPERTS * HIDDEN * MOE_FF), ("q4_k", EXPERTS * HIDDEN * MOE_FF),
            (down, EXPERTS * MOE_FF * HIDDEN),
            ("q4_k", HIDDEN * MOE_FF), ("q4_k", HIDDEN * MOE_FF), (down, MOE_FF * HIDDEN),
        ]
    return t


def main():
    by_dtype = {}

    def add(tensors):
        total = 0
        for dtype, n in tensors:
            b = quant_bytes(dtype, n)
            by_dtype[dtype] = by_dtype.get(dtype, 0) + b
            total += b
        return total

    layer_bytes = [add(layer_tensors(i)) for i in range(N_LAYERS)]
    embedding = add([("q4_k", VOCAB * HIDDEN)])
    head = add([("f32", HIDDEN), ("q6_k", HIDDEN * VOCAB)])
    manifest = {
        "architecture": "deepseek_v3",
        "name": "DeepSeek-V3 Q4_K_M (computed, see make_deepseek_manifest.py)",
        "format": "gguf",
        "n_layers": N_LAYERS,
        "hidden_size": HIDDEN,
        "vocab_size": VOCAB,
        "context_length": 163840,
        "layer_bytes": layer_bytes,
        "embedding_bytes": embedding,
        "head_bytes": head,
        "kv_bytes_per_token": [(KV_LORA + ROPE) * 2] * N_LAYERS,
        "kv_dtype": "f16",
        "activation_bytes_per_token": HIDDEN * 4,
        "bytes_by_dtype": dict(sorted(by_dtype.items())),
    }
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepseek-v3-q4_k_m.json")
    with open(out, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    total = sum(layer_bytes) + embedding + head
    params = 0
    for i in range(N_LAYERS):
        params += sum(n for _, n in layer_tensors(i))
    params += 2 * VOCAB * HIDDEN + HIDDEN
    print(f"{out}: {total / 1e9:.1f} GB ({total / 2**30:.1f} GiB), "
          f"{params / 1e9:.1f}B weights, {8 * total / params:.2f} bits/weight")


if __name__ == "__main__":
    main()
