//! Which VFs a pod has, from its environment alone.
//!
//! The device plugin's Allocate sets `PCIDEVICE_VFPLANE_IO_<POOL>` to a
//! comma-separated list of PCI addresses (the naming DPDK applications
//! already read) and `PCIDEVICE_VFPLANE_IO_<POOL>_INFO` to JSON about them,
//! which the driver does not need.

use thiserror::Error;

/// Prefix of the variables naming a pod's VFs.
pub const ENV_PREFIX: &str = "PCIDEVICE_VFPLANE_IO_";

/// Errors of reading the environment.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvError {
    /// An entry is not a PCI address.
    #[error("{var} holds {value:?}, which is not a PCI address like 0000:00:12.0")]
    BadAddress {
        /// The variable.
        var: String,
        /// The bad entry.
        value: String,
    },
    /// No VF at all.
    #[error("no VF in the environment: no {ENV_PREFIX}<POOL> variable names a PCI address")]
    NoVfs,
}

/// One VF handed to the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfAssignment {
    /// The pool (resource name suffix), as in the variable name.
    pub pool: String,
    /// PCI address, `dddd:bb:dd.f`.
    pub pci: String,
}

/// Whether `s` is a full PCI address `dddd:bb:dd.f` (hex digits).
pub fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && [0, 1, 2, 3, 5, 6, 8, 9].iter().all(|&i| b[i].is_ascii_hexdigit())
        && (b'0'..=b'7').contains(&b[11])
}

/// The VFs named by `vars` (name, value pairs), sorted by pool then address.
///
/// # Errors
/// An entry that is not a PCI address.
pub fn vfs_from_vars<I, K, V>(vars: I) -> Result<Vec<VfAssignment>, EnvError>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut out = Vec::new();
    for (name, value) in vars {
        let name = name.as_ref();
        let Some(pool) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if pool.is_empty() || pool.ends_with("_INFO") {
            continue;
        }
        for entry in value.as_ref().split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if !is_pci_address(entry) {
                return Err(EnvError::BadAddress {
                    var: name.to_owned(),
                    value: entry.to_owned(),
                });
            }
            out.push(VfAssignment {
                pool: pool.to_owned(),
                pci: entry.to_ascii_lowercase(),
            });
        }
    }
    out.sort_by(|a, b| (&a.pool, &a.pci).cmp(&(&b.pool, &b.pci)));
    out.dedup();
    Ok(out)
}

/// The VFs named by this process's environment.
///
/// # Errors
/// A malformed entry, or no VF at all.
pub fn vfs_from_env() -> Result<Vec<VfAssignment>, EnvError> {
    let vfs = vfs_from_vars(std::env::vars())?;
    if vfs.is_empty() {
        return Err(EnvError::NoVfs);
    }
    Ok(vfs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_and_addresses_are_read_and_info_ignored() {
        let vars = [
            ("PCIDEVICE_VFPLANE_IO_FAST", "0000:00:12.2, 0000:00:12.0"),
            ("PCIDEVICE_VFPLANE_IO_FAST_INFO", "{\"0000:00:12.0\":{}}"),
            ("PCIDEVICE_VFPLANE_IO_SLOW", "0000:21:10.0"),
            ("PCIDEVICE_OTHER_IO_X", "0000:00:13.0"),
            ("PATH", "/bin"),
        ];
        let vfs = vfs_from_vars(vars).unwrap();
        let got: Vec<(&str, &str)> = vfs.iter().map(|v| (v.pool.as_str(), v.pci.as_str())).collect();
        assert_eq!(
            got,
            [
                ("FAST", "0000:00:12.0"),
                ("FAST", "0000:00:12.2"),
                ("SLOW", "0000:21:10.0")
            ]
        );
    }

    #[test]
    fn bad_addresses_are_errors() {
        let err = vfs_from_vars([("PCIDEVICE_VFPLANE_IO_P", "00:12.0")]).unwrap_err();
        assert!(matches!(err, EnvError::BadAddress { .. }));
        assert!(is_pci_address("0000:00:12.0"));
        assert!(!is_pci_address("0000:00:12.8"));
        assert!(
            vfs_from_vars([("PCIDEVICE_VFPLANE_IO_P", " , ")])
                .unwrap()
                .is_empty()
        );
    }
}
