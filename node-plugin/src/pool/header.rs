//! The two fields of a qcow2 header that recovery reads from disk: the virtual size and the
//! backing file's name.
//!
//! ```text
//!   0  magic "QFI\xfb"   8  backing_file_offset (u64)   16 backing_file_size (u32)
//!   24 size (u64)        all big-endian
//! ```
//! QEMU writes both with a synchronous header update (`block_resize`, and the backing rewrite a
//! finished commit or stream makes), so after a kill the header says whether the operation
//! passed that point. Nothing else of the format is read here: the daemon owns the images.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::{Error, Result};

/// What recovery needs of a qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The virtual size in bytes.
    pub size: u64,
    /// The backing file's name as written in the image (relative in our pools), if any.
    pub backing: Option<String>,
}

/// Reads the header of the qcow2 image at `path`.
pub fn read(path: &Path) -> Result<Header> {
    let corrupt = |what: &str| Error::Inconsistent(format!("{}: {what}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("open image", path, e))?;
    let mut fixed = [0u8; 32];
    file.read_exact(&mut fixed).map_err(|e| Error::io("read image header", path, e))?;
    if &fixed[0..4] != b"QFI\xfb" {
        return Err(corrupt("not a qcow2 image"));
    }
    let be64 = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&fixed[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let (offset, size) = (be64(8), be64(24));
    let name_len = u32::from_be_bytes([fixed[16], fixed[17], fixed[18], fixed[19]]) as usize;
    let backing = match (offset, name_len) {
        (0, _) | (_, 0) => None,
        // QEMU caps the name at 1023 bytes.
        (_, n) if n > 1023 => return Err(corrupt("backing file name too long")),
        (offset, n) => {
            let mut name = vec![0u8; n];
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut name))
                .map_err(|e| Error::io("read backing file name", path, e))?;
            Some(String::from_utf8(name).map_err(|_| corrupt("backing file name is not UTF-8"))?)
        }
    };
    Ok(Header { size, backing })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) {
        let out = std::process::Command::new("qemu-img").args(args).output().expect("qemu-img");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn the_header_gives_the_size_qemu_img_made_and_the_relative_backing_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().expect("utf8"), "64M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            top.to_str().expect("utf8"),
            "96M",
        ]);
        assert_eq!(read(&base).expect("base"), Header { size: 64 << 20, backing: None });
        assert_eq!(
            read(&top).expect("top"),
            Header { size: 96 << 20, backing: Some("base.qcow2".into()) }
        );
        qemu_img(&["resize", "-q", top.to_str().expect("utf8"), "128M"]);
        assert_eq!(read(&top).expect("grown").size, 128 << 20);
    }

    #[test]
    fn a_file_that_is_not_qcow2_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [0u8; 64]).expect("write");
        assert!(matches!(read(&raw), Err(Error::Inconsistent(_))));
        assert!(matches!(read(&dir.path().join("missing")), Err(Error::Io { .. })));
    }
}
