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
//! - [`shared_watch`]: one watch and one store per kind, shared by both
//!   controllers and the webhook.
//! - [`leader`]: Lease-based leader election so two replicas can run.
//! - [`metrics`]: Prometheus metrics and the health endpoints.
//! - [`webhook`]: admission for VfPolicy and for pods asking for VFs.

pub mod cli;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod rollout;
pub mod shared_watch;
pub mod webhook;

/// Everything that can go wrong in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("{action} {object}")]
    Kube {
        /// What was being done (`applying spec of`, `patching status of`).
        action: &'static str,
        /// `NodeState/worker-1`, `VfPolicy/fast`.
        object: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A deleted policy's VFs are still on some node; its finalizer stays.
    #[error("policy {policy} is still releasing {count} VFs (first: {first}); waiting for the agents")]
    StillReleasing {
        /// The policy.
        policy: String,
        /// VFs still in its pool.
        count: usize,
        /// One of them, `node PF #index`.
        first: String,
    },
    /// The finalizer machinery failed (adding or removing ours).
    #[error("finalizer of VfPolicy/{policy}")]
    Finalizer {
        /// The policy.
        policy: String,
        /// What went wrong.
        #[source]
        source: Box<kube::runtime::finalizer::Error<Error>>,
    },
}

impl Error {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "api",
            Self::StillReleasing { .. } => "still_releasing",
            Self::Finalizer { .. } => "finalizer",
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
