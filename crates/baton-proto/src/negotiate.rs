//! Protocol agreement between two peers of possibly different software versions.
//!
//! Each side sends a [`pb::Protocol`]: the revision it speaks, the oldest it accepts, the optional
//! features it implements and the ones it requires. Two peers agree on the newer of the oldest
//! revisions both accept, i.e. `min(local.version, remote.version)` as long as that is at least
//! each side's `min_version`, and on the features both implement. Every difference that prevents
//! agreement is reported, not only the first.

use std::collections::BTreeSet;
use std::fmt;

use crate::pb;

/// The protocol revision this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest revision this build accepts from a peer.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// Optional capabilities this build implements.
pub const FEATURES: &[&str] = &["weights-push", "health-stream", "last-stage-sampling", "resume-sequence"];
/// Capabilities this build cannot work without. `resume-sequence`: a worker that ignored
/// `OpenSequenceRequest.generated` would sample a resumed stream from the wrong state.
pub const REQUIRED: &[&str] = &["last-stage-sampling", "resume-sequence"];

/// This build's [`pb::Protocol`].
pub fn local_protocol() -> pb::Protocol {
    pb::Protocol {
        version: PROTOCOL_VERSION,
        min_version: MIN_PROTOCOL_VERSION,
        features: FEATURES.iter().map(|f| f.to_string()).collect(),
        required: REQUIRED.iter().map(|f| f.to_string()).collect(),
    }
}

/// What two compatible peers agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    pub version: u32,
    /// Features both sides implement, sorted.
    pub features: Vec<String>,
}

impl Agreed {
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// One reason two peers cannot work together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// No revision is acceptable to both sides.
    Version {
        local: u32,
        local_min: u32,
        remote: u32,
        remote_min: u32,
    },
    /// Features this side requires that the remote does not implement.
    RemoteLacks(Vec<String>),
    /// Features the remote requires that this side does not implement.
    LocalLacks(Vec<String>),
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Version {
                local,
                local_min,
                remote,
                remote_min,
            } => write!(
                f,
                "protocol version: we speak {local} (accept {local_min}..={local}), \
                 the peer speaks {remote} (accepts {remote_min}..={remote})"
            ),
            Difference::RemoteLacks(features) => {
                write!(
                    f,
                    "the peer lacks required feature(s): {}",
                    features.join(", ")
                )
            }
            Difference::LocalLacks(features) => write!(
                f,
                "the peer requires feature(s) we lack: {}",
                features.join(", ")
            ),
        }
    }
}

/// The peer cannot be used; the message lists every difference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Incompatible {
    pub differences: Vec<Difference>,
}

impl fmt::Display for Incompatible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("incompatible peer: ")?;
        for (i, d) in self.differences.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Agrees on a revision and a feature set, or says exactly what differs.
pub fn negotiate(local: &pb::Protocol, remote: &pb::Protocol) -> Result<Agreed, Incompatible> {
    let mut differences = Vec::new();

    let version = local.version.min(remote.version);
    if version < local.min_version.max(remote.min_version) || version == 0 {
        differences.push(Difference::Version {
            local: local.version,
            local_min: local.min_version,
            remote: remote.version,
            remote_min: remote.min_version,
        });
    }

    let local_features: BTreeSet<&str> = local.features.iter().map(String::as_str).collect();
    let remote_features: BTreeSet<&str> = remote.features.iter().map(String::as_str).collect();
    let missing = |required: &[String], offered: &BTreeSet<&str>| -> Vec<String> {
        let missing: BTreeSet<&str> = required
            .iter()
            .map(String::as_str)
            .filter(|f| !offered.contains(f))
            .collect();
        missing.into_iter().map(str::to_string).collect()
    };
    let remote_lacks = missing(&local.required, &remote_features);
    if !remote_lacks.is_empty() {
        differences.push(Difference::RemoteLacks(remote_lacks));
    }
    let local_lacks = missing(&remote.required, &local_features);
    if !local_lacks.is_empty() {
        differences.push(Difference::LocalLacks(local_lacks));
    }

    if differences.is_empty() {
        let features = local_features
            .intersection(&remote_features)
            .map(|f| f.to_string())
            .collect();
        Ok(Agreed { version, features })
    } else {
        Err(Incompatible { differences })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto(version: u32, min: u32, features: &[&str], required: &[&str]) -> pb::Protocol {
        pb::Protocol {
            version,
            min_version: min,
            features: features.iter().map(|s| s.to_string()).collect(),
            required: required.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn same_build_agrees_on_everything() {
        let agreed = negotiate(&local_protocol(), &local_protocol()).unwrap();
        assert_eq!(agreed.version, PROTOCOL_VERSION);
        assert_eq!(agreed.features.len(), FEATURES.len());
        assert!(agreed.has("weights-push"));
    }

    #[test]
    fn newer_peer_that_still_accepts_us_agrees_on_our_version() {
        let local = proto(2, 1, &["a", "b"], &[]);
        let remote = proto(3, 2, &["b", "c"], &["b"]);
        let agreed = negotiate(&local, &remote).unwrap();
        assert_eq!(
            agreed,
            Agreed {
                version: 2,
                features: vec!["b".into()]
            }
        );
    }

    #[test]
    fn version_gap_names_both_ranges() {
        let err = negotiate(&proto(1, 1, &[], &[]), &proto(3, 2, &[], &[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "incompatible peer: protocol version: we speak 1 (accept 1..=1), \
             the peer speaks 3 (accepts 2..=3)"
        );
    }

    #[test]
    fn missing_required_features_are_listed_on_both_sides() {
        let local = proto(1, 1, &["x"], &["weights-push", "a"]);
        let remote = proto(1, 1, &["a"], &["x", "zz"]);
        let err = negotiate(&local, &remote).unwrap_err();
        assert_eq!(
            err.differences,
            vec![
                Difference::RemoteLacks(vec!["weights-push".into()]),
                Difference::LocalLacks(vec!["zz".into()]),
            ]
        );
        assert_eq!(
            err.to_string(),
            "incompatible peer: the peer lacks required feature(s): weights-push; \
             the peer requires feature(s) we lack: zz"
        );
    }

    #[test]
    fn a_peer_that_sent_no_protocol_is_refused() {
        let err = negotiate(&local_protocol(), &pb::Protocol::default()).unwrap_err();
        assert!(matches!(
            err.differences[0],
            Difference::Version { remote: 0, .. }
        ));
        assert!(err.to_string().contains("last-stage-sampling"), "{err}");
    }
}
