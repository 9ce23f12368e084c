//! The images a node runs, built as OCI archives without a registry or a
//! container engine (see [`crate::oci`]), and imported by the node at boot.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::oci::{self, ImageSpec};
use crate::testbed::Testbed;

/// The pod sandbox ("pause") image: busybox's sh as PID 1, sleeping until
/// it is told to stop. It holds the pod's namespaces, as the pause program
/// of the Kubernetes project does.
pub const PAUSE_IMAGE: &str = "vfplane.local/pause:testbed";
/// vfplane's one image: every node binary and the driver's tools
/// ([`crate::testbed::IMAGE_EXAMPLES`]), built without test features and
/// linked statically, and busybox for a shell.
pub const VFPLANE_IMAGE: &str = "vfplane.local/vfplane:dev";

/// An archive on disk.
#[derive(Debug, Clone)]
pub struct ImageArchive {
    /// The image's reference.
    pub reference: String,
    /// Its manifest digest.
    pub digest: String,
    /// The archive.
    pub archive: PathBuf,
    /// File name the node imports it from.
    pub file_name: String,
}

/// Adds `/bin/busybox` and a link for each of its applets.
fn add_busybox(spec: &mut ImageSpec) -> Result<()> {
    let busybox = fs::read("/bin/busybox").context("reading /bin/busybox (Debian: busybox-static)")?;
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    spec.file("bin/busybox", 0o755, busybox);
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            spec.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    spec.dir("tmp", 0o1777);
    Ok(())
}

/// The pause image.
///
/// # Errors
/// When busybox cannot be read.
pub fn pause_image() -> Result<ImageSpec> {
    let mut spec = ImageSpec {
        reference: PAUSE_IMAGE.to_owned(),
        entrypoint: vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done".to_owned(),
        ],
        env: vec!["PATH=/bin".to_owned()],
        ..ImageSpec::default()
    };
    add_busybox(&mut spec)?;
    Ok(spec)
}

/// The vfplane image from the testbed's product binaries (none of the
/// tests' own).
///
/// # Errors
/// When a binary cannot be read.
pub fn vfplane_image(testbed: &Testbed) -> Result<ImageSpec> {
    let mut spec = ImageSpec {
        reference: VFPLANE_IMAGE.to_owned(),
        env: vec!["PATH=/usr/local/bin:/bin".to_owned()],
        ..ImageSpec::default()
    };
    add_busybox(&mut spec)?;
    for binary in testbed.product_binaries() {
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
        spec.file(&format!("usr/local/bin/{name}"), 0o755, bytes);
    }
    Ok(spec)
}

/// Writes the node's images into `dir`.
///
/// # Errors
/// When an image cannot be built or written.
pub fn build_node_images(testbed: &Testbed, dir: &Path) -> Result<Vec<ImageArchive>> {
    let mut built = Vec::new();
    for (file_name, spec) in [
        ("pause.tar", pause_image()?),
        ("vfplane.tar", vfplane_image(testbed)?),
    ] {
        let archive = dir.join(file_name);
        let image = oci::write_archive(&spec, &archive)?;
        built.push(ImageArchive {
            reference: image.reference,
            digest: image.manifest_digest,
            archive,
            file_name: file_name.to_owned(),
        });
    }
    Ok(built)
}
