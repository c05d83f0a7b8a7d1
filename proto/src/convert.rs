//! `agent.proto` messages ⇄ the shared model ([`qsd_csi_model`]): the one place either side
//! encodes or decodes them. The controller encodes, the node's agent decodes; a round trip is
//! the identity (tested below), so what the controller validated is what the engine runs.

use qsd_csi_model::grow::{AutoExpand, Step};
use qsd_csi_model::health::{Finding, Severity};
use qsd_csi_model::id::{IdKind, ObjectId, ObjectName, PoolName};
use qsd_csi_model::volume::{
    CloneMode, CreateVolume, Format, Preallocation, Qos, RemoteSource, VolumeSource,
};
use qsd_csi_model::Error;

use crate::{agent, csi};

impl From<&Finding> for agent::Finding {
    fn from(f: &Finding) -> Self {
        let severity = match f.severity {
            Severity::Degraded => agent::Severity::Degraded,
            Severity::Inaccessible => agent::Severity::Inaccessible,
            Severity::DataLoss => agent::Severity::DataLoss,
        };
        agent::Finding {
            severity: severity as i32,
            reason: f.reason.clone(),
            message: f.message.clone(),
        }
    }
}

/// An agent finding as CSI's volume health entry (an unknown severity stays unknown: COs
/// ignore values they do not know).
pub fn health_entry(f: &agent::Finding) -> csi::volume_health::VolumeHealthEntry {
    use csi::VolumeHealthErrorType as T;
    let status = match agent::Severity::try_from(f.severity) {
        Ok(agent::Severity::Degraded) => T::Degraded,
        Ok(agent::Severity::Inaccessible) => T::Inaccessible,
        Ok(agent::Severity::DataLoss) => T::DataLoss,
        _ => T::UnknownVolumeHealthType,
    };
    csi::volume_health::VolumeHealthEntry {
        status: status as i32,
        reason: f.reason.clone(),
        message: f.message.clone(),
    }
}

/// An agent's volume health as CSI's.
pub fn csi_volume_health(h: &agent::VolumeHealth) -> csi::VolumeHealth {
    csi::VolumeHealth {
        volume_id: h.volume_id.clone(),
        health_statuses: h.findings.iter().map(health_entry).collect(),
    }
}

/// A volume's findings in the agent's message.
pub fn agent_volume_health(volume_id: String, findings: &[Finding]) -> agent::VolumeHealth {
    agent::VolumeHealth { volume_id, findings: findings.iter().map(Into::into).collect() }
}

/// A volume's findings as CSI's `VolumeHealth`.
pub fn volume_health(volume_id: &str, findings: &[Finding]) -> csi::VolumeHealth {
    csi_volume_health(&agent_volume_health(volume_id.to_owned(), findings))
}

impl From<Qos> for agent::Qos {
    fn from(q: Qos) -> Self {
        agent::Qos {
            iops_total: q.iops_total,
            iops_read: q.iops_read,
            iops_write: q.iops_write,
            bps_total: q.bps_total,
            bps_read: q.bps_read,
            bps_write: q.bps_write,
        }
    }
}

impl From<agent::Qos> for Qos {
    fn from(q: agent::Qos) -> Self {
        Qos {
            iops_total: q.iops_total,
            iops_read: q.iops_read,
            iops_write: q.iops_write,
            bps_total: q.bps_total,
            bps_read: q.bps_read,
            bps_write: q.bps_write,
        }
    }
}

impl From<Preallocation> for agent::Preallocation {
    fn from(p: Preallocation) -> Self {
        match p {
            Preallocation::Off => agent::Preallocation::Off,
            Preallocation::Metadata => agent::Preallocation::Metadata,
            Preallocation::Falloc => agent::Preallocation::Falloc,
            Preallocation::Full => agent::Preallocation::Full,
        }
    }
}

impl From<agent::Preallocation> for Preallocation {
    fn from(p: agent::Preallocation) -> Self {
        match p {
            agent::Preallocation::Off => Preallocation::Off,
            agent::Preallocation::Metadata => Preallocation::Metadata,
            agent::Preallocation::Falloc => Preallocation::Falloc,
            agent::Preallocation::Full => Preallocation::Full,
        }
    }
}

impl From<CloneMode> for agent::CloneMode {
    fn from(c: CloneMode) -> Self {
        match c {
            CloneMode::Copy => agent::CloneMode::Copy,
            CloneMode::Linked => agent::CloneMode::Linked,
        }
    }
}

impl From<agent::CloneMode> for CloneMode {
    fn from(c: agent::CloneMode) -> Self {
        match c {
            agent::CloneMode::Copy => CloneMode::Copy,
            agent::CloneMode::Linked => CloneMode::Linked,
        }
    }
}

impl From<&CreateVolume> for agent::CreateVolumeRequest {
    fn from(c: &CreateVolume) -> Self {
        use agent::create_volume_request::Source;
        agent::CreateVolumeRequest {
            pool: c.pool.to_string(),
            name: c.name.to_string(),
            size_bytes: c.size,
            limit_bytes: c.limit,
            clone_bytes_per_second: c.clone_bandwidth,
            preallocation: agent::Preallocation::from(c.preallocation) as i32,
            qos: Some(c.qos.into()),
            max_chain_depth: c.max_chain_depth,
            source: c.source.as_ref().map(|s| match s {
                VolumeSource::Snapshot(id) => Source::SnapshotId(id.to_string()),
                VolumeSource::Volume(id) => Source::VolumeId(id.to_string()),
            }),
            clone_mode: agent::CloneMode::from(c.clone_mode) as i32,
            labels: c.labels.clone(),
            format: Some(agent::Qcow2Format {
                cluster_size: c.format.cluster_size,
                extended_l2: c.format.extended_l2,
                l2_cache_size: c.format.l2_cache_size,
            }),
            auto_expand: c.auto_expand.map(agent::AutoExpand::from),
            remote: c.remote.as_ref().map(agent::CopyExport::from),
            keep_id: c.keep_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        }
    }
}

impl From<&VolumeSource> for agent::export_for_copy_request::Source {
    fn from(s: &VolumeSource) -> Self {
        use agent::export_for_copy_request::Source;
        match s {
            VolumeSource::Snapshot(id) => Source::SnapshotId(id.to_string()),
            VolumeSource::Volume(id) => Source::VolumeId(id.to_string()),
        }
    }
}

impl TryFrom<agent::export_for_copy_request::Source> for VolumeSource {
    type Error = Error;

    /// An ID that does not parse is [`Error::MalformedId`] (nothing of ours has it).
    fn try_from(s: agent::export_for_copy_request::Source) -> Result<Self, Error> {
        use agent::export_for_copy_request::Source;
        Ok(match s {
            Source::SnapshotId(id) => {
                VolumeSource::Snapshot(ObjectId::parse(IdKind::Snapshot, &id)?)
            }
            Source::VolumeId(id) => VolumeSource::Volume(ObjectId::parse(IdKind::Volume, &id)?),
        })
    }
}

impl From<&RemoteSource> for agent::CopyExport {
    fn from(r: &RemoteSource) -> Self {
        agent::CopyExport {
            host: r.host.clone(),
            port: r.port.into(),
            export_name: r.export.clone(),
            psk_identity: r.identity.clone(),
            psk_key: r.key.clone(),
            size_bytes: r.size,
            allocated_bytes: r.allocated,
        }
    }
}

impl TryFrom<agent::CopyExport> for RemoteSource {
    type Error = Error;

    fn try_from(e: agent::CopyExport) -> Result<Self, Error> {
        let port = u16::try_from(e.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Error::invalid("remote port", format!("{} is not a port", e.port)))?;
        if e.host.is_empty() || e.export_name.is_empty() || e.psk_identity.is_empty() {
            return Err(Error::invalid("remote", "host, export name and identity are required"));
        }
        if e.psk_key.len() < 16 {
            return Err(Error::invalid("remote key", "shorter than 16 bytes"));
        }
        Ok(RemoteSource {
            host: e.host,
            port,
            export: e.export_name,
            identity: e.psk_identity,
            key: e.psk_key,
            size: e.size_bytes,
            allocated: e.allocated_bytes,
        })
    }
}

impl TryFrom<agent::CreateVolumeRequest> for CreateVolume {
    type Error = Error;

    /// Refuses enum values this side does not know (a newer peer's), rather than guessing.
    fn try_from(r: agent::CreateVolumeRequest) -> Result<Self, Error> {
        use agent::create_volume_request::Source;
        let preallocation = agent::Preallocation::try_from(r.preallocation).map_err(|_| {
            Error::invalid("preallocation", format!("unknown value {}", r.preallocation))
        })?;
        let clone_mode = agent::CloneMode::try_from(r.clone_mode)
            .map_err(|_| Error::invalid("clone mode", format!("unknown value {}", r.clone_mode)))?;
        let keep_id = Some(r.keep_id)
            .filter(|id| !id.is_empty())
            .map(|id| {
                ObjectId::parse(IdKind::Volume, &id).map_err(|e| {
                    Error::invalid("keep_id", format!("{id:?} is not a volume ID: {e}"))
                })
            })
            .transpose()?;
        let source = match r.source {
            Some(Source::SnapshotId(id)) => {
                Some(VolumeSource::Snapshot(ObjectId::parse(IdKind::Snapshot, &id)?))
            }
            Some(Source::VolumeId(id)) => {
                Some(VolumeSource::Volume(ObjectId::parse(IdKind::Volume, &id)?))
            }
            None => None,
        };
        Ok(CreateVolume {
            pool: PoolName::parse(&r.pool)?,
            name: ObjectName::parse(&r.name)?,
            size: r.size_bytes,
            limit: r.limit_bytes.filter(|l| *l > 0),
            clone_bandwidth: r.clone_bytes_per_second.filter(|b| *b > 0),
            preallocation: preallocation.into(),
            qos: r.qos.unwrap_or_default().into(),
            max_chain_depth: r.max_chain_depth,
            source,
            clone_mode: clone_mode.into(),
            labels: r.labels,
            format: r
                .format
                .map(|f| Format {
                    cluster_size: f.cluster_size,
                    extended_l2: f.extended_l2,
                    l2_cache_size: f.l2_cache_size,
                })
                .unwrap_or_default(),
            auto_expand: r.auto_expand.map(AutoExpand::try_from).transpose()?,
            remote: r.remote.map(RemoteSource::try_from).transpose()?,
            keep_id,
        })
    }
}

impl From<AutoExpand> for agent::AutoExpand {
    fn from(a: AutoExpand) -> Self {
        use agent::auto_expand::Step as Wire;
        agent::AutoExpand {
            step: Some(match a.step {
                Step::Percent(p) => Wire::StepPercent(p),
                Step::Bytes(n) => Wire::StepBytes(n),
            }),
            limit_bytes: a.limit,
            threshold_percent: a.threshold_percent,
        }
    }
}

impl TryFrom<agent::AutoExpand> for AutoExpand {
    type Error = Error;

    /// Refuses a policy that could not have come from a class's parameters.
    fn try_from(a: agent::AutoExpand) -> Result<Self, Error> {
        use agent::auto_expand::Step as Wire;
        let step = match a.step {
            Some(Wire::StepPercent(p)) if (1..=1000).contains(&p) => Step::Percent(p),
            Some(Wire::StepBytes(n)) if n > 0 => Step::Bytes(n),
            other => {
                return Err(Error::invalid("autoExpandStep", format!("{other:?} is not a step")))
            }
        };
        if !(1..=99).contains(&a.threshold_percent) {
            return Err(Error::invalid(
                "writeThresholdPercent",
                format!("{} is not a whole percentage from 1 to 99", a.threshold_percent),
            ));
        }
        Ok(AutoExpand { step, limit: a.limit_bytes, threshold_percent: a.threshold_percent })
    }
}

/// A volume's source as `agent.Volume` carries it.
pub fn volume_source(source: Option<VolumeSource>) -> Option<agent::volume::Source> {
    source.map(|s| match s {
        VolumeSource::Snapshot(id) => agent::volume::Source::SourceSnapshotId(id.to_string()),
        VolumeSource::Volume(id) => agent::volume::Source::SourceVolumeId(id.to_string()),
    })
}

impl agent::Volume {
    /// Where the volume's content came from (a source ID that does not parse is none: the
    /// node reports only IDs it made).
    pub fn content_source(&self) -> Option<VolumeSource> {
        match self.source.as_ref()? {
            agent::volume::Source::SourceSnapshotId(id) => {
                ObjectId::parse(IdKind::Snapshot, id).ok().map(VolumeSource::Snapshot)
            }
            agent::volume::Source::SourceVolumeId(id) => {
                ObjectId::parse(IdKind::Volume, id).ok().map(VolumeSource::Volume)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pool: &str, name: &str, size: i64) -> CreateVolume {
        CreateVolume::named(pool, name, size).expect("request")
    }

    fn snapshot(id: &str) -> VolumeSource {
        VolumeSource::Snapshot(ObjectId::parse(IdKind::Snapshot, id).expect("snapshot ID"))
    }

    fn volume(id: &str) -> VolumeSource {
        VolumeSource::Volume(ObjectId::parse(IdKind::Volume, id).expect("volume ID"))
    }

    #[test]
    fn a_create_request_survives_the_wire_unchanged() {
        let mut c = request("fast", "pvc-1", 5 << 20);
        c.preallocation = Preallocation::Falloc;
        c.qos = Qos { iops_total: 10, bps_read: 20, ..Qos::default() };
        c.max_chain_depth = Some(3);
        c.clone_mode = CloneMode::Linked;
        c.labels.insert("csi.storage.k8s.io/pvc/name".into(), "data".into());
        c.format = Format {
            cluster_size: Some(128 << 10),
            extended_l2: true,
            l2_cache_size: Some(4 << 20),
        };
        for source in [None, Some(snapshot("snap:fast@n:s")), Some(volume("vol:fast@n:v"))] {
            c.source = source;
            let wire = agent::CreateVolumeRequest::from(&c);
            assert_eq!(CreateVolume::try_from(wire), Ok(c.clone()));
        }
        for step in [Step::Percent(25), Step::Bytes(1 << 30)] {
            c.auto_expand = Some(AutoExpand { step, limit: Some(3 << 30), threshold_percent: 80 });
            let wire = agent::CreateVolumeRequest::from(&c);
            assert_eq!(CreateVolume::try_from(wire), Ok(c.clone()));
        }
    }

    #[test]
    fn an_auto_expand_policy_no_class_could_give_is_refused() {
        let good = agent::AutoExpand::from(AutoExpand {
            step: Step::Percent(25),
            limit: None,
            threshold_percent: 80,
        });
        use agent::auto_expand::Step as Wire;
        for bad in [
            agent::AutoExpand { step: None, ..good },
            agent::AutoExpand { step: Some(Wire::StepPercent(0)), ..good },
            agent::AutoExpand { step: Some(Wire::StepBytes(0)), ..good },
            agent::AutoExpand { threshold_percent: 0, ..good },
            agent::AutoExpand { threshold_percent: 100, ..good },
        ] {
            assert!(AutoExpand::try_from(bad).is_err());
        }
    }

    #[test]
    fn unknown_enum_values_from_a_newer_peer_are_refused() {
        let mut wire = agent::CreateVolumeRequest::from(&request("p", "v", 1));
        wire.preallocation = 9;
        assert!(matches!(
            CreateVolume::try_from(wire.clone()),
            Err(Error::InvalidArgument { field: "preallocation", .. })
        ));
        wire.preallocation = 0;
        wire.clone_mode = 5;
        assert!(CreateVolume::try_from(wire).is_err());
    }

    #[test]
    fn names_and_ids_are_typed_as_they_come_off_the_wire() {
        let good = agent::CreateVolumeRequest::from(&request("p", "v", 1));
        use agent::create_volume_request::Source;
        let rows: [(&str, agent::CreateVolumeRequest, &str); 5] = [
            (
                "bad pool",
                agent::CreateVolumeRequest { pool: "P/..".into(), ..good.clone() },
                "invalid",
            ),
            (
                "bad name",
                agent::CreateVolumeRequest { name: "a/b".into(), ..good.clone() },
                "invalid",
            ),
            (
                "bad keep_id",
                agent::CreateVolumeRequest { keep_id: "x".into(), ..good.clone() },
                "invalid",
            ),
            (
                "a snapshot ID as a volume source",
                agent::CreateVolumeRequest {
                    source: Some(Source::VolumeId("snap:p:s".into())),
                    ..good.clone()
                },
                "malformed",
            ),
            (
                "garbage as a snapshot source",
                agent::CreateVolumeRequest {
                    source: Some(Source::SnapshotId("\u{0}".into())),
                    ..good
                },
                "malformed",
            ),
        ];
        for (row, wire, expected) in rows {
            let kind = match CreateVolume::try_from(wire) {
                Err(Error::InvalidArgument { .. }) => "invalid",
                Err(Error::MalformedId { .. }) => "malformed",
                other => panic!("{row}: {other:?}"),
            };
            assert_eq!(kind, expected, "{row}");
        }
    }

    #[test]
    fn a_copys_source_round_trips_by_kind() {
        for source in [snapshot("snap:p@n:s"), volume("vol:p@n:v")] {
            let wire = agent::export_for_copy_request::Source::from(&source);
            assert_eq!(VolumeSource::try_from(wire), Ok(source));
        }
        let bad = agent::export_for_copy_request::Source::VolumeId("snap:p@n:s".into());
        assert!(matches!(VolumeSource::try_from(bad), Err(Error::MalformedId { .. })));
    }

    #[test]
    fn a_volume_names_its_source_by_full_id() {
        let snap = snapshot("snap:p@n:s1");
        let v = agent::Volume { source: volume_source(Some(snap.clone())), ..Default::default() };
        assert_eq!(v.content_source(), Some(snap));
        assert_eq!(agent::Volume::default().content_source(), None);
    }
}
