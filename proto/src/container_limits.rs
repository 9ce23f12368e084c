//! What a pool's `containerProfile` means on the node, in numbers: the
//! limits a container given a VF of the pool must run under. The controller
//! resolves a pool's profile (the strictest of every policy naming the pool,
//! [`crate::vf_policy::ContainerProfile::strictest`]) into each of the
//! pool's VF groups' `containerLimits` (NodeState spec); the agent merges
//! the groups of a pool into the pool's (pool config), which changes nothing
//! when they come from one controller; the device plugin's NRI plugin has
//! the runtime set what the node sets (locked memory, NUMA cpuset, pids),
//! and the agent checks all of them in the container's cgroup.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The limits, each absent when the profile does not name it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerLimits {
    /// RLIMIT_MEMLOCK, in bytes, set before the container's first
    /// instruction (`containerProfile.lockedMemory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_memory_bytes: Option<u64>,
    /// The container's cpuset is the CPUs and memory node of the VF's NUMA
    /// node (`containerProfile.numaAligned`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub numa_aligned: bool,
    /// `memory.max` must be set and at least this many bytes
    /// (`containerProfile.memory`; the kubelet sets it from the pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// `cpu.max` must be set and give at least this many millicores
    /// (`containerProfile.cpu`; the kubelet sets it from the pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    /// The container's `pids.max`, set by the runtime from vfplane's NRI
    /// plugin (`containerProfile.pids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
}

impl ContainerLimits {
    /// Whether the profile asks anything of the container on the node.
    /// A pool with a profile also wants the container's number of
    /// processes bounded (by `pids` or by the runtime).
    pub fn any(&self) -> bool {
        *self != Self::default()
    }

    /// Whether it asks nothing (not written then).
    pub fn is_empty(&self) -> bool {
        !self.any()
    }

    /// The limits of a pool made of groups with `self` and `other`: a
    /// container of the pool may get a VF of either, so each minimum is the
    /// larger one, the pids bound the smaller one, and NUMA alignment holds
    /// when either asks.
    #[must_use]
    pub fn merge(self, other: Self) -> Self {
        fn larger(a: Option<u64>, b: Option<u64>) -> Option<u64> {
            a.max(b)
        }
        fn smaller(a: Option<u64>, b: Option<u64>) -> Option<u64> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        Self {
            locked_memory_bytes: larger(self.locked_memory_bytes, other.locked_memory_bytes),
            numa_aligned: self.numa_aligned || other.numa_aligned,
            memory_bytes: larger(self.memory_bytes, other.memory_bytes),
            cpu_millis: larger(self.cpu_millis, other.cpu_millis),
            pids_max: smaller(self.pids_max, other.pids_max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pools_limits_are_the_strictest_of_its_groups() {
        let a = ContainerLimits {
            locked_memory_bytes: Some(64),
            memory_bytes: Some(100),
            pids_max: Some(500),
            ..ContainerLimits::default()
        };
        let b = ContainerLimits {
            locked_memory_bytes: Some(32),
            numa_aligned: true,
            cpu_millis: Some(2000),
            pids_max: Some(100),
            ..ContainerLimits::default()
        };
        let merged = a.merge(b);
        assert_eq!(
            merged,
            ContainerLimits {
                locked_memory_bytes: Some(64),
                numa_aligned: true,
                memory_bytes: Some(100),
                cpu_millis: Some(2000),
                pids_max: Some(100),
            }
        );
        assert_eq!(merged, b.merge(a), "order does not matter");
        assert!(!ContainerLimits::default().any());
        assert!(a.any());
    }

    #[test]
    fn absent_limits_are_not_written() {
        let yaml = serde_yaml::to_string(&ContainerLimits {
            pids_max: Some(256),
            ..ContainerLimits::default()
        })
        .unwrap_or_default();
        assert_eq!(yaml, "pidsMax: 256\n");
        let unknown = serde_yaml::from_str::<ContainerLimits>("pidMax: 1\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(unknown.contains("unknown field `pidMax`"), "{unknown}");
    }
}
