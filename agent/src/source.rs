//! What the agent's loop ([`crate::run`]) is told by the rest: why a pass
//! happens ([`Trigger`]), what to apply ([`Desired`]) and where that comes
//! from ([`DesiredStateSource`]). A leaf: the sources and watchers import
//! it, and the loop imports them, so nothing imports the loop.

use std::sync::mpsc::Sender;

use vfplane_proto::node_state::{NodeStateSpec, NodeStateStatus};

/// Why a pass happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The first pass.
    Start,
    /// The desired state may have changed (the state file, or the
    /// NodeState object).
    Desired,
    /// The kernel reported a device change.
    Uevent,
    /// The resync timer.
    Resync,
    /// The kubelet's answer of who holds which VF changed.
    Owners,
    /// A container given VFs was recorded by the OCI hook, or its record
    /// went.
    Containers,
    /// A VF's handed-out mark appeared, changed or went (the DRA driver
    /// marks a VF released when the kubelet unprepares its claim).
    Marks,
}

/// What a source wants for the pass about to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    /// Bring the node to `spec`.
    Apply {
        /// The spec.
        spec: NodeStateSpec,
        /// `metadata.generation` of the spec, reported as the status's
        /// `observedGeneration` (`None` for a state file).
        generation: Option<i64>,
        /// A problem of the source that did not stop the pass (a state file
        /// that stopped parsing: the last good spec is applied); it leads the
        /// status's errors.
        warning: Option<String>,
    },
    /// No desired state (yet): leave the host exactly as it is.
    Wait,
}

/// Where the desired state comes from, and where the status goes besides
/// the files.
pub trait DesiredStateSource {
    /// Starts watching: sends [`Trigger::Desired`] on `tx` whenever the
    /// desired state may have changed. Called once, before the first pass.
    fn watch(&mut self, tx: Sender<Trigger>);

    /// The desired state for the pass about to run. Must not block on
    /// anything remote.
    fn desired(&mut self) -> Desired;

    /// The status of the pass that applied the last [`Desired::Apply`].
    /// Must not block on anything remote.
    fn report_status(&mut self, _status: &NodeStateStatus) {}
}
