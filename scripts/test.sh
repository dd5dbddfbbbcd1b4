#!/usr/bin/env bash
# The test command: installs what the tests need (Debian packages, the real models), then runs
# every test of the workspace. Idempotent; CI runs exactly this through .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

for step in scripts/transport-ci.sh scripts/proto-fuzz.sh scripts/cluster-ci.sh; do
    echo "== $step"
    bash "$step"
done

echo "== fetching models"
bash scripts/fetch-models.sh --all

# The OpenAI API through the real `openai` client and schemathesis, against `baton serve`.
echo "== scripts/api-ci.sh"
bash scripts/api-ci.sh

echo "== cargo test"
# --no-fail-fast: one failing test binary must not hide the others' results.
cargo test --workspace --locked --no-fail-fast -- --test-threads="${BATON_TEST_THREADS:-2}"
