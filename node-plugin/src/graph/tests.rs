//! Tests of [`super`].

use super::*;

#[test]
fn a_listener_has_a_peer_only_when_a_connection_was_accepted_on_it() {
    let head = "Num       RefCount Protocol Flags    Type St Inode Path\n";
    let listening = "0000000035: 00000002 00000000 00010000 0001 01 3083173 /run/x/vu.sock\n";
    let accepted = "0000000098: 00000003 00000000 00000000 0001 03 3083873 /run/x/vu.sock\n";
    let other = "0000000099: 00000003 00000000 00000000 0001 03 3083874 /run/y/vu.sock\n";
    let table = |rows: &[&str]| format!("{head}{}", rows.concat());
    assert!(!socket_table_has_peer(&table(&[listening, other]), "/run/x/vu.sock"));
    assert!(socket_table_has_peer(&table(&[listening, accepted]), "/run/x/vu.sock"));
}

#[test]
fn node_names_fit_qemus_31_byte_limit() {
    let names = Names::new(fresh_tag());
    let layer = LayerId::random();
    for name in
        [names.format(layer), names.file(layer), names.throttle(), names.group(), names.export()]
    {
        assert!(name.len() <= 31, "{name}");
    }
}

#[test]
fn a_chain_nests_top_first_and_ends_in_an_explicit_null_backing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = Pool::open(
        dir.path(),
        crate::pool::PoolName::parse("p").expect("name"),
        crate::pool::PoolKind::Local,
    )
    .expect("pool");
    let (top, bottom) = (LayerId::random(), LayerId::random());
    let names = Names::new("aaaaaaaaaaaa");
    let json =
        serde_json::to_value(chain_options(&pool, &names, &[top, bottom], false).expect("a chain"))
            .expect("json");
    assert_eq!(json["node-name"], names.format(top));
    assert_eq!(json["backing"]["node-name"], names.format(bottom));
    assert!(json["backing"]["backing"].is_null());
    assert!(json["backing"].as_object().is_some_and(|o| o.contains_key("backing")));
    assert_eq!(json["file"]["filename"], pool.layer_path(top).display().to_string());
    assert!(json.get("l2-cache-size").is_none(), "QEMU's default cache unless asked");
    let tuned = with_l2_cache(
        chain_options(&pool, &names, &[top, bottom], false).expect("a chain"),
        Some(4 << 20),
    );
    let json = serde_json::to_value(tuned).expect("json");
    assert_eq!(json["l2-cache-size"], 4 << 20, "the head's cache");
    assert!(json["backing"].get("l2-cache-size").is_none(), "lower layers keep the default");
}
