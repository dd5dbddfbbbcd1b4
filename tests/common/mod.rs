//! What the binary's integration tests share.

use std::path::PathBuf;

/// The real SmolLM2-135M-Instruct GGUF that `scripts/fetch-models.sh` installs (in
/// `$BATON_MODELS`, else `~/.cache/baton/models`). Missing, it fails the test: a cluster test
/// that quietly skipped would pass without testing anything.
pub fn smollm2() -> PathBuf {
    let dir = std::env::var_os("BATON_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/baton/models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/fetch-models.sh", path.display());
    path
}
