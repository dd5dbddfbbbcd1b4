//! Short, user-facing names for the protocol's enums (`cpu`, `rdma`, `auto`, `bf16`, as written in
//! `cluster.toml`, mDNS TXT records and `baton status`) and layer-range conversions.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::pb::{Backend, LayerRange, Transport, TransportPreference, WireDtype};

/// A name that is not one of an enum's short names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{name}` (expected one of: {expected})")]
pub struct UnknownName {
    pub kind: &'static str,
    pub name: String,
    pub expected: String,
}

macro_rules! short_names {
    ($ty:ty, $kind:literal, [$($variant:ident => $name:literal),+ $(,)?]) => {
        impl $ty {
            /// The short name used in configuration, TXT records and output.
            pub fn short_name(self) -> &'static str {
                match self {
                    $(<$ty>::$variant => $name,)+
                    #[allow(unreachable_patterns)]
                    _ => "unspecified",
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.short_name())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s.trim().to_ascii_lowercase().as_str() {
                    $($name => Ok(<$ty>::$variant),)+
                    _ => Err(UnknownName {
                        kind: $kind,
                        name: s.to_string(),
                        expected: [$($name),+].join(", "),
                    }),
                }
            }
        }
    };
}

short_names!(Backend, "backend", [Cpu => "cpu", Cuda => "cuda", Metal => "metal"]);
short_names!(Transport, "transport", [Rdma => "rdma", Quic => "quic", Tcp => "tcp"]);
short_names!(
    TransportPreference,
    "transport preference",
    [Auto => "auto", Rdma => "rdma", Quic => "quic", Tcp => "tcp"]
);
short_names!(WireDtype, "wire dtype", [F32 => "f32", F16 => "f16", Bf16 => "bf16"]);

impl LayerRange {
    pub fn range(&self) -> Range<usize> {
        self.start as usize..self.end as usize
    }
}

impl From<Range<u32>> for LayerRange {
    fn from(r: Range<u32>) -> Self {
        LayerRange {
            start: r.start,
            end: r.end,
        }
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_round_trip() {
        for b in [Backend::Cpu, Backend::Cuda, Backend::Metal] {
            assert_eq!(b.short_name().parse::<Backend>().unwrap(), b);
        }
        assert_eq!("QUIC".parse::<Transport>().unwrap(), Transport::Quic);
        assert_eq!(
            "auto".parse::<TransportPreference>().unwrap(),
            TransportPreference::Auto
        );
        assert_eq!(WireDtype::Bf16.to_string(), "bf16");
        assert_eq!(Backend::Unspecified.short_name(), "unspecified");
    }

    #[test]
    fn unknown_name_lists_the_choices() {
        let err = "udp".parse::<Transport>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown transport `udp` (expected one of: rdma, quic, tcp)"
        );
    }

    #[test]
    fn layer_range_converts() {
        let r = LayerRange::from(3..9);
        assert_eq!(r.range(), 3..9);
        assert_eq!(r.to_string(), "3..9");
    }
}
