//! Generated protocol code for qsd-csi.
//!
//! This crate only generates code: `csi.proto` (wire-compatible with CSI spec v1.12, package
//! `csi.v1`) and `agent.proto` (what the controller asks of a node plugin). The protocol files and
//! their tonic/prost generation arrive with the CSI services; until then the crate is empty so that
//! the workspace already has its final shape.
