//! The cluster controller: turns `VfPolicy` objects into one `NodeState` per
//! node, keeps the policies' status, and serves the admission webhook.
//!
//! - [`plan`]: the pure part. Given policies, nodes and node states, what
//!   each node's `NodeState.spec` should be, which policies conflict, and
//!   what each policy's status is. No I/O, so it is tested directly and
//!   benchmarked at cluster scale.
//! - [`controller`]: the kube-runtime wiring. Watches VfPolicy, Node and
//!   NodeState; writes specs and statuses by server-side apply; the policy
//!   finalizer.
//! - [`leader`]: Lease-based leader election so two replicas can run.
//! - [`metrics`]: Prometheus metrics and the health endpoints.
//! - [`webhook`]: admission for VfPolicy and for pods asking for VFs.
#![forbid(unsafe_code)]

pub mod plan;
pub mod webhook;
