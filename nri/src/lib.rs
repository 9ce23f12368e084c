//! The Node Resource Interface (NRI), a plugin's side: containerd 2 (and
//! CRI-O) call NRI plugins on a unix socket as they create, update and
//! stop containers, and a plugin may adjust a container's OCI spec before
//! it is created (rlimits, cgroup resources, devices). The runtime then
//! applies the adjusted spec itself, through the cgroup driver it is
//! configured with: under the systemd driver as unit properties, so
//! nothing is written behind systemd's back.
//!
//! - [`mux`]: the socket's two logical connections;
//! - [`ttrpc`]: the RPC framing on each;
//! - [`api`]: the v1alpha1 messages (prost, from `proto/`);
//! - [`plugin`]: registration, the `Plugin` service, reconnection.
//!
//! No Rust crate spoke this protocol; this one is written from the
//! protocol's definition (containerd/nri v0.11.0, ttrpc v1.2.7).

pub mod mux;
pub mod plugin;
pub mod ttrpc;

/// The NRI v1alpha1 messages.
#[allow(missing_docs, clippy::all)]
pub mod api {
    include!(concat!(env!("OUT_DIR"), "/nri.pkg.api.v1alpha1.rs"));
}

pub use plugin::{Events, Plugin, Refusal, Registration, run, serve};
