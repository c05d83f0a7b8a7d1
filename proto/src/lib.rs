//! Generated protocol code for qsd-csi.
//!
//! This crate only generates code. `proto/csi.proto` is our rendering of the CSI spec v1.12
//! (package `csi.v1`); `proto/check-wire-compat` proves in CI that every field, enum value and
//! RPC matches the published spec, so any CO or sidecar speaks to us unchanged.
//! `proto/agent.proto` is what the controller asks of a node plugin.

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

/// The CSI v1 types and services.
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// The node agent: what the controller asks of a node's engine.
pub mod agent {
    tonic::include_proto!("qsd.agent.v1");
}
