//! The vfplane node agent as a library: the binary in `main.rs` only parses
//! arguments and calls in here.
//!
//! It discovers the node (`discover`), reconciles it to a NodeState spec
//! once (`apply`) or continuously (`run`), with the spec from a state file
//! or, with `run --kube`, from the node's NodeState object (`kube_source`).

pub mod attribution;
pub mod cli;
pub mod container;
pub mod discover;
pub mod events;
pub mod files;
pub mod kube_source;
pub mod metrics;
pub mod netlink;
pub mod reconcile;
pub mod run;
pub mod scrub;
pub mod source;
