#!/usr/bin/env bash
# Bounded fuzz runs of what a peer reads off the control plane and the data links beyond the
# frame decoder (which scripts/transport-ci.sh fuzzes): crates/baton-proto/fuzz's
# `control_messages` (every request a worker takes, every reply a head takes, decoded and handled)
# and `stage_frames` (decoded frames into baton-worker's payload code). One target at a time,
# FUZZ_SECONDS each; corpora stay in crates/baton-proto/fuzz/corpus (ignored by git) so repeated
# runs on one machine go on from where they stopped. Run by scripts/test.sh.
#
# Environment: FUZZ_SECONDS (default 60; 0 skips fuzzing).
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
CARGO_FUZZ_VERSION=0.13.2

if [ "$FUZZ_SECONDS" -le 0 ]; then
    echo "proto-fuzz: skipped (FUZZ_SECONDS=$FUZZ_SECONDS)"
    exit 0
fi
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP lets the pinned stable compiler use them.
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    cargo install --locked "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi
cd crates/baton-proto
for target in control_messages stage_frames; do
    echo "proto-fuzz: $target for ${FUZZ_SECONDS}s"
    mkdir -p "fuzz/corpus/$target"
    cargo fuzz run "$target" -- -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -max_len=65536
done
echo "proto-fuzz: ok"
