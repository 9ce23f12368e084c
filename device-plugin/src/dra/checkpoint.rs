//! The claims the driver has prepared, on disk, so that a restarted driver
//! answers a repeated prepare with what it gave before and unprepares what
//! it prepared (the kubelet's calls outlive any one process).
//!
//! One JSON file in the driver's directory, replaced atomically after every
//! change and before the kubelet hears of it:
//!
//! ```json
//! {"version":1,"claims":{"<uid>":{"namespace":"ns","name":"c","devices":[
//!   {"requests":["vf"],"device":"0000-00-12-0","address":"0000:00:12.0","pool":"fast"}]}}}
//! ```

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vfplane_host::PciAddress;

/// The format written; a file of another version is refused, not guessed at.
pub const VERSION: u32 = 1;

/// The file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Checkpoint {
    /// [`VERSION`].
    pub version: u32,
    /// Prepared claims by UID.
    pub claims: BTreeMap<String, PreparedClaim>,
}

/// One prepared claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreparedClaim {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its VFs.
    pub devices: Vec<PreparedDevice>,
}

/// One VF of a prepared claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreparedDevice {
    /// The claim's requests it serves (base names, without a subrequest).
    pub requests: Vec<String>,
    /// Its device name in the ResourceSlice.
    pub device: String,
    /// Its PCI address.
    pub address: PciAddress,
    /// Its vfplane pool.
    pub pool: String,
}

/// Why the checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file exists and cannot be read, or cannot be written.
    #[error("cannot {action} the DRA checkpoint {path}")]
    Io {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a checkpoint of this version.
    #[error("the DRA checkpoint {path} is not a version-{VERSION} checkpoint")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

impl Checkpoint {
    /// Reads the file; an absent file is an empty checkpoint.
    ///
    /// # Errors
    /// An unreadable file or one that does not parse: the driver must not
    /// start as if it had prepared nothing.
    pub fn read(path: &Path) -> Result<Self, CheckpointError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Self {
                    version: VERSION,
                    claims: BTreeMap::new(),
                });
            }
            Err(source) => {
                return Err(CheckpointError::Io {
                    action: "read",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let invalid = |source| CheckpointError::Invalid {
            path: path.to_owned(),
            source,
        };
        let checkpoint: Self = serde_json::from_str(&text).map_err(invalid)?;
        if checkpoint.version != VERSION {
            return Err(invalid(serde::de::Error::custom(format!(
                "version {} is not {VERSION}",
                checkpoint.version
            ))));
        }
        Ok(checkpoint)
    }

    /// Replaces the file atomically.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn write(&self, path: &Path) -> Result<(), CheckpointError> {
        let err = |source| CheckpointError::Io {
            action: "write",
            path: path.to_owned(),
            source,
        };
        let text = serde_json::to_string(self).map_err(|e| err(io::Error::other(e)))?;
        vfplane_proto::files::write_atomically(path, text.as_bytes(), Some(0o600)).map_err(err)
    }

    /// The claim holding `address`, if any.
    pub fn holder(&self, address: PciAddress) -> Option<&str> {
        self.claims
            .iter()
            .find(|(_, claim)| claim.devices.iter().any(|d| d.address == address))
            .map(|(uid, _)| uid.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_claim() -> Checkpoint {
        let mut checkpoint = Checkpoint {
            version: VERSION,
            claims: BTreeMap::new(),
        };
        checkpoint.claims.insert(
            "uid-1".to_owned(),
            PreparedClaim {
                namespace: "ns".to_owned(),
                name: "c".to_owned(),
                devices: vec![PreparedDevice {
                    requests: vec!["vf".to_owned()],
                    device: "0000-00-12-0".to_owned(),
                    address: "0000:00:12.0".parse().unwrap(),
                    pool: "fast".to_owned(),
                }],
            },
        );
        checkpoint
    }

    #[test]
    fn a_written_checkpoint_reads_back_and_names_its_holders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.json");
        assert_eq!(Checkpoint::read(&path).unwrap().claims.len(), 0, "absent: empty");
        let checkpoint = one_claim();
        checkpoint.write(&path).unwrap();
        let back = Checkpoint::read(&path).unwrap();
        assert_eq!(back, checkpoint);
        assert_eq!(back.holder("0000:00:12.0".parse().unwrap()), Some("uid-1"));
        assert_eq!(back.holder("0000:00:12.2".parse().unwrap()), None);
    }

    #[test]
    fn a_garbled_or_foreign_checkpoint_is_refused_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.json");
        std::fs::write(&path, "{not json").unwrap();
        let error = Checkpoint::read(&path).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("checkpoint.json is not a version-1 checkpoint"),
            "{error}"
        );
        std::fs::write(&path, r#"{"version":2,"claims":{}}"#).unwrap();
        let error = Checkpoint::read(&path).unwrap_err();
        assert!(
            vfplane_host::error_chain(&error).contains("version 2 is not 1"),
            "{}",
            vfplane_host::error_chain(&error)
        );
    }
}
