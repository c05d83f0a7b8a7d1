//! Property tests of everything in the model that parses text from outside (IDs, names, sizes,
//! StorageClass parameters): any input is an answer, never a panic, and what parses prints
//! back as it came.

use proptest::prelude::*;
use qsd_csi_model::grow::Step;
use qsd_csi_model::id::{
    parse_size, IdKind, NodeName, ObjectId, ObjectName, PoolName, MAX_ID_LEN, SIZE_ALIGN,
};
use qsd_csi_model::params;
use qsd_csi_model::volume::{Format, Qos};

/// Text that is sometimes an ID: the grammar's pieces, joined in any order, with noise.
fn id_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("vol".to_owned()),
        Just("snap".to_owned()),
        Just("group".to_owned()),
        "[a-z0-9][a-z0-9.-]{0,20}",
        "[a-z0-9._@:/ -]{0,12}",
        any::<String>(),
    ];
    let sep = prop_oneof![Just(":"), Just("@"), Just(""), Just("..")];
    prop::collection::vec((piece, sep), 1..6)
        .prop_map(|parts| parts.into_iter().map(|(p, s)| format!("{p}{s}")).collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_text_as_an_id_is_parsed_or_refused_and_what_parses_prints_back(s in id_like()) {
        for kind in [IdKind::Volume, IdKind::Snapshot, IdKind::Group] {
            if let Ok(id) = ObjectId::parse(kind, &s) {
                prop_assert_eq!(id.to_string(), s.clone());
                prop_assert!(s.len() <= MAX_ID_LEN);
                prop_assert!(!s.contains('/') && !id.name.as_str().contains(".."));
                prop_assert_eq!(ObjectId::parse(kind, &id.to_string()).ok(), Some(id));
            }
        }
        if let Ok(id) = s.parse::<ObjectId>() {
            prop_assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn ids_made_of_valid_parts_parse_and_print_back(
        pool in "[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?",
        node in proptest::option::of("[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"),
        name in "[A-Za-z0-9]([A-Za-z0-9_-]{0,40})?",
    ) {
        let place = match &node { Some(n) => format!("{pool}@{n}"), None => pool.clone() };
        let text = format!("vol:{place}:{name}");
        let id = ObjectId::parse(IdKind::Volume, &text);
        prop_assert!(id.is_ok(), "{text}: {:?}", id.err());
        prop_assert_eq!(id.ok().map(|i| i.to_string()), Some(text.clone()));
        prop_assert!(ObjectId::parse(IdKind::Snapshot, &text).is_err(), "the kind is checked");
    }

    #[test]
    fn names_that_parse_are_safe_path_components(s in any::<String>()) {
        for parsed in [
            PoolName::parse(&s).map(|n| n.as_str().to_owned()),
            NodeName::parse(&s).map(|n| n.as_str().to_owned()),
            ObjectName::parse(&s).map(|n| n.as_str().to_owned()),
        ].into_iter().flatten() {
            prop_assert_eq!(&parsed, &s);
            prop_assert!(!s.is_empty() && !s.contains('/') && s != "." && s != "..");
            prop_assert!(!s.contains('\0'));
        }
    }

    #[test]
    fn any_requested_size_is_refused_or_rounded_up_to_the_alignment(n in any::<i64>()) {
        if let Ok(size) = parse_size(n) {
            prop_assert!(n > 0 && size >= n as u64 && size % SIZE_ALIGN == 0);
            prop_assert!(size - (n as u64) < SIZE_ALIGN);
        }
    }

    #[test]
    fn any_parameter_value_is_an_answer_not_a_panic(
        key in prop_oneof![
            Just("iopsTotal".to_owned()), Just("bpsRead".to_owned()), Just("clusterSize".to_owned()),
            Just("extendedL2".to_owned()), Just("l2CacheSize".to_owned()), any::<String>()
        ],
        value in prop_oneof![
            "[0-9]{1,25}(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|%)?",
            "-?[0-9]{0,20}\\.?[0-9]{0,5}[a-zA-Z]{0,3}",
            any::<String>()
        ],
    ) {
        let _ = params::bytes("size", &value);
        let _ = params::threshold_percent(&value);
        let _ = params::preallocation(&value);
        let _ = params::boolean("flag", &value);
        let _ = params::clone_mode(&value);
        let _ = params::freeze(&value);
        let _ = params::max_chain_depth(&value);
        let _ = params::fs_type("fsType", &value);
        let _ = params::format_key(&mut Format::default(), &key, &value);
        let _ = params::qos_key(&mut Qos::default(), &key, &value);
        if let Ok(Step::Percent(p)) = Step::parse(&value) {
            prop_assert!((1..=1000).contains(&p));
        }
        if let Ok(Step::Bytes(b)) = Step::parse(&value) {
            prop_assert!(b > 0);
        }
    }
}
