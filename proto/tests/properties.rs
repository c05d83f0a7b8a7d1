//! Property tests of the agent protocol's conversions into the model: whatever a peer sends (a
//! newer one's enum values, garbage strings, bytes that are not a message at all) is converted
//! or refused, never a panic; what converts goes back to the same message's meaning.

use proptest::prelude::*;
use prost::Message;
use qsd_csi_model::volume::{CreateVolume, RemoteSource};
use qsd_csi_proto::agent;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9][a-z0-9-]{0,10}",
        "(vol|snap):[a-z0-9]{1,6}(@[a-z0-9]{1,6})?:[a-z0-9]{1,8}",
        any::<String>(),
    ]
}

prop_compose! {
    fn create_request()(
        pool in text(), name in text(),
        size_bytes in proptest::option::of(any::<i64>()),
        limit_bytes in proptest::option::of(any::<i64>()),
        preallocation in -1i32..6, clone_mode in -1i32..4,
        max_chain_depth in proptest::option::of(any::<u32>()),
        source in proptest::option::of((any::<bool>(), text())),
        labels in prop::collection::btree_map(text(), text(), 0..4),
        step in proptest::option::of(any::<u64>()),
        keep_id in text(),
    ) -> agent::CreateVolumeRequest {
        use agent::create_volume_request::Source;
        agent::CreateVolumeRequest {
            pool, name, size_bytes, limit_bytes, preallocation, clone_mode, max_chain_depth,
            source: source.map(|(snap, id)| if snap { Source::SnapshotId(id) } else { Source::VolumeId(id) }),
            labels: labels.into_iter().collect(),
            auto_expand: step.map(|s| agent::AutoExpand {
                step: Some(agent::auto_expand::Step::StepPercent(s)),
                ..Default::default()
            }),
            keep_id,
            ..Default::default()
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_create_request_converts_or_is_refused_and_converts_back_the_same(r in create_request()) {
        if let Ok(command) = CreateVolume::try_from(r) {
            let again = CreateVolume::try_from(agent::CreateVolumeRequest::from(&command));
            prop_assert_eq!(again.ok(), Some(command));
        }
    }

    #[test]
    fn any_copy_export_converts_or_is_refused(
        host in text(), port in any::<u32>(), export_name in text(), psk_identity in text(),
        psk_key in prop::collection::vec(any::<u8>(), 0..64),
        size_bytes in any::<u64>(), allocated_bytes in any::<u64>(),
    ) {
        let wire = agent::CopyExport {
            host, port, export_name, psk_identity, psk_key, size_bytes, allocated_bytes,
        };
        if let Ok(remote) = RemoteSource::try_from(wire.clone()) {
            prop_assert!(remote.port == wire.port as u16 && u32::from(remote.port) == wire.port);
            prop_assert_eq!(agent::CopyExport::from(&remote), wire);
        }
    }

    #[test]
    fn bytes_that_are_no_message_are_a_decode_error(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(r) = agent::CreateVolumeRequest::decode(bytes.as_slice()) {
            let _ = CreateVolume::try_from(r);
        }
        let _ = agent::VolumeList::decode(bytes.as_slice());
        let _ = agent::ListRequest::decode(bytes.as_slice());
        if let Ok(e) = agent::CopyExport::decode(bytes.as_slice()) {
            let _ = RemoteSource::try_from(e);
        }
    }
}
