//! The one error type of the host model: every variant names the path or
//! device it is about and what was wrong with it.

use std::io;
use std::path::PathBuf;

use crate::PciAddress;

/// What went wrong reading or writing the node's sysfs.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The device directory does not exist: a wrong address, or a device
    /// that went away (a VF removed by a `sriov_numvfs` write).
    #[error("PCI device {address} does not exist ({path})")]
    DeviceNotFound { address: PciAddress, path: PathBuf },

    /// A sysfs attribute could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A sysfs attribute held something that is not what the kernel writes there.
    #[error("{path}: cannot parse {value:?} as {expected}")]
    Parse {
        path: PathBuf,
        value: String,
        expected: &'static str,
    },

    /// A write to a sysfs attribute failed.
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },

    /// The device has no SR-IOV capability.
    #[error("{address} is not an SR-IOV physical function (no sriov_totalvfs)")]
    NotPhysicalFunction { address: PciAddress },

    /// More VFs were requested than the device can make.
    #[error("{address}: {requested} VFs requested, but the device supports at most {total}")]
    TooManyVfs {
        address: PciAddress,
        requested: u16,
        total: u16,
    },

    /// A driver bind did not take.
    #[error("{address}: asked to bind {wanted}, but the device is bound to {actual}")]
    BindFailed {
        address: PciAddress,
        wanted: String,
        actual: String,
    },

    /// The device has no `reset` attribute: the kernel knows no way to
    /// reset it alone.
    #[error("{address} offers no function reset (no sysfs reset attribute)")]
    NoFunctionReset { address: PciAddress },

    /// A driver name that cannot be a kernel driver name.
    #[error("invalid driver name {0:?}")]
    InvalidDriverName(String),
}

impl HostError {
    /// True when the error means the device (or one of its files) is gone,
    /// which is what a concurrent VF removal looks like.
    pub fn is_vanished(&self) -> bool {
        match self {
            Self::DeviceNotFound { .. } => true,
            Self::Read { source, .. } | Self::Write { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
            }
            _ => false,
        }
    }
}

/// Short form for results of this crate.
pub type Result<T, E = HostError> = std::result::Result<T, E>;
