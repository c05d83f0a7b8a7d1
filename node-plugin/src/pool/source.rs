//! Where a volume's content came from, as its record keeps it: the source's name in the same
//! pool, written as `snapshot:<name>` or `volume:<name>` (the form records have always had, so
//! every record reads and writes back byte for byte).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use qsd_csi_model::volume::VolumeSource;

use super::ObjectName;

/// A volume record's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedSource {
    /// Restored from (a linked overlay on) this snapshot.
    Snapshot(ObjectName),
    /// Cloned from this volume.
    Volume(ObjectName),
    /// Copied from another node's snapshot or volume, by its full ID; written as
    /// `copy:<id>`.
    Copied(VolumeSource),
    /// A form this version does not know (written by another): kept as written, and read as
    /// no source.
    Unknown(String),
}

impl RecordedSource {
    /// Reads the recorded form.
    pub fn parse(text: &str) -> RecordedSource {
        let named = |name: &str| ObjectName::parse(name).ok();
        match text.split_once(':') {
            Some(("snapshot", name)) => named(name).map(RecordedSource::Snapshot),
            Some(("volume", name)) => named(name).map(RecordedSource::Volume),
            Some(("copy", id)) => copied(id).map(RecordedSource::Copied),
            _ => None,
        }
        .unwrap_or_else(|| RecordedSource::Unknown(text.to_owned()))
    }
}

/// A copied source's full ID, by its kind.
fn copied(id: &str) -> Option<VolumeSource> {
    id.parse::<qsd_csi_model::id::ObjectId>().ok().and_then(VolumeSource::new)
}

impl fmt::Display for RecordedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordedSource::Snapshot(name) => write!(f, "snapshot:{}", name.as_str()),
            RecordedSource::Volume(name) => write!(f, "volume:{}", name.as_str()),
            RecordedSource::Copied(source) => write!(f, "copy:{}", source.id()),
            RecordedSource::Unknown(text) => f.write_str(text),
        }
    }
}

impl Serialize for RecordedSource {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RecordedSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(RecordedSource::parse(&String::deserialize(deserializer)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ObjectName {
        ObjectName::parse(s).expect("name")
    }

    fn id(s: &str) -> qsd_csi_model::id::ObjectId {
        s.parse().expect("an ID")
    }

    #[test]
    fn every_recorded_form_reads_as_its_kind_and_writes_back_as_it_was() {
        let table = [
            ("snapshot:s1", RecordedSource::Snapshot(name("s1"))),
            ("volume:pvc-1234", RecordedSource::Volume(name("pvc-1234"))),
            ("snapshot:../x", RecordedSource::Unknown("snapshot:../x".into())),
            ("image:base", RecordedSource::Unknown("image:base".into())),
            (
                "copy:snap:local@node-1:s1",
                RecordedSource::Copied(VolumeSource::Snapshot(id("snap:local@node-1:s1"))),
            ),
            (
                "copy:vol:local@node-2:v",
                RecordedSource::Copied(VolumeSource::Volume(id("vol:local@node-2:v"))),
            ),
            ("copy:vol:../x", RecordedSource::Unknown("copy:vol:../x".into())),
            ("", RecordedSource::Unknown(String::new())),
        ];
        for (text, expected) in table {
            assert_eq!(RecordedSource::parse(text), expected, "{text:?}");
            assert_eq!(expected.to_string(), text, "{text:?} written back");
        }
    }

    /// A volume record as this version writes it, with a source: it loads, and saving it
    /// again gives the same bytes.
    #[test]
    fn a_recorded_volume_round_trips_byte_for_byte() {
        let fixture = r#"{
  "name": "restored",
  "uid": "0123456789ab",
  "size": 1073741824,
  "head": "a1b2c3d4e5f6",
  "preallocation": "off",
  "qos": {
    "iops-total": 0,
    "iops-read": 0,
    "iops-write": 0,
    "bps-total": 0,
    "bps-read": 0,
    "bps-write": 0
  },
  "max_chain_depth": 16,
  "source": "snapshot:nightly"
}"#;
        let record: super::super::VolumeRecord = serde_json::from_str(fixture).expect("loads");
        assert_eq!(record.source, Some(RecordedSource::Snapshot(name("nightly"))));
        let written = serde_json::to_string_pretty(&record).expect("writes");
        assert_eq!(written, fixture);
    }
}
