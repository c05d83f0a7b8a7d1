//! New qcow2 images: a volume's head, a snapshot's overlay, a clone's target.
//!
//! On QEMU 8.0 and later the daemon makes them with two `blockdev-create` jobs. Before 8.0 the
//! qcow2 job opens its file node from inside a coroutine, and if another command has nodes
//! drained at that moment (a snapshot `transaction`, a `blockdev-add`) the daemon aborts on
//! `assert(!qemu_in_coroutine())` in `bdrv_do_drained_begin_quiesce` — seen on 7.2.22 under 24
//! concurrent workers (driver/tests/storm.rs), and fixed when 8.0 moved that open out of
//! coroutine context. There `qemu-img create` makes the image instead, outside the daemon.

use std::path::Path;

use super::{call, delete_node_if_owned, fresh_tag, Names};
use crate::error::{Error, Result};
use crate::qmp::commands::{BlockdevAdd, BlockdevCreate, BlockdevCreateOptions, BlockdevOptions};
use crate::qmp::{Job, JobOptions, QmpClient};
use qsd_csi_model::volume::{Format, Preallocation};

/// A new qcow2 image to create.
#[derive(Debug, Clone)]
pub struct NewImage<'a> {
    /// Where.
    pub path: &'a Path,
    /// Virtual size.
    pub size: u64,
    /// Relative backing file name, for overlays.
    pub backing: Option<String>,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Cluster size and subclusters.
    pub format: Format,
}

/// Creates a qcow2 image with two `blockdev-create` jobs. On failure nothing is left behind.
pub async fn create_image(qmp: &QmpClient, image: NewImage<'_>) -> Result<()> {
    if image.path.exists() {
        return Err(Error::Inconsistent(format!("{} already exists", image.path.display())));
    }
    if !qmp.version().at_least(8, 0) {
        let made = create_with_qemu_img(&image).await;
        if made.is_err() {
            let _ = std::fs::remove_file(image.path);
        }
        return made;
    }
    let names = Names::new(fresh_tag());
    let node = format!("c-{}", fresh_tag());
    let result = async {
        let file_job = names.job("create");
        let create_file = BlockdevCreate {
            job_id: file_job.clone(),
            options: BlockdevCreateOptions::File {
                filename: image.path.display().to_string(),
                size: 0,
            },
        };
        Job::run(qmp, file_job, "create", &create_file, JobOptions { manual_finalize: false })
            .await?;
        call(
            qmp,
            &BlockdevAdd(BlockdevOptions::File {
                node_name: node.clone(),
                filename: image.path.display().to_string(),
                read_only: None,
                discard: None,
                cache: None,
            }),
        )
        .await?;
        let format_job = names.job("create");
        let create_format = BlockdevCreate {
            job_id: format_job.clone(),
            options: BlockdevCreateOptions::Qcow2 {
                file: node.clone(),
                size: image.size,
                backing_fmt: image.backing.as_ref().map(|_| "qcow2".to_owned()),
                backing_file: image.backing.clone(),
                preallocation: qmp_preallocation(image.preallocation),
                cluster_size: image.format.cluster_size,
                extended_l2: image.format.extended_l2.then_some(true),
            },
        };
        Job::run(qmp, format_job, "create", &create_format, JobOptions { manual_finalize: false })
            .await
    }
    .await;
    let closed = delete_node_if_owned(qmp, &node).await;
    if result.is_err() || closed.is_err() {
        let _ = std::fs::remove_file(image.path);
    }
    result.and(closed)
}

/// A preallocation mode as `blockdev-create` spells it; `None` for thin (the default).
fn qmp_preallocation(p: Preallocation) -> Option<crate::qmp::commands::Preallocation> {
    use crate::qmp::commands::Preallocation as Qmp;
    match p {
        Preallocation::Off => None,
        Preallocation::Metadata => Some(Qmp::Metadata),
        Preallocation::Falloc => Some(Qmp::Falloc),
        Preallocation::Full => Some(Qmp::Full),
    }
}

/// The same image made by `qemu-img create` (see the module documentation). A backing file is
/// named, not opened (`-u`): the daemon holds it, and the size is given.
async fn create_with_qemu_img(image: &NewImage<'_>) -> Result<()> {
    let mut options = Vec::new();
    if let Some(mode) = qemu_img_preallocation(image.preallocation) {
        options.push(format!("preallocation={mode}"));
    }
    if let Some(cluster) = image.format.cluster_size {
        options.push(format!("cluster_size={cluster}"));
    }
    if image.format.extended_l2 {
        options.push("extended_l2=on".to_owned());
    }
    let mut args: Vec<std::ffi::OsString> =
        vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if let Some(backing) = &image.backing {
        args.extend(["-u".into(), "-F".into(), "qcow2".into(), "-b".into(), backing.into()]);
    }
    if !options.is_empty() {
        args.extend(["-o".into(), options.join(",").into()]);
    }
    args.push(image.path.as_os_str().to_owned());
    args.push(image.size.to_string().into());
    crate::command::run("qemu-img", &args).await.map(drop)
}

/// A preallocation mode as `qemu-img create -o preallocation=` spells it.
fn qemu_img_preallocation(p: Preallocation) -> Option<&'static str> {
    match p {
        Preallocation::Off => None,
        Preallocation::Metadata => Some("metadata"),
        Preallocation::Falloc => Some("falloc"),
        Preallocation::Full => Some("full"),
    }
}
