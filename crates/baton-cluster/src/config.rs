//! `cluster.toml`: one file for every node of a cluster. Every setting is documented in
//! `cluster.example.toml` at the repository root; unknown keys are errors that name the key, so a
//! typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::units;

/// Environment variable that replaces `api.keys` (comma-separated).
pub const API_KEYS_ENV: &str = "BATON_API_KEYS";
/// Environment variable naming the config file when no path is given.
pub const CONFIG_ENV: &str = "BATON_CONFIG";

pub const DEFAULT_CONTROL_PORT: u16 = 8422;
pub const DEFAULT_DATA_PORT: u16 = 8423;
pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:8421";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}", path = .path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `{key}`: {reason}", path = .path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// The whole file. Every field has a default, so an empty file is a valid configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// A label for logs and `baton status`; the cluster's identity is the key.
    pub cluster_name: String,
    /// File holding the cluster key (see [`crate::key`]); `None`: `<state_dir>/cluster.key`.
    pub key_file: Option<PathBuf>,
    /// This node's human name; `None`: the hostname.
    pub node_name: Option<String>,
    /// Where the node id and the weight cache live; `None`: `$BATON_STATE_DIR`, else
    /// `~/.local/state/baton`.
    pub state_dir: Option<PathBuf>,
    /// Data-link transport preference.
    pub transport: TransportChoice,
    /// Memory kept free on every node, unless a node overrides it.
    pub memory_headroom: Headroom,
    pub ports: Ports,
    pub api: Api,
    pub kv: KvConfig,
    pub discovery: Discovery,
    /// Control endpoints (`host:port`) of workers to use without mDNS.
    pub peers: Vec<String>,
    /// Per-node settings, keyed by node name.
    pub nodes: BTreeMap<String, NodeConfig>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            cluster_name: "baton".into(),
            key_file: None,
            node_name: None,
            state_dir: None,
            transport: TransportChoice::Auto,
            memory_headroom: Headroom::default(),
            ports: Ports::default(),
            api: Api::default(),
            kv: KvConfig::default(),
            discovery: Discovery::default(),
            peers: Vec::new(),
            nodes: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ports {
    /// The worker's gRPC control service.
    pub control: u16,
    /// The worker's data-link listener (TCP and QUIC share the number).
    pub data: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            control: DEFAULT_CONTROL_PORT,
            data: DEFAULT_DATA_PORT,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// Where the head's OpenAI-compatible HTTP API listens.
    pub listen: String,
    /// Bearer tokens accepted by the API; empty: no authentication. `$BATON_API_KEYS` replaces it.
    pub keys: Vec<String>,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            listen: DEFAULT_API_LISTEN.into(),
            keys: Vec::new(),
        }
    }
}

/// The serving budget the KV cache is sized for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvConfig {
    /// Tokens per sequence (prompt + output); 0: the model's trained context length.
    pub context_length: u64,
    /// Sequences served at once.
    pub sequences: u64,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            context_length: 4096,
            sequences: 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Discovery {
    /// Advertise (workers) and browse (head) over mDNS.
    pub mdns: bool,
    /// How long `baton plan` and the head's start browse before planning.
    pub browse_ms: u64,
    /// A node not heard from for this long leaves the inventory.
    pub expiry_ms: u64,
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            mdns: true,
            browse_ms: 2000,
            expiry_ms: 15_000,
        }
    }
}

/// Settings for one node, found by its name.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's copy of the model; `None`: the head's path, else weights are pushed.
    pub model_path: Option<PathBuf>,
    /// Layers this node serves, `start..end`; set on all nodes that serve or on none.
    pub layers: Option<LayerSpan>,
    /// Overrides the cluster-wide `memory_headroom`.
    pub memory_headroom: Option<Headroom>,
    /// Overrides the memory the node reports as available (`64G`).
    #[serde(with = "opt_bytes")]
    pub memory: Option<u64>,
    /// Memory bandwidth for the planner (`400GB/s`); `None`: measured, else a backend default.
    #[serde(with = "opt_bandwidth")]
    pub memory_bandwidth: Option<u64>,
}

/// Data-link transport preference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// RDMA when both ends pass the gate, else the faster of QUIC and TCP by a probe.
    #[default]
    Auto,
    Rdma,
    Quic,
    Tcp,
}

impl TransportChoice {
    pub fn to_proto(self) -> baton_proto::pb::TransportPreference {
        use baton_proto::pb::TransportPreference as P;
        match self {
            TransportChoice::Auto => P::Auto,
            TransportChoice::Rdma => P::Rdma,
            TransportChoice::Quic => P::Quic,
            TransportChoice::Tcp => P::Tcp,
        }
    }
}

/// Memory a node keeps free: a byte count or a share of its total memory. Written `"4GiB"`,
/// `"10%"` or a plain integer of bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Headroom {
    Bytes(u64),
    Percent(f64),
}

impl Default for Headroom {
    fn default() -> Self {
        Headroom::Percent(10.0)
    }
}

impl Headroom {
    /// Bytes to keep free on a node with `total` bytes of memory.
    pub fn resolve(self, total: u64) -> u64 {
        match self {
            Headroom::Bytes(b) => b,
            Headroom::Percent(p) => (total as f64 * p / 100.0).round() as u64,
        }
    }
}

impl std::str::FromStr for Headroom {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().strip_suffix('%') {
            Some(p) => {
                let p: f64 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{s}`: not a percentage"))?;
                if (0.0..100.0).contains(&p) {
                    Ok(Headroom::Percent(p))
                } else {
                    Err(format!("`{s}`: a percentage must be in [0, 100)"))
                }
            }
            None => units::parse_bytes(s).map(Headroom::Bytes),
        }
    }
}

impl fmt::Display for Headroom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Headroom::Bytes(b) => write!(f, "{b}"),
            Headroom::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrInt {
    Str(String),
    Int(u64),
}

impl<'de> Deserialize<'de> for Headroom {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match StrOrInt::deserialize(d)? {
            StrOrInt::Str(s) => s.parse().map_err(serde::de::Error::custom),
            StrOrInt::Int(b) => Ok(Headroom::Bytes(b)),
        }
    }
}

impl Serialize for Headroom {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Layers `start..end` (end exclusive), written `"0..20"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpan {
    pub start: usize,
    pub end: usize,
}

impl std::str::FromStr for LayerSpan {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: expected `start..end` with start < end, e.g. \"0..20\"");
        let (a, b) = s.trim().split_once("..").ok_or_else(bad)?;
        let start: usize = a.trim().parse().map_err(|_| bad())?;
        let end: usize = b.trim().parse().map_err(|_| bad())?;
        if start >= end {
            return Err(bad());
        }
        Ok(LayerSpan { start, end })
    }
}

impl fmt::Display for LayerSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl<'de> Deserialize<'de> for LayerSpan {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for LayerSpan {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

macro_rules! opt_unit {
    ($module:ident, $parse:path) => {
        mod $module {
            use super::*;

            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
                match Option::<StrOrInt>::deserialize(d)? {
                    None => Ok(None),
                    Some(StrOrInt::Int(n)) => Ok(Some(n)),
                    Some(StrOrInt::Str(s)) => {
                        $parse(&s).map(Some).map_err(serde::de::Error::custom)
                    }
                }
            }

            pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
                match v {
                    Some(n) => s.serialize_u64(*n),
                    None => s.serialize_none(),
                }
            }
        }
    };
}

opt_unit!(opt_bytes, units::parse_bytes);
opt_unit!(opt_bandwidth, units::parse_bandwidth);

impl ClusterConfig {
    /// Parses `text` (read from `path`, used in messages) and applies environment overrides.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: ClusterConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.apply_env(|k| std::env::var(k).ok());
        config.validate(path)?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// `path` when given; else `$BATON_CONFIG`; else `~/.config/baton/cluster.toml` if it
    /// exists; else the defaults (with environment overrides).
    pub fn load_or_default(path: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(p) = path {
            return Self::load(p);
        }
        if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
            return Self::load(Path::new(&p));
        }
        if let Some(home) = std::env::var_os("HOME") {
            let p = PathBuf::from(home).join(".config/baton/cluster.toml");
            if p.exists() {
                return Self::load(&p);
            }
        }
        let mut config = ClusterConfig::default();
        config.apply_env(|k| std::env::var(k).ok());
        Ok(config)
    }

    fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        if let Some(keys) = var(API_KEYS_ENV) {
            self.api.keys = keys
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(String::from)
                .collect();
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        };
        for (i, peer) in self.peers.iter().enumerate() {
            let port = peer
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            match port {
                Some((host, Ok(p))) if !host.is_empty() && p != 0 => {}
                _ => {
                    return Err(invalid(
                        format!("peers[{i}]"),
                        format!("`{peer}` is not host:port"),
                    ))
                }
            }
        }
        if self.api.keys.iter().any(|k| k.trim().is_empty()) {
            return Err(invalid("api.keys".into(), "an API key is empty".into()));
        }
        if self.kv.sequences == 0 {
            return Err(invalid("kv.sequences".into(), "must be at least 1".into()));
        }
        if self.ports.control == self.ports.data && self.ports.control != 0 {
            return Err(invalid(
                "ports".into(),
                "control and data ports must differ".into(),
            ));
        }
        let with_layers = self.nodes.values().filter(|n| n.layers.is_some()).count();
        if with_layers != 0 && with_layers != self.nodes.len() {
            let missing: Vec<&str> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.layers.is_none())
                .map(|(name, _)| name.as_str())
                .collect();
            return Err(invalid(
                "nodes.*.layers".into(),
                format!(
                    "manual layers are set on some nodes but not on {}; set them on every node \
                     listed under [nodes] or on none",
                    missing.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// The state directory: `$BATON_STATE_DIR`, else `state_dir`, else the default.
    pub fn state_dir(&self) -> Result<PathBuf, crate::identity::IdentityError> {
        match (
            std::env::var_os("BATON_STATE_DIR").filter(|v| !v.is_empty()),
            &self.state_dir,
        ) {
            (Some(env), _) => Ok(PathBuf::from(env)),
            (None, Some(dir)) => Ok(dir.clone()),
            (None, None) => crate::identity::default_state_dir(),
        }
    }

    /// The key file: `key_file`, else `<state_dir>/cluster.key`.
    pub fn key_file(&self) -> Result<PathBuf, crate::identity::IdentityError> {
        match &self.key_file {
            Some(p) => Ok(p.clone()),
            None => Ok(self.state_dir()?.join("cluster.key")),
        }
    }

    /// The serving budget, with `context_length = 0` meaning the model's own.
    pub fn serving_budget(&self, model_context: u64) -> crate::planner::ServingBudget {
        let context = if self.kv.context_length == 0 {
            model_context
        } else {
            self.kv.context_length
        };
        crate::planner::ServingBudget {
            context_length: context,
            sequences: self.kv.sequences,
        }
    }

    /// The manual placement, in layer order, when `layers` is set on the nodes.
    pub fn manual_stages(&self) -> Option<Vec<crate::planner::ManualStage>> {
        let mut stages: Vec<crate::planner::ManualStage> = self
            .nodes
            .iter()
            .filter_map(|(name, n)| {
                n.layers.map(|l| crate::planner::ManualStage {
                    node: name.clone(),
                    start: l.start,
                    end: l.end,
                })
            })
            .collect();
        stages.sort_by_key(|s| (s.start, s.end));
        (!stages.is_empty()).then_some(stages)
    }

    /// The headroom for `node`: its own, else the cluster-wide one.
    pub fn headroom_for(&self, node: &str) -> Headroom {
        self.nodes
            .get(node)
            .and_then(|n| n.memory_headroom)
            .unwrap_or(self.memory_headroom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
        let mut config: ClusterConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "t.toml".into(),
            message: e.to_string(),
        })?;
        config.apply_env(|_| None);
        config.validate(Path::new("t.toml"))?;
        Ok(config)
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), ClusterConfig::default());
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse("cluster_name = \"x\"\ntrasnport = \"tcp\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("trasnport"), "{err}");
        let err = parse("[nodes.a]\nmodel_pth = \"/m\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("model_pth"), "{err}");
        let err = parse("[kv]\ncontext = 5\n").unwrap_err().to_string();
        assert!(err.contains("context"), "{err}");
    }

    #[test]
    fn values_in_units() {
        let c = parse(
            r#"
            memory_headroom = "4GiB"
            transport = "quic"
            peers = ["10.0.0.2:8422", "[fe80::1]:8422"]
            [nodes.m1]
            memory_headroom = "15%"
            memory = "64G"
            memory_bandwidth = "400GB/s"
            layers = "0..20"
            [nodes.m2]
            memory_headroom = 1073741824
            layers = "20..61"
            "#,
        )
        .unwrap();
        assert_eq!(c.memory_headroom, Headroom::Bytes(4 * units::GIB));
        assert_eq!(c.transport, TransportChoice::Quic);
        assert_eq!(c.headroom_for("m1"), Headroom::Percent(15.0));
        assert_eq!(c.headroom_for("m2"), Headroom::Bytes(1 << 30));
        assert_eq!(c.headroom_for("other"), Headroom::Bytes(4 * units::GIB));
        assert_eq!(c.nodes["m1"].memory, Some(64 * units::GIB));
        assert_eq!(c.nodes["m1"].memory_bandwidth, Some(400_000_000_000));
        let manual = c.manual_stages().unwrap();
        assert_eq!((manual[0].node.as_str(), manual[0].end), ("m1", 20));
        assert_eq!((manual[1].node.as_str(), manual[1].start), ("m2", 20));
        assert_eq!(Headroom::Percent(10.0).resolve(64 * units::GIB), 6871947674);
    }

    #[test]
    fn invalid_values_name_their_key() {
        for (text, needle) in [
            ("peers = [\"nohost\"]", "peers[0]"),
            ("memory_headroom = \"120%\"", "[0, 100)"),
            ("[nodes.a]\nlayers = \"5..5\"", "start < end"),
            (
                "[nodes.a]\nlayers = \"0..5\"\n[nodes.b]\nmodel_path = \"/m\"",
                "not on b",
            ),
            ("[kv]\nsequences = 0", "kv.sequences"),
            ("transport = \"udp\"", "udp"),
            ("[ports]\ncontrol = 9000\ndata = 9000", "must differ"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn api_keys_come_from_the_environment_when_set() {
        let mut c = parse("[api]\nkeys = [\"file-key\"]").unwrap();
        c.apply_env(|k| (k == API_KEYS_ENV).then(|| "a, b,,c".to_string()));
        assert_eq!(c.api.keys, vec!["a", "b", "c"]);
    }

    #[test]
    fn the_example_file_parses_and_documents_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut config: ClusterConfig = toml::from_str(&text).unwrap();
        config.apply_env(|_| None);
        config.validate(&path).unwrap();
        // Every key the types know appears in the example, set or commented out.
        let full = toml::to_string(&ClusterConfig {
            nodes: [(
                "n".to_string(),
                NodeConfig {
                    model_path: Some("/m".into()),
                    layers: Some(LayerSpan { start: 0, end: 1 }),
                    memory_headroom: Some(Headroom::Bytes(1)),
                    memory: Some(1),
                    memory_bandwidth: Some(1),
                },
            )]
            .into(),
            key_file: Some("/k".into()),
            node_name: Some("n".into()),
            state_dir: Some("/s".into()),
            ..ClusterConfig::default()
        })
        .unwrap();
        for line in full.lines() {
            if let Some((key, _)) = line.split_once(" = ") {
                let documented = text.lines().any(|l| {
                    let l = l.trim_start_matches('#').trim_start();
                    l.starts_with(&format!("{key} ="))
                });
                assert!(documented, "cluster.example.toml does not document `{key}`");
            }
        }
    }
}
