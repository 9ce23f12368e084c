//! The VF state directory: what the agent tells the device plugin about a VF
//! that sysfs cannot say.
//!
//! One directory (default [`DEFAULT_STATE_DIR`]) holds, per VF, files named
//! by its PCI address:
//!
//! | file | holds | meaning |
//! |---|---|---|
//! | `<address>` | one word: `scrub-pending` or `scrub-failed` | the VF is being scrubbed after its container left (the plugin holds an `Allocate` for it until the file goes, and reports the VF Unhealthy only once the word is older than [`SCRUB_STALLED`]: no agent is finishing it), or the scrub failed (Unhealthy: quarantined). No file: no scrub in progress. |
//! | `<address>.mac` | a MAC address, `aa:bb:cc:dd:ee:ff` | the MAC the agent gave the VF; the plugin puts it in `PCIDEVICE_VFPLANE_IO_<POOL>_INFO` |
//! | `<address>.handed-out` | the Unix time (seconds) of the `Allocate` | written by the device plugin when it hands the VF to a container: the VF is dirty until the agent scrubs it and removes the file. The plugin refuses to hand out a VF that has one. |
//! | `<address>.claim-config`, `<address>.claim-config-result` | a DRA claim's settings for the VF, and the agent's answer | see [`crate::vf_config`] |
//!
//! Writers replace a file atomically (write a temporary file in the same
//! directory, then rename it over the name: [`write_vf_state`] does this),
//! so a reader never sees half a word. Clearing a state is removing the
//! file. Readers treat a word they do not know as Unhealthy: a newer agent
//! with a new state must never make a VF look usable to an older plugin.
//! Files whose names are not PCI addresses are ignored.
//!
//! Example, by hand: `echo scrub-failed > /run/vfplane/vf-state/0000:00:12.0`.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::pci::PciAddress;

/// Where the agent writes VF states and the device plugin reads them.
pub const DEFAULT_STATE_DIR: &str = "/run/vfplane/vf-state";

/// Suffix of the file holding a VF's MAC address.
pub const MAC_SUFFIX: &str = ".mac";

/// Suffix of the file marking a VF as handed out and not scrubbed since.
pub const HANDED_OUT_SUFFIX: &str = ".handed-out";

/// A state the agent has set on a VF. No state (no file) means nothing is
/// going on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VfState {
    /// The VF's last container left; the agent is resetting it.
    ScrubPending,
    /// Resetting the VF failed: it must not be handed out.
    ScrubFailed,
}

/// A state file holding something that is not a known state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown VF state {0:?} (expected scrub-pending or scrub-failed)")]
pub struct ParseVfStateError(pub String);

impl VfState {
    /// The word in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScrubPending => "scrub-pending",
            Self::ScrubFailed => "scrub-failed",
        }
    }
}

impl fmt::Display for VfState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VfState {
    type Err = ParseVfStateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "scrub-pending" => Ok(Self::ScrubPending),
            "scrub-failed" => Ok(Self::ScrubFailed),
            other => Err(ParseVfStateError(other.to_owned())),
        }
    }
}

/// `<dir>/<address>`: the state file of a VF.
pub fn state_path(dir: &Path, address: PciAddress) -> PathBuf {
    dir.join(address.to_string())
}

/// `<dir>/<address>.mac`: the MAC file of a VF.
pub fn mac_path(dir: &Path, address: PciAddress) -> PathBuf {
    dir.join(format!("{address}{MAC_SUFFIX}"))
}

/// Reads a VF's state: `Ok(None)` without a file, `Ok(Some(Err(..)))` for a
/// file holding an unknown word (which readers must treat as Unhealthy).
///
/// # Errors
/// I/O errors other than the file not existing.
pub fn read_vf_state(
    dir: &Path,
    address: PciAddress,
) -> io::Result<Option<Result<VfState, ParseVfStateError>>> {
    match fs::read_to_string(state_path(dir, address)) {
        Ok(text) => Ok(Some(text.parse())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A `scrub-pending` older than this (by its file's modification time) is
/// a scrub nobody is finishing: a scrub takes about a second and the agent
/// gives a function reset 10 s, so the agent that wrote it is gone or
/// stuck.
pub const SCRUB_STALLED: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a VF's state file has held its word (since it was last
/// written): `Ok(None)` without a file. A clock step backwards gives zero.
///
/// # Errors
/// I/O errors other than the file not existing.
pub fn vf_state_age(dir: &Path, address: PciAddress) -> io::Result<Option<std::time::Duration>> {
    match fs::metadata(state_path(dir, address)) {
        Ok(meta) => Ok(Some(meta.modified()?.elapsed().unwrap_or_default())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads a VF's MAC file: `Ok(None)` without one. The text is trimmed and
/// lower-cased; it is not otherwise checked.
///
/// # Errors
/// I/O errors other than the file not existing.
pub fn read_vf_mac(dir: &Path, address: PciAddress) -> io::Result<Option<String>> {
    match fs::read_to_string(mac_path(dir, address)) {
        Ok(text) => {
            let mac = text.trim().to_ascii_lowercase();
            Ok((!mac.is_empty()).then_some(mac))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sets (`Some`) or clears (`None`) a VF's state, atomically: the new file
/// is written beside the old one and renamed over it. The directory is
/// made when missing.
///
/// # Errors
/// I/O errors; clearing a state that is not set is not one.
pub fn write_vf_state(dir: &Path, address: PciAddress, state: Option<VfState>) -> io::Result<()> {
    let path = state_path(dir, address);
    match state {
        None => match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(state) => crate::files::write_atomically(&path, format!("{state}\n").as_bytes(), None),
    }
}

/// Sets (`Some`) or clears (`None`) a VF's MAC file, atomically.
///
/// # Errors
/// I/O errors; clearing a MAC that is not set is not one.
pub fn write_vf_mac(dir: &Path, address: PciAddress, mac: Option<&str>) -> io::Result<()> {
    let path = mac_path(dir, address);
    match mac {
        None => match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(mac) => crate::files::write_atomically(&path, format!("{}\n", mac.trim()).as_bytes(), None),
    }
}

/// `<dir>/<address>.handed-out`: the mark of a VF handed out and not
/// scrubbed since.
pub fn handed_out_path(dir: &Path, address: PciAddress) -> PathBuf {
    dir.join(format!("{address}{HANDED_OUT_SUFFIX}"))
}

/// Marks a VF handed out now, atomically. The mark is written before the
/// plugin answers `Allocate`, so a VF a container may have touched is never
/// without one.
///
/// # Errors
/// I/O errors.
pub fn mark_handed_out(dir: &Path, address: PciAddress) -> io::Result<()> {
    write_mark(dir, address, "")
}

/// Marks a VF handed out and already released by its holder, atomically:
/// the DRA driver writes it when the kubelet unprepares a claim, which it
/// does only once every container of the claim's pods has stopped. The
/// agent scrubs such a VF without waiting out its release grace (that grace
/// is for a device-plugin allocation the kubelet has not listed yet).
///
/// # Errors
/// I/O errors.
pub fn mark_released(dir: &Path, address: PciAddress) -> io::Result<()> {
    write_mark(dir, address, RELEASED)
}

/// The word after the time in a mark written by [`mark_released`].
const RELEASED: &str = " released";

fn write_mark(dir: &Path, address: PciAddress, suffix: &str) -> io::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    crate::files::write_atomically(
        &handed_out_path(dir, address),
        format!("{now}{suffix}\n").as_bytes(),
        None,
    )
}

/// A VF's handed-out mark, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandedOut {
    /// When it was written: the time in the mark, or the file's
    /// modification time when the text holds no number.
    pub at: std::time::SystemTime,
    /// Written by [`mark_released`]: the holder is known to be gone.
    pub released: bool,
}

/// A VF's handed-out mark, if it has not been scrubbed since. A mark whose
/// text is not understood is still a mark (it must never read as "clean"),
/// dated by the file's modification time and not released.
///
/// # Errors
/// I/O errors other than the file not existing.
pub fn handed_out(dir: &Path, address: PciAddress) -> io::Result<Option<HandedOut>> {
    let path = handed_out_path(dir, address);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    let secs = words.first().and_then(|w| w.parse::<u64>().ok());
    let at = match secs {
        Some(secs) => std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
        None => fs::metadata(&path).and_then(|m| m.modified())?,
    };
    // Only the exact form mark_released writes is a release.
    let released = secs.is_some() && words.len() == 2 && words[1] == RELEASED.trim_start();
    Ok(Some(HandedOut { at, released }))
}

/// When a VF was handed out, if it has not been scrubbed since (see
/// [`handed_out`]).
///
/// # Errors
/// I/O errors other than the file not existing.
pub fn handed_out_at(dir: &Path, address: PciAddress) -> io::Result<Option<std::time::SystemTime>> {
    Ok(handed_out(dir, address)?.map(|mark| mark.at))
}

/// Removes a VF's handed-out mark: the agent scrubbed it, or it is gone.
///
/// # Errors
/// I/O errors; a missing mark is not one.
pub fn clear_handed_out(dir: &Path, address: PciAddress) -> io::Result<()> {
    match fs::remove_file(handed_out_path(dir, address)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The VFs that carry a handed-out mark in `dir` (none when `dir` does not
/// exist).
///
/// # Errors
/// I/O errors reading the directory.
pub fn handed_out_vfs(dir: &Path) -> io::Result<Vec<PciAddress>> {
    vfs_with_suffix(dir, HANDED_OUT_SUFFIX)
}

/// The VFs with a file `<address><suffix>` in `dir`, sorted (none when
/// `dir` does not exist).
///
/// # Errors
/// I/O errors reading the directory.
pub fn vfs_with_suffix(dir: &Path, suffix: &str) -> io::Result<Vec<PciAddress>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut vfs = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        if let Some(address) = name
            .to_str()
            .and_then(|n| n.strip_suffix(suffix))
            .and_then(|a| a.parse().ok())
        {
            vfs.push(address);
        }
    }
    vfs.sort();
    Ok(vfs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> PciAddress {
        PciAddress {
            domain: 0,
            bus: 0,
            device: 0x12,
            function: 0,
        }
    }

    #[test]
    fn words_round_trip_and_unknown_words_are_errors() {
        for state in [VfState::ScrubPending, VfState::ScrubFailed] {
            assert_eq!(state.as_str().parse::<VfState>(), Ok(state));
            assert_eq!(format!("{state}\n").parse::<VfState>(), Ok(state));
        }
        assert_eq!(
            "scrubbing".parse::<VfState>(),
            Err(ParseVfStateError("scrubbing".to_owned()))
        );
    }

    #[test]
    fn files_are_written_read_and_cleared() {
        let dir = std::env::temp_dir().join(format!("vf-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(read_vf_state(&dir, addr()).ok(), Some(None));
        write_vf_state(&dir, addr(), Some(VfState::ScrubFailed)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            fs::read_to_string(dir.join("0000:00:12.0")).ok().as_deref(),
            Some("scrub-failed\n")
        );
        assert_eq!(
            read_vf_state(&dir, addr()).ok(),
            Some(Some(Ok(VfState::ScrubFailed)))
        );
        let age = vf_state_age(&dir, addr()).ok().flatten();
        assert!(
            age.is_some_and(|a| a < std::time::Duration::from_secs(5)),
            "{age:?}"
        );
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(state_path(&dir, addr()))
            .and_then(|f| f.set_modified(hour_ago))
            .unwrap_or_else(|e| panic!("{e}"));
        let age = vf_state_age(&dir, addr()).ok().flatten();
        assert!(
            age.is_some_and(|a| a >= std::time::Duration::from_secs(3600)),
            "{age:?}"
        );
        write_vf_mac(&dir, addr(), Some("52:54:00:AA:BB:01")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read_vf_mac(&dir, addr()).ok(),
            Some(Some("52:54:00:aa:bb:01".to_owned()))
        );
        write_vf_state(&dir, addr(), None).unwrap_or_else(|e| panic!("{e}"));
        write_vf_state(&dir, addr(), None).unwrap_or_else(|e| panic!("{e}"));
        write_vf_mac(&dir, addr(), None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_vf_state(&dir, addr()).ok(), Some(None));
        assert_eq!(vf_state_age(&dir, addr()).ok(), Some(None));
        assert_eq!(read_vf_mac(&dir, addr()).ok(), Some(None));
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn handed_out_marks_are_listed_timed_and_cleared() {
        let dir = std::env::temp_dir().join(format!("vf-handed-out-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(
            handed_out_vfs(&dir).ok(),
            Some(Vec::new()),
            "no directory: no marks"
        );
        let before = std::time::SystemTime::now() - std::time::Duration::from_secs(1);
        mark_handed_out(&dir, addr()).unwrap_or_else(|e| panic!("{e}"));
        write_vf_mac(&dir, addr(), Some("52:54:00:aa:bb:01")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            handed_out_vfs(&dir).ok(),
            Some(vec![addr()]),
            "MAC files are not marks"
        );
        let at = handed_out_at(&dir, addr()).ok().flatten();
        assert!(at.is_some_and(|at| at >= before), "{at:?}");
        // A garbled mark still reads as handed out.
        fs::write(handed_out_path(&dir, addr()), "garbage").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(handed_out_at(&dir, addr()), Ok(Some(_))));
        clear_handed_out(&dir, addr()).unwrap_or_else(|e| panic!("{e}"));
        clear_handed_out(&dir, addr()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(handed_out_at(&dir, addr()).ok(), Some(None));
        assert_eq!(handed_out_vfs(&dir).ok(), Some(Vec::new()));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_released_mark_says_so_and_nothing_else_reads_as_released() {
        let dir = std::env::temp_dir().join(format!("vf-released-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        mark_handed_out(&dir, addr()).unwrap_or_else(|e| panic!("{e}"));
        let mark = handed_out(&dir, addr()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mark.map(|m| m.released), Some(false), "an Allocate's mark");
        mark_released(&dir, addr()).unwrap_or_else(|e| panic!("{e}"));
        let mark = handed_out(&dir, addr()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mark.map(|m| m.released), Some(true), "an unprepare's mark");
        assert_eq!(
            handed_out_vfs(&dir).ok(),
            Some(vec![addr()]),
            "a released mark is a mark"
        );
        for text in [
            "released",
            "12 released extra",
            "x released",
            "12 Released",
            "12 releasedx",
        ] {
            fs::write(handed_out_path(&dir, addr()), text).unwrap_or_else(|e| panic!("{e}"));
            let mark = handed_out(&dir, addr()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(mark.map(|m| m.released), Some(false), "{text:?}");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
