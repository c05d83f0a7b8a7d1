//! Generates the CSI types and services with the protoc shipped by `protoc-bin-vendored`, so no
//! system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // prost-build reads the compiler's path from the environment.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    // The agent's label maps are kept sorted, as the engine stores them.
    tonic_prost_build::configure().btree_map(".qsd.agent.v1").compile_protos(
        &[PathBuf::from("proto/csi.proto"), PathBuf::from("proto/agent.proto")],
        &[PathBuf::from("proto"), well_known],
    )?;
    Ok(())
}
