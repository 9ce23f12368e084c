//! The vfplane node agent as a library: the binary in `main.rs` only parses
//! arguments and calls in here.
//!
//! Today it discovers the node (`vfplane-agent discover`); reconciling a
//! desired node state comes with issue 3.
#![forbid(unsafe_code)]

pub mod discover;
pub mod files;
pub mod netlink;
pub mod reconcile;
pub mod run;
