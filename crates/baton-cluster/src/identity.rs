//! A node's stable identity: a random 128-bit id persisted in the state directory on first run and
//! reused after, and a human name (the hostname unless configured).

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// File under the state directory holding the node id as 32 lowercase hex digits.
pub const NODE_ID_FILE: &str = "node-id";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no state directory: set $BATON_STATE_DIR or $HOME")]
    NoStateDir,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a node id ({reason}); delete the file to get a new id")]
    Corrupt { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// 128 random bits, written as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 16]);

impl NodeId {
    pub fn random() -> Self {
        NodeId(rand::random())
    }

    /// The first 8 hex digits, for names and logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for NodeId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(s.trim(), &mut id)
            .map_err(|e| format!("expected 32 hex digits: {e}"))?;
        Ok(NodeId(id))
    }
}

/// Who this node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: NodeId,
    pub name: String,
    pub state_dir: PathBuf,
}

/// `$BATON_STATE_DIR`, else `$XDG_STATE_HOME/baton`, else `~/.local/state/baton`.
pub fn default_state_dir() -> Result<PathBuf, IdentityError> {
    state_dir_from(|k| std::env::var_os(k))
}

fn state_dir_from(
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<PathBuf, IdentityError> {
    let nonempty = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = nonempty("BATON_STATE_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = nonempty("XDG_STATE_HOME") {
        return Ok(dir.join("baton"));
    }
    nonempty("HOME")
        .map(|h| h.join(".local/state/baton"))
        .ok_or(IdentityError::NoStateDir)
}

/// The hostname, or `None` where the system gives none usable.
pub fn hostname() -> Option<String> {
    let name = hostname::get().ok()?.to_string_lossy().trim().to_string();
    // mDNS instance names are UTF-8 labels; a `.local` suffix would be repeated in them.
    let name = name.strip_suffix(".local").unwrap_or(&name).to_string();
    (!name.is_empty()).then_some(name)
}

/// Reads this node's id from `state_dir`, creating the directory and a new random id on first
/// run. Creation is atomic: concurrent first runs agree on one id, and a crash never leaves a
/// partial file. `name` overrides the hostname.
pub fn load_or_create(state_dir: &Path, name: Option<String>) -> Result<Identity, IdentityError> {
    std::fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
    let path = state_dir.join(NODE_ID_FILE);
    if !path.exists() {
        let tmp = state_dir.join(format!(
            ".{NODE_ID_FILE}.{:016x}.tmp",
            rand::random::<u64>()
        ));
        let mut file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        writeln!(file, "{}", NodeId::random()).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        // A hard link fails if the target exists, so the first creator wins and later ones
        // read its id; rename would silently replace it.
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let id = text
        .parse::<NodeId>()
        .map_err(|reason| IdentityError::Corrupt {
            path: path.clone(),
            reason,
        })?;
    let name = name
        .filter(|n| !n.trim().is_empty())
        .or_else(hostname)
        .unwrap_or_else(|| format!("node-{}", id.short()));
    Ok(Identity {
        id,
        name,
        state_dir: state_dir.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/b");
        let first = load_or_create(&state, Some("n1".into())).unwrap();
        let again = load_or_create(&state, None).unwrap();
        assert_eq!(first.id, again.id);
        assert_eq!(first.name, "n1");
        assert!(!again.name.is_empty());
        let other = load_or_create(&dir.path().join("c"), None).unwrap();
        assert_ne!(first.id, other.id);
        // Only the id file remains: no temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(NODE_ID_FILE)]);
    }

    #[test]
    fn concurrent_first_runs_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let ids: Vec<NodeId> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create(&path, None).unwrap().id))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn corrupt_id_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NODE_ID_FILE), "zz").unwrap();
        let err = load_or_create(dir.path(), None).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("delete the file"));
    }

    #[test]
    fn node_id_text_round_trips() {
        let id = NodeId::random();
        assert_eq!(id.to_string().len(), 32);
        assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
        assert_eq!(id.short(), id.to_string()[..8]);
    }

    #[test]
    fn state_dir_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.into())
        };
        assert_eq!(
            state_dir_from(env(&[("BATON_STATE_DIR", "/s"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/s")
        );
        assert_eq!(
            state_dir_from(env(&[("XDG_STATE_HOME", "/x"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/x/baton")
        );
        assert_eq!(
            state_dir_from(env(&[("BATON_STATE_DIR", ""), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/h/.local/state/baton")
        );
        assert!(state_dir_from(env(&[])).is_err());
    }
}
