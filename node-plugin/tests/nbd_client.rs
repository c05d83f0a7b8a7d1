//! The userspace NBD client against qemu-storage-daemon's NBD server.

mod common;

use common::*;
use qsd_node::device::nbd_client::{Connection, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH};
use qsd_node::engine::CreateVolume;
use qsd_node::graph::ExportKind;
use qsd_node::ErrorKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_negotiates_an_export_and_its_bytes_round_trip() {
    let env = Env::new().await;
    let core = env.core();
    let vol = core
        .create_volume(&CreateVolume::named("local", "v", 32 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let ep = core.attach(&vol.id, ExportKind::Nbd).await.expect("attach").endpoint;
    let mut nbd = Connection::open(&ep.path, &ep.name).await.expect("negotiate");
    let export = nbd.export();
    assert_eq!(export.size, 32 * MIB);
    assert!(
        export.flags & TFLAG_SEND_FLUSH != 0 && export.flags & TFLAG_READ_ONLY == 0,
        "{:#x}",
        export.flags
    );

    let data = pattern(4, MIB as usize);
    nbd.write(5 * MIB, &data).await.expect("write");
    nbd.flush().await.expect("flush");
    assert!(nbd.read(5 * MIB, MIB as u32).await.expect("read") == data, "written bytes read back");
    // Another client sees the same bytes.
    nbd_io(&ep, &format!("write -P 0x42 {} 64k", 20 * MIB));
    assert!(
        nbd.read(20 * MIB, 65536).await.expect("read") == vec![0x42; 65536],
        "other client's bytes"
    );
    let (pool, chain) = core.volume_chain(&vol.id).expect("chain");
    let allocated = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(pool.layer_path(chain[0])).expect("image").blocks() * 512
    };
    let before_trim = allocated();
    nbd.trim(5 * MIB, MIB as u32).await.expect("trim");
    nbd.flush().await.expect("flush");
    let zeroes = nbd.read(5 * MIB, MIB as u32).await.expect("read") == vec![0u8; MIB as usize];
    assert!(zeroes, "trimmed range reads as zeroes");
    assert!(
        allocated() + MIB / 2 <= before_trim,
        "TRIM gave space back: {before_trim} -> {}",
        allocated()
    );
    let past = nbd.read(32 * MIB - 512, 1024).await.expect_err("past the end");
    assert_eq!(past.kind(), ErrorKind::InvalidArgument);
    nbd.disconnect().await.expect("disconnect");

    let err = Connection::open(&ep.path, "no-such-export").await.expect_err("unknown export");
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_online_resize_a_reconnecting_client_sees_the_new_size_and_the_old_data() {
    let env = Env::new().await;
    let core = env.core();
    let vol = core
        .create_volume(&CreateVolume::named("local", "v", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let ep = core.attach(&vol.id, ExportKind::Nbd).await.expect("attach").endpoint;
    let mut old = Connection::open(&ep.path, &ep.name).await.expect("negotiate");
    old.write(0, &pattern(9, 4096)).await.expect("write");
    old.flush().await.expect("flush");
    core.expand_volume(&vol.id, 48 * MIB as i64).await.expect("expand");
    // The export was re-created: the old session was cut, a new one sees the new size.
    assert!(old.read(0, 4096).await.is_err(), "the old session ended with the old export");
    let mut new = Connection::open(&ep.path, &ep.name).await.expect("reconnect");
    assert_eq!(new.export().size, 48 * MIB);
    assert!(new.read(0, 4096).await.expect("read") == pattern(9, 4096), "old data after resize");
    new.write(47 * MIB, &pattern(1, 4096)).await.expect("write in the new space");
}

/// Why the kernel NBD backend's exports are writethrough: a write the daemon acknowledged but
/// never flushed dies with the daemon (its qcow2 metadata lived in the daemon's cache), while
/// the kernel would re-send an interrupted flush to the restarted daemon and report success.
/// A writethrough export acknowledges only writes that are already flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_writethrough_export_keeps_unflushed_writes_when_the_daemon_dies() {
    let env = Env::new().await;
    let core = env.core();
    let mut events = core.subscribe();
    let data = pattern(6, 65536);
    let mut volumes = Vec::new();
    for (name, writethrough) in [("cached", false), ("writethrough", true)] {
        let vol = core
            .create_volume(&CreateVolume::named("local", name, 16 * MIB as i64).expect("request"))
            .await
            .expect("create");
        let ep = core.attach_with(&vol.id, ExportKind::Nbd, writethrough).await.expect("attach");
        let mut nbd = Connection::open(&ep.endpoint.path, &ep.endpoint.name).await.expect("open");
        nbd.write(MIB, &data).await.expect("write, no flush");
        volumes.push((vol.id, writethrough));
    }
    env.kill_daemon();
    wait_event(&mut events, is_rebuilt).await;
    for (id, writethrough) in volumes {
        let ep = core.attachment(&id).expect("lookup").expect("re-exported").endpoint;
        assert_eq!(ep.writethrough, writethrough, "the rebuilt export keeps its mode");
        let mut nbd = Connection::open(&ep.path, &ep.name).await.expect("reopen");
        let back = nbd.read(MIB, data.len() as u32).await.expect("read");
        if writethrough {
            assert!(back == data, "an acknowledged write survives a writethrough export's daemon");
        } else {
            assert!(back.iter().all(|b| *b == 0), "an unflushed write died with the daemon");
        }
    }
}
