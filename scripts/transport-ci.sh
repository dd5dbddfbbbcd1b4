#!/usr/bin/env bash
# What baton-transport needs in CI beyond `cargo test --workspace`, run before it by
# scripts/test.sh: the Debian packages (verbs headers for the layout test and the emulated
# provider, the real libibverbs.so.1 for the no-device gate test) and a bounded fuzz run of
# the frame decoder. Idempotent; runs as root on Debian 12 with the pinned stable toolchain.
#
# Environment: FUZZ_SECONDS (default 60; 0 skips fuzzing).
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
CARGO_FUZZ_VERSION=0.13.2

need=()
for p in libibverbs-dev ibverbs-providers libibverbs1 gcc libc6-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
    echo "transport-ci: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
test -f /usr/include/infiniband/verbs.h || { echo "transport-ci: verbs.h missing after install" >&2; exit 1; }

if [ "$FUZZ_SECONDS" -gt 0 ]; then
    # cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP lets the pinned stable compiler use them.
    export RUSTC_BOOTSTRAP=1
    if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
        cargo install --locked "cargo-fuzz@$CARGO_FUZZ_VERSION"
    fi
    (
        cd crates/baton-transport
        mkdir -p fuzz/corpus/frame_decode
        cargo fuzz run frame_decode -- -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -max_len=65536
    )
fi
echo "transport-ci: ok"
