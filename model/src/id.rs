//! Names, IDs and sizes, parsed strictly before anything touches the disk.
//!
//! ```text
//!   volume ID    vol:<pool>[@<node>]:<name>     e.g. vol:local@node-1:pvc-1234
//!   snapshot ID  snap:<pool>[@<node>]:<name>    e.g. snap:shared:snapshot-5678
//! ```
//! `@<node>` is present for local pools (a volume lives on one node) and absent for shared ones.
//! Every component has a small character set with no `/`, and names may not contain `..`, so an ID
//! can never resolve to a path outside its pool. IDs are at most 128 bytes.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// Longest ID we issue or accept.
pub const MAX_ID_LEN: usize = 128;
/// Smallest unit of volume size; requests are rounded up to it.
pub const SIZE_ALIGN: u64 = 1 << 20;
/// Largest virtual size we create (64 TiB).
pub const MAX_SIZE: u64 = 64 << 40;

fn check(
    field: &'static str,
    s: &str,
    max: usize,
    first: impl Fn(char) -> bool,
    rest: impl Fn(char) -> bool,
) -> Result<()> {
    if s.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if s.len() > max {
        return Err(Error::invalid(field, format!("{s:?} is longer than {max} bytes")));
    }
    let mut chars = s.chars();
    if !chars.next().is_some_and(&first) || !chars.all(&rest) {
        return Err(Error::invalid(field, format!("{s:?} has characters outside the allowed set")));
    }
    Ok(())
}

/// A pool name: lowercase letters, digits and `-`, at most 32 bytes.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct PoolName(String);

impl PoolName {
    /// Validates a pool name.
    pub fn parse(s: &str) -> Result<Self> {
        let lower = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        check("pool name", s, 32, lower, |c| lower(c) || c == '-')?;
        if s.ends_with('-') {
            return Err(Error::invalid("pool name", "must not end with '-'"));
        }
        Ok(PoolName(s.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A node name as Kubernetes spells it (a DNS subdomain), at most 63 bytes here.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

impl NodeName {
    /// Validates a node name.
    pub fn parse(s: &str) -> Result<Self> {
        let lower = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        check("node name", s, 63, lower, |c| lower(c) || c == '-' || c == '.')?;
        if s.contains("..") || s.ends_with(['-', '.']) {
            return Err(Error::invalid("node name", format!("{s:?} is not a DNS subdomain")));
        }
        Ok(NodeName(s.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A host name made into a node name (lowercased, other characters replaced by '-'), or
    /// `localhost` when nothing usable is left.
    pub fn from_hostname(host: &str) -> String {
        let name: String = host
            .trim()
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '-' })
            .take(63)
            .collect();
        let name = name.trim_matches(|c| c == '-' || c == '.').replace("..", ".");
        if NodeName::parse(&name).is_ok() {
            name
        } else {
            "localhost".to_owned()
        }
    }
}

/// A volume or snapshot name: letters, digits, `_`, `-`, `.`; no `..`; at most 64 bytes.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct ObjectName(String);

impl ObjectName {
    /// Validates a volume or snapshot name.
    pub fn parse(s: &str) -> Result<Self> {
        let alnum = |c: char| c.is_ascii_alphanumeric();
        check("name", s, 64, alnum, |c| alnum(c) || matches!(c, '_' | '-' | '.'))?;
        if s.contains("..") {
            return Err(Error::invalid("name", format!("{s:?} contains '..'")));
        }
        Ok(ObjectName(s.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where an object lives: its pool, and its node for local pools.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    /// The pool.
    pub pool: PoolName,
    /// The node, for local pools.
    pub node: Option<NodeName>,
}

/// Kind prefix of an ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdKind {
    /// `vol:`
    Volume,
    /// `snap:`
    Snapshot,
    /// `group:` (a group snapshot: member snapshots taken at one instant)
    Group,
}

impl IdKind {
    /// What an ID of this kind is called in messages.
    pub fn noun(self) -> &'static str {
        match self {
            IdKind::Volume => "volume ID",
            IdKind::Snapshot => "snapshot ID",
            IdKind::Group => "group snapshot ID",
        }
    }

    /// The ID prefix: `vol`, `snap` or `group`.
    pub fn prefix(self) -> &'static str {
        match self {
            IdKind::Volume => "vol",
            IdKind::Snapshot => "snap",
            IdKind::Group => "group",
        }
    }
}

/// A parsed volume, snapshot or group snapshot ID (written in records as its text).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ObjectId {
    /// Volume or snapshot.
    pub kind: IdKind,
    /// Pool and node.
    pub location: Location,
    /// The object's name in its pool.
    pub name: ObjectName,
}

impl ObjectId {
    /// Builds an ID, checking the length limit.
    pub fn new(kind: IdKind, location: Location, name: ObjectName) -> Result<Self> {
        let id = ObjectId { kind, location, name };
        let len = id.to_string().len();
        if len > MAX_ID_LEN {
            return Err(Error::invalid(
                "name",
                format!("the resulting ID would be {len} bytes; the limit is {MAX_ID_LEN}"),
            ));
        }
        Ok(id)
    }

    /// Parses an ID of the expected kind; anything that does not parse, whatever part of it,
    /// is [`Error::MalformedId`].
    pub fn parse(kind: IdKind, s: &str) -> Result<Self> {
        Self::parse_parts(kind, s).map_err(|e| match e {
            Error::MalformedId { .. } => e,
            other => Error::MalformedId { kind, reason: format!("{s:?}: {other}") },
        })
    }

    fn parse_parts(kind: IdKind, s: &str) -> Result<Self> {
        if s.len() > MAX_ID_LEN {
            let reason = format!("longer than {MAX_ID_LEN} bytes");
            return Err(Error::MalformedId { kind, reason });
        }
        let bad = || Error::MalformedId {
            kind,
            reason: format!("{s:?} is not of the form {}:<pool>[@<node>]:<name>", kind.prefix()),
        };
        let mut parts = s.splitn(3, ':');
        let (Some(prefix), Some(place), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if prefix != kind.prefix() {
            return Err(bad());
        }
        let (pool, node) = match place.split_once('@') {
            Some((pool, node)) => (pool, Some(NodeName::parse(node)?)),
            None => (place, None),
        };
        let location = Location { pool: PoolName::parse(pool)?, node };
        Ok(ObjectId { kind, location, name: ObjectName::parse(name)? })
    }
}

impl FromStr for ObjectId {
    type Err = Error;

    /// An ID of whichever kind its prefix names.
    fn from_str(s: &str) -> Result<Self> {
        let kind = [IdKind::Volume, IdKind::Snapshot, IdKind::Group]
            .into_iter()
            .find(|k| s.strip_prefix(k.prefix()).is_some_and(|rest| rest.starts_with(':')))
            .ok_or_else(|| Error::MalformedId {
                kind: IdKind::Volume,
                reason: format!("{s:?} starts with none of vol:, snap:, group:"),
            })?;
        ObjectId::parse(kind, s)
    }
}

impl TryFrom<String> for ObjectId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<ObjectId> for String {
    fn from(id: ObjectId) -> String {
        id.to_string()
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.prefix(), self.location.pool.as_str())?;
        if let Some(node) = &self.location.node {
            write!(f, "@{}", node.as_str())?;
        }
        write!(f, ":{}", self.name.as_str())
    }
}

/// What every name type shares: parsed from text (and from a record's string, so a record
/// holding a name that does not parse is an error naming its file), written as the text.
macro_rules! name_traits {
    ($($name:ident),*) => {$(
        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                $name::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                $name::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    )*};
}

name_traits!(PoolName, NodeName, ObjectName);

/// Validates a requested size (CSI sizes are signed) and rounds it up to [`SIZE_ALIGN`].
pub fn parse_size(requested: i64) -> Result<u64> {
    if requested < 0 {
        return Err(Error::invalid("size", format!("{requested} is negative")));
    }
    if requested == 0 {
        return Err(Error::invalid("size", "must be greater than zero"));
    }
    let bytes = requested as u64;
    if bytes > MAX_SIZE {
        return Err(Error::OutOfRange {
            requested,
            reason: format!("the largest supported volume is {MAX_SIZE} bytes (64 TiB)"),
        });
    }
    Ok(bytes.div_ceil(SIZE_ALIGN) * SIZE_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(e: &Error) -> &'static str {
        match e {
            Error::InvalidArgument { .. } => "invalid",
            Error::MalformedId { .. } => "malformed",
            Error::OutOfRange { .. } => "range",
        }
    }

    #[test]
    fn an_id_reads_as_the_kind_its_prefix_names_and_round_trips_through_json() {
        for s in ["vol:p@n:a", "snap:p:s", "group:p@n:g"] {
            let id: ObjectId = s.parse().expect(s);
            assert_eq!(id.to_string(), s);
            let json = serde_json::to_string(&id).expect("json");
            assert_eq!(json, format!("{s:?}"));
            assert_eq!(serde_json::from_str::<ObjectId>(&json).expect("back"), id);
        }
        for bad in ["", "volume:p:a", "vol", "x:p:a", "vol:p:a/b"] {
            assert!(matches!(bad.parse::<ObjectId>(), Err(Error::MalformedId { .. })), "{bad}");
        }
        assert!(serde_json::from_str::<ObjectName>("\"a/b\"").is_err(), "a bad name in a record");
    }

    #[test]
    fn well_formed_ids_round_trip() {
        for s in ["vol:local@node-1:pvc-1234", "vol:shared:a", "vol:p@n.example.com:a_b.c-d"] {
            let id = ObjectId::parse(IdKind::Volume, s).map(|id| id.to_string());
            assert_eq!(id.ok().as_deref(), Some(s));
        }
        let snap = ObjectId::parse(IdKind::Snapshot, "snap:local@n:s1").map(|id| id.to_string());
        assert_eq!(snap.ok().as_deref(), Some("snap:local@n:s1"));
    }

    #[test]
    fn malformed_ids_are_malformed_ids_whatever_part_is_wrong() {
        let long = format!("vol:p:{}", "a".repeat(130));
        let cases = [
            "",
            "vol",
            "vol:",
            "vol::a",
            "vol:p:",
            "snap:p:a",
            "vol:P:a",
            "vol:p:../x",
            "vol:p:a/b",
            "vol:p:a..b",
            "vol:p:.hidden",
            "vol:p@:a",
            "vol:p@N:a",
            "vol:p@n..x:a",
            "vol:p:a:b",
            "vol:p-:a",
            "vol:p:a b",
            "vol:p:a\0",
            long.as_str(),
        ];
        for s in cases {
            let result = ObjectId::parse(IdKind::Volume, s);
            // Typed, whatever part is wrong: the kind decides NOT_FOUND, not the message.
            assert_eq!(result.err().map(|e| kind(&e)), Some("malformed"), "{s:?}");
        }
    }

    #[test]
    fn names_reject_path_tricks() {
        for s in ["..", ".", "a/b", "/a", "a..", "", "a\\b", "é"] {
            assert!(ObjectName::parse(s).is_err(), "{s:?}");
        }
        assert!(ObjectName::parse(&"a".repeat(65)).is_err());
        assert!(ObjectName::parse(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn an_id_that_would_exceed_128_bytes_is_refused() {
        let location = Location {
            pool: PoolName::parse(&"p".repeat(32)).expect("pool"),
            node: Some(NodeName::parse(&"n".repeat(63)).expect("node")),
        };
        let name = ObjectName::parse(&"a".repeat(40)).expect("name");
        let err = ObjectId::new(IdKind::Volume, location, name).err();
        assert_eq!(err.map(|e| kind(&e)), Some("invalid"));
    }

    #[test]
    fn host_names_become_node_names() {
        assert_eq!(NodeName::from_hostname("Worker_1.Example.COM\n"), "worker-1.example.com");
        assert_eq!(NodeName::from_hostname(""), "localhost");
        assert_eq!(NodeName::from_hostname("-..-"), "localhost");
    }

    #[test]
    fn sizes_are_validated_and_rounded_up_to_a_mebibyte() {
        assert_eq!(parse_size(1).ok(), Some(1 << 20));
        assert_eq!(parse_size(1 << 20).ok(), Some(1 << 20));
        assert_eq!(parse_size((1 << 20) + 1).ok(), Some(2 << 20));
        assert_eq!(parse_size(0).err().map(|e| kind(&e)), Some("invalid"));
        assert_eq!(parse_size(-5).err().map(|e| kind(&e)), Some("invalid"));
        assert_eq!(parse_size(i64::MAX).err().map(|e| kind(&e)), Some("range"));
        assert_eq!(parse_size(MAX_SIZE as i64).ok(), Some(MAX_SIZE));
    }
}
