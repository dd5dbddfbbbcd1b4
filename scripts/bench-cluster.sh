#!/usr/bin/env bash
# Pipeline overhead on loopback (issue 4, point 7): decode tok/s of `baton serve` with 2 and 3
# workers against single-process `baton generate`, as ratios, in one run.
#
#   scripts/bench-cluster.sh [MODEL ...]      default: the embedded SmolLM2
#
# Env: BATON (binary, default target/release/baton), TOKENS (default 128), RUNS (default 3,
# the best run of each configuration counts), WIRE (default bf16).
set -euo pipefail
BATON=${BATON:-target/release/baton}
TOKENS=${TOKENS:-128}
RUNS=${RUNS:-3}
WIRE=${WIRE:-bf16}
PROMPT="Write a long story about a lighthouse keeper."
MODELS_DIR=${BATON_MODELS:-$HOME/.cache/baton/models}
[ $# -gt 0 ] || set -- "$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
STATE=$(mktemp -d)
trap 'rm -rf "$STATE"' EXIT

decode_rate() { sed -n 's/.*decode \([0-9.]*\) tok\/s.*/\1/p' | tail -1; }

best() { # command... → best decode tok/s over RUNS runs
  local b=0 r
  for _ in $(seq "$RUNS"); do
    r=$("$@" 2>&1 >/dev/null | decode_rate)
    b=$(awk -v a="$b" -v c="${r:-0}" 'BEGIN { print (c > a) ? c : a }')
  done
  echo "$b"
}

printf '%-40s %10s %10s %10s %8s %8s\n' model single serve-2w serve-3w ratio-2w ratio-3w
for model in "$@"; do
  single=$(best "$BATON" generate --model "$model" --prompt "$PROMPT" --max-tokens "$TOKENS" --split 1 --wire-dtype "$WIRE")
  w2=$(best "$BATON" serve --workers 2 --model "$model" --prompt "$PROMPT" --max-tokens "$TOKENS" --wire-dtype "$WIRE" --state-dir "$STATE")
  w3=$(best "$BATON" serve --workers 3 --model "$model" --prompt "$PROMPT" --max-tokens "$TOKENS" --wire-dtype "$WIRE" --state-dir "$STATE")
  awk -v m="$(basename "$model")" -v s="$single" -v a="$w2" -v b="$w3" \
    'BEGIN { printf "%-40s %10.1f %10.1f %10.1f %8.3f %8.3f\n", m, s, a, b, a / s, b / s }'
done
