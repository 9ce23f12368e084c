//! The instruction-counting plugin on the host side: building it and
//! reading what it wrote (see the `vfplane-guest-insns` crate).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

/// The plugin's output in a guest's run directory.
pub const SPANS_FILE: &str = "instruction-spans.jsonl";

/// One span a guest program marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Span {
    /// Instructions every vCPU executed from the span's start to its end
    /// (or its last point), kernel and user.
    pub span_instructions: u64,
    /// Instructions of the bursts kept in the span, each counted on its
    /// own vCPU.
    pub burst_instructions: u64,
    /// Bursts kept.
    pub bursts: u64,
    /// Instructions of the bursts dropped in the span (empty polls).
    pub dropped_instructions: u64,
}

/// Builds the plugin (a host shared object, release) and returns its path.
///
/// # Errors
/// When cargo fails or names no shared object.
pub fn build_plugin(workspace: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .current_dir(workspace)
        // A shared object only here: the guest's static programs take the
        // crate as an rlib, where a cdylib type would only be dropped.
        .args([
            "rustc",
            "--release",
            "-p",
            "vfplane-guest-insns",
            "--features",
            "plugin",
            "--lib",
            "--crate-type",
            "cdylib",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build of the instruction-counting plugin")?;
    if !out.status.success() {
        bail!("cargo build of the instruction-counting plugin failed");
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let files = message["filenames"].as_array().cloned().unwrap_or_default();
        if let Some(so) = files
            .iter()
            .filter_map(|f| f.as_str())
            .find(|f| f.ends_with("libvfplane_guest_insns.so"))
        {
            return Ok(PathBuf::from(so));
        }
    }
    bail!("cargo built no libvfplane_guest_insns.so")
}

/// Reads the spans in `path` ("no file" is no spans yet).
///
/// # Errors
/// A line that is not a span (the plugin reports a span that ended
/// without beginning as `{"error": ..}`).
pub fn read_spans(path: &Path) -> Result<Vec<Span>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .map(|line| {
            serde_json::from_str::<Span>(line)
                .with_context(|| format!("{}: not a span: {line}", path.display()))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_read_and_an_error_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPANS_FILE);
        assert_eq!(read_spans(&path).unwrap(), []);
        fs::write(
            &path,
            "{\"span_instructions\":10,\"burst_instructions\":4,\"bursts\":2,\"dropped_instructions\":3}\n",
        )
        .unwrap();
        assert_eq!(
            read_spans(&path).unwrap(),
            [Span {
                span_instructions: 10,
                burst_instructions: 4,
                bursts: 2,
                dropped_instructions: 3,
            }]
        );
        fs::write(&path, "{\"error\":\"a span ended that never began\"}\n").unwrap();
        let error = format!("{:#}", read_spans(&path).unwrap_err());
        assert!(error.contains("never began"), "{error}");
    }
}
