//! The cluster key: a shared secret of at least 32 random bytes in a file (hex text or raw), which
//! every node of a cluster holds. Only [`ClusterKey::cluster_id`], a short one-way hash, ever
//! leaves the node (in mDNS TXT records and `Hello`), so nodes can tell clusters apart without
//! revealing the key.

use std::fmt;
use std::path::{Path, PathBuf};

/// Fewest key bytes accepted.
pub const MIN_KEY_BYTES: usize = 32;

/// Domain separation for the cluster id, so it is unrelated to any key the transports derive.
const CLUSTER_ID_CONTEXT: &str = "baton cluster-id v1";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cluster key file {path} does not exist; copy the cluster's key there, or create a new one (`openssl rand -hex 32 > {path} && chmod 600 {path}`)", path = .0.display())]
    Missing(PathBuf),
    #[error("{path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cluster key {path} holds {len} bytes; at least {MIN_KEY_BYTES} random bytes are required (64 hex digits or raw)", path = .path.display())]
    TooShort { path: PathBuf, len: usize },
    #[error("cluster key {path} is readable by other users (mode {mode:03o}); run `chmod 600 {path}`", path = .path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("cluster key file {path} already exists; not overwriting it", path = .0.display())]
    Exists(PathBuf),
}

/// The shared secret. Its `Debug` never prints the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey {
    bytes: Vec<u8>,
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClusterKey(id {}, {} bytes)",
            self.cluster_id(),
            self.bytes.len()
        )
    }
}

impl ClusterKey {
    /// A key from bytes already in memory (tests, `baton serve`'s ephemeral key).
    pub fn from_bytes(bytes: Vec<u8>) -> Option<Self> {
        (bytes.len() >= MIN_KEY_BYTES).then_some(ClusterKey { bytes })
    }

    /// A fresh random key.
    pub fn random() -> Self {
        ClusterKey {
            bytes: rand::random::<[u8; MIN_KEY_BYTES]>().to_vec(),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// 16 hex digits identifying the cluster: a keyed-context BLAKE3 hash of the key, truncated.
    /// Safe to publish: it does not reveal the key.
    pub fn cluster_id(&self) -> String {
        hex::encode(&blake3::derive_key(CLUSTER_ID_CONTEXT, &self.bytes)[..8])
    }

    /// Reads a key file: hex text (whitespace ignored) or raw bytes, at least 32 bytes, and on Unix
    /// readable by its owner only.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let raw = match std::fs::read(path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::Missing(path.to_path_buf()))
            }
            Err(e) => return Err(io(e)),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions {
                    path: path.to_path_buf(),
                    mode,
                });
            }
        }
        let bytes = decode(&raw);
        let len = bytes.len();
        ClusterKey::from_bytes(bytes).ok_or(KeyError::TooShort {
            path: path.to_path_buf(),
            len,
        })
    }

    /// Writes a new random key to `path` as hex, owner-only, refusing to replace an existing file.
    pub fn generate(path: &Path) -> Result<Self, KeyError> {
        use std::io::Write;
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = match options.open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(KeyError::Exists(path.to_path_buf()))
            }
            Err(e) => return Err(io(e)),
        };
        let key = ClusterKey::random();
        writeln!(file, "{}", hex::encode(&key.bytes)).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(key)
    }
}

/// Hex text when the whole file (less whitespace) is an even number of hex digits, else raw.
fn decode(raw: &[u8]) -> Vec<u8> {
    let text: Vec<u8> = raw
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if !text.is_empty() && text.len().is_multiple_of(2) && text.iter().all(u8::is_ascii_hexdigit) {
        if let Ok(bytes) = hex::decode(&text) {
            return bytes;
        }
    }
    raw.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn write(path: &Path, bytes: &[u8], mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, bytes).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn generated_key_loads_back_with_the_same_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cluster.key");
        let key = ClusterKey::generate(&path).unwrap();
        let loaded = ClusterKey::load(&path).unwrap();
        assert_eq!(key, loaded);
        assert_eq!(key.cluster_id().len(), 16);
        assert!(matches!(
            ClusterKey::generate(&path),
            Err(KeyError::Exists(_))
        ));
        let debug = format!("{key:?}");
        assert!(!debug.contains(&hex::encode(key.as_bytes())[..16]));
    }

    #[cfg(unix)]
    #[test]
    fn hex_and_raw_files_both_load() {
        let dir = tempfile::tempdir().unwrap();
        let raw: Vec<u8> = (0..40u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(200))
            .collect();
        let hex_path = dir.path().join("hex");
        write(
            &hex_path,
            format!("{}\n", hex::encode(&raw)).as_bytes(),
            0o600,
        );
        let raw_path = dir.path().join("raw");
        write(&raw_path, &raw, 0o400);
        assert_eq!(
            ClusterKey::load(&hex_path).unwrap(),
            ClusterKey::load(&raw_path).unwrap()
        );
    }

    #[cfg(unix)]
    #[test]
    fn short_missing_and_exposed_keys_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        write(&short, hex::encode([1u8; 31]).as_bytes(), 0o600);
        let err = ClusterKey::load(&short).unwrap_err();
        assert!(matches!(err, KeyError::TooShort { len: 31, .. }), "{err}");

        let missing = dir.path().join("nope");
        let err = ClusterKey::load(&missing).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");

        let open = dir.path().join("open");
        write(&open, &[7u8; 32], 0o644);
        let err = ClusterKey::load(&open).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn cluster_id_differs_per_key_and_hides_it() {
        let a = ClusterKey::from_bytes(vec![1; 32]).unwrap();
        let b = ClusterKey::from_bytes(vec![2; 32]).unwrap();
        assert_ne!(a.cluster_id(), b.cluster_id());
        assert_eq!(
            a.cluster_id(),
            ClusterKey::from_bytes(vec![1; 32]).unwrap().cluster_id()
        );
        assert!(ClusterKey::from_bytes(vec![1; 31]).is_none());
    }
}
