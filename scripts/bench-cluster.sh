#!/usr/bin/env bash
# Pipeline overhead on loopback (issue 4, point 7): decode tok/s of `baton serve` with 2 and 3
# workers against single-process `baton generate`, as ratios, in one run.
#
#   scripts/bench-cluster.sh [MODEL ...]      default: the embedded SmolLM2
#
# Env: BATON (binary, default target/release/baton), TOKENS (default 128), SHORT (default 16,
# the short run whose time is subtracted), RUNS (default 3,
# the best run of each configuration counts), WIRE (default bf16), PROMPT.
set -euo pipefail
BATON=${BATON:-${CARGO_TARGET_DIR:-target}/release/baton}
TOKENS=${TOKENS:-128}
SHORT=${SHORT:-16}
RUNS=${RUNS:-3}
WIRE=${WIRE:-bf16}
# A raw prompt that greedy decoding continues for long on both models (a story prompt made
# SmolLM2 stop at once), so every configuration decodes the same TOKENS tokens.
PROMPT=${PROMPT:-"1, 2, 3, 4, 5, 6, 7, 8,"}
MODELS_DIR=${BATON_MODELS:-$HOME/.cache/baton/models}
[ $# -gt 0 ] || set -- "$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
STATE=$(mktemp -d)
trap 'rm -rf "$STATE"' EXIT

# Decode rate by wall clock: the same command asked for TOKENS and for SHORT tokens; the time
# between the two is (TOKENS - SHORT) decode steps, with start-up, loading and prefill cancelled
# out. Each command's own tok/s figure is not used: serve's and generate's count from different
# moments.
wall() { # tokens command... → seconds it ran
  local n=$1 t0 t1 got
  shift
  t0=$(date +%s.%N)
  got=$("$@" --max-tokens "$n" 2>&1 >/dev/null | sed -n 's/.*generated \([0-9]*\) tokens.*/\1/p' | tail -1)
  t1=$(date +%s.%N)
  if [ "${got:-0}" != "$n" ]; then
    echo "warning: generated ${got:-no} tokens, not $n: $*" >&2
  fi
  awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'
}

rate() { # command... → decode tok/s
  local short long
  short=$(wall "$SHORT" "$@")
  long=$(wall "$TOKENS" "$@")
  awk -v s="$short" -v l="$long" -v n=$((TOKENS - SHORT)) 'BEGIN { print (l > s) ? n / (l - s) : 0 }'
}

max() { awk -v a="$1" -v b="$2" 'BEGIN { print (b > a) ? b : a }'; }

echo "# $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), decode tok/s over tokens $SHORT..$TOKENS by wall clock, best of $RUNS, wire $WIRE"

printf '%-40s %10s %10s %10s %8s %8s\n' model single serve-2w serve-3w ratio-2w ratio-3w
# The three configurations take turns within each run, so that a change in the machine's load
# (it may be shared) hits all of them alike; the best run of each counts.
for model in "$@"; do
  single=0 w2=0 w3=0
  for _ in $(seq "$RUNS"); do
    single=$(max "$single" "$(rate "$BATON" generate --model "$model" --prompt "$PROMPT" --split 1 --wire-dtype "$WIRE")")
    w2=$(max "$w2" "$(rate "$BATON" serve --workers 2 --model "$model" --prompt "$PROMPT" --wire-dtype "$WIRE" --state-dir "$STATE")")
    w3=$(max "$w3" "$(rate "$BATON" serve --workers 3 --model "$model" --prompt "$PROMPT" --wire-dtype "$WIRE" --state-dir "$STATE")")
  done
  awk -v m="$(basename "$model")" -v s="$single" -v a="$w2" -v b="$w3" \
    'BEGIN { printf "%-40s %10.1f %10.1f %10.1f %8.3f %8.3f\n", m, s, a, b, a / s, b / s }'
done
