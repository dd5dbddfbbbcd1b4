//! Where models live on this machine, and the embedded default.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// The model every command uses when none is given (fetched by `scripts/fetch-models.sh`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$BATON_MODELS`, else `~/.cache/baton/models`.
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BATON_MODELS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/baton/models")
}

/// The given path, or the default model in the models directory.
pub fn resolve(model: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = model {
        return Ok(path);
    }
    let path = models_dir().join(DEFAULT_MODEL_FILE);
    if !path.exists() {
        bail!(
            "no --model given and the default model {} is not fetched: run scripts/fetch-models.sh",
            path.display()
        );
    }
    Ok(path)
}

/// A compute device by name.
pub fn device(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).context("opening CUDA device 0")?,
        "metal" => Device::new_metal(0).context("opening Metal device 0")?,
        other => bail!("unknown device `{other}` (expected cpu, cuda or metal)"),
    })
}
