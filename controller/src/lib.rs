//! The qsd-csi controller.
//!
//! It maps CSI Controller calls onto node agents and never opens a qcow2 file itself. Its services
//! arrive with the CSI work; today the block-graph engine in `qsd-csi-node` is driven directly.
