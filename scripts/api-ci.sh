#!/usr/bin/env bash
# The API's client-side tests against a real cluster: builds the `baton` binary, starts
# `baton serve --workers 2` (the head running stage 0 plus two worker processes on loopback) with the
# real SmolLM2 model and an API key on a free loopback port, then runs, each under a time limit,
#   1. tests/api/test_openai.py with the real `openai` package (pytest), and
#   2. schemathesis against /openapi.json for a bounded number of cases (no 5xx, responses match
#      the schema, status codes and content types are the documented ones).
# Python packages come from scripts/api-requirements.txt (pinned with hashes) into the venv
# ${BATON_VENV:-$HOME/.cache/baton/venv}/api. Needs scripts/fetch-models.sh to have run.
# Environment: BATON_MODELS (model directory), BATON_API_PORT (default: a free port),
# API_CI_PYTEST_TIMEOUT / API_CI_SCHEMATHESIS_TIMEOUT (seconds, default 900 / 900),
# API_CI_MAX_EXAMPLES (schemathesis cases per operation, default 5).
set -euo pipefail
cd "$(dirname "$0")/.."

models="${BATON_MODELS:-$HOME/.cache/baton/models}"
model="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -f "$model" ]]; then
    echo "error: $model is missing: run scripts/fetch-models.sh" >&2
    exit 1
fi

venv="${BATON_VENV:-$HOME/.cache/baton/venv}/api"
stamp="$venv/.requirements.sha256"
want="$(sha256sum scripts/api-requirements.txt | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "== installing the API test packages into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --require-hashes -r scripts/api-requirements.txt
    echo "$want" > "$stamp"
fi

echo "== building the server"
cargo build --locked --bin baton
# .ci/run points CARGO_TARGET_DIR outside the clone.
server="${CARGO_TARGET_DIR:-target}/debug/baton"
state="$(mktemp -d -t baton-api-ci.XXXXXX)"

port="${BATON_API_PORT:-$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export BATON_API_URL="http://127.0.0.1:$port"
export BATON_API_KEY="api-ci-key"
export BATON_MODEL_ID="smollm2"
pid=""
# SIGTERM lets serve shut its workers down; they also exit when serve's end of their stdin closes.
stop_server() { if [[ -n "$pid" ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; fi; }
trap 'stop_server; rm -rf "$state"' EXIT
# start_server MAX_TOKENS: the server with requests capped at MAX_TOKENS generated tokens.
start_server() {
    local log
    log="$(mktemp -t baton-api-ci.XXXXXX.log)"
    BATON_API_KEYS="$BATON_API_KEY" BATON_LOG=warn "$server" serve --workers 2 --state-dir "$state" \
        --model "$model" --model-id "$BATON_MODEL_ID" \
        --listen "127.0.0.1:$port" --default-max-tokens "$1" --max-tokens-limit "$1" </dev/null >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 1 900); do
        if curl -fsS -m 5 "$BATON_API_URL/ready" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then cat "$log" >&2; echo "error: the server exited" >&2; exit 1; fi
        sleep 0.2
    done
    cat "$log" >&2; echo "error: the server never became ready" >&2; exit 1
}

start_server 64
echo "== pytest tests/api (openai client)"
timeout "${API_CI_PYTEST_TIMEOUT:-900}" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/api

echo "== schemathesis"
# Every documented operation, with the key. Generated tokens are capped at 4 (the schema says so)
# to keep each case short on CPU; the phases that need no extra setup run: examples and fuzzing.
stop_server
start_server 4
timeout "${API_CI_SCHEMATHESIS_TIMEOUT:-900}" "$venv/bin/schemathesis" run "$BATON_API_URL/openapi.json" \
    --header "Authorization: Bearer $BATON_API_KEY" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
    --max-examples "${API_CI_MAX_EXAMPLES:-5}" \
    --phases examples,fuzzing \
    --request-timeout 120 \
    --workers 1
echo "== API CI passed"
