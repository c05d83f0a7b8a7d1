//! Names, IDs and sizes: the shared model's ([`qsd_csi_model::id`]), and the layer IDs only a
//! node's pools use.

use std::fmt;

pub use qsd_csi_model::id::*;

use crate::error::{Error, Result};

/// This host's name (from the kernel) made into a node name, or `localhost`.
pub fn host_node_name() -> String {
    NodeName::from_hostname(
        &std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default(),
    )
}

/// A layer's identifier: 12 lowercase hex digits (random), short enough for QEMU node names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerId([u8; 12]);

impl LayerId {
    /// A fresh random id.
    pub fn random() -> Self {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        let mut bytes = [0u8; 12];
        bytes.copy_from_slice(&hex.as_bytes()[..12]);
        LayerId(bytes)
    }

    /// Parses 12 lowercase hex digits.
    pub fn parse(s: &str) -> Result<Self> {
        let ok =
            s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(Error::invalid("layer id", format!("{s:?} is not 12 hex digits")));
        }
        let mut bytes = [0u8; 12];
        bytes.copy_from_slice(s.as_bytes());
        Ok(LayerId(bytes))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ever built from ASCII hex digits.
        std::str::from_utf8(&self.0).unwrap_or("000000000000")
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for LayerId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for LayerId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        LayerId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ids_are_twelve_hex_digits() {
        let id = LayerId::random();
        assert_eq!(LayerId::parse(id.as_str()).ok(), Some(id));
        assert!(LayerId::parse("../../etc/pw").is_err());
        assert!(LayerId::parse("ABCDEF012345").is_err());
    }
}
