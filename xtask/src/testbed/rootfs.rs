//! The production-shaped node's root filesystem: Debian with systemd as
//! PID 1, D-Bus and udev, the guest kernel's own module tree, runc and
//! nftables from Debian, and the unit files of the node's services
//! (containerd, kubelet, kube-proxy) and of the testbed's script. Built
//! with `mmdebstrap` from Debian's registry (the only one this machine
//! reaches), written into an ext4 image with `mkfs.ext4 -d`, and cached
//! outside the work tree keyed by everything that goes into it, so a fresh
//! clone on the same machine reuses it and a changed input rebuilds it.
//!
//! The guest boots it as a virtio disk opened with `snapshot=on`: every
//! boot starts from the same image and writes nothing back, as the
//! initramfs node's tmpfs root does. The per-run files (vfplane's and the
//! cluster's binaries, configuration, images) arrive in the initramfs and
//! are copied onto the disk's root before systemd starts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

use super::kernel::GuestKernel;
use crate::process::run_checked;

/// The Debian release the node runs.
pub const SUITE: &str = "bookworm";

/// What the node has installed beyond Debian's `minbase`: systemd as init
/// with D-Bus (the systemd cgroup driver talks to it) and udev, the tools
/// the kubelet and the CNI plugins call, runc for containerd, nftables for
/// kube-proxy.
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "kmod",
    "iproute2",
    "procps",
    "util-linux",
    "runc",
    "nftables",
    "ca-certificates",
];

/// Files written into the image, with their modes: the services' units,
/// the modules loaded at boot, and what keeps the boot quiet.
const FILES: &[(&str, &str, u32)] = &[
    (
        "etc/systemd/system/containerd.service",
        include_str!("systemd/containerd.service"),
        0o644,
    ),
    (
        "etc/systemd/system/kubelet.service",
        include_str!("systemd/kubelet.service"),
        0o644,
    ),
    (
        "etc/systemd/system/kube-proxy.service",
        include_str!("systemd/kube-proxy.service"),
        0o644,
    ),
    (
        "etc/systemd/system/vfplane-testbed.service",
        include_str!("systemd/vfplane-testbed.service"),
        0o644,
    ),
    (
        "etc/modules-load.d/vfplane.conf",
        include_str!("systemd/modules-load.conf"),
        0o644,
    ),
    ("etc/fstab", "# The root is mounted by the initramfs.\n", 0o644),
    ("etc/hostname", "vfplane-node\n", 0o644),
];

/// Symbolic links made in the image: (link, target).
const LINKS: &[(&str, &str)] = &[
    // The testbed's script runs once the system is up.
    (
        "etc/systemd/system/multi-user.target.wants/vfplane-testbed.service",
        "/etc/systemd/system/vfplane-testbed.service",
    ),
    // ttyS0 carries the kernel's console: no login prompt on it.
    ("etc/systemd/system/serial-getty@ttyS0.service", "/dev/null"),
    ("etc/systemd/system/getty@tty1.service", "/dev/null"),
    // Nothing to fetch or clean on a node that lives for one run.
    ("etc/systemd/system/apt-daily.timer", "/dev/null"),
    ("etc/systemd/system/apt-daily-upgrade.timer", "/dev/null"),
    ("etc/systemd/system/e2scrub_all.timer", "/dev/null"),
    ("etc/systemd/system/fstrim.timer", "/dev/null"),
];

/// The image's size. It is sparse on the host, and the guest's writes go
/// to QEMU's temporary overlay, not into it.
const IMAGE_SIZE: &str = "6G";

/// Bumped when the way the image is made changes without its inputs
/// changing.
const FORMAT: u32 = 2;

/// The cached image of the node's root.
#[derive(Debug, Clone)]
pub struct NodeRootfs {
    /// The ext4 image.
    pub image: PathBuf,
}

/// The key the image is cached under: every input that shapes it.
fn cache_key(kernel_package: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(format!(
        "{FORMAT}\n{SUITE}\n{PACKAGES:?}\n{kernel_package}\n{IMAGE_SIZE}\n"
    ));
    for (path, contents, mode) in FILES {
        hash.update(format!("{path} {mode:o}\n{contents}\n"));
    }
    for (link, target) in LINKS {
        hash.update(format!("{link} -> {target}\n"));
    }
    let digest = hash.finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Makes sure the image is cached under `cache` and returns it.
///
/// # Errors
/// When mmdebstrap, apt, depmod or mkfs.ext4 fails (the error names the
/// step and holds its output), or the machine lacks them.
pub fn ensure(cache: &Path, kernel: &GuestKernel) -> Result<NodeRootfs> {
    let key = cache_key(&kernel.package);
    let dir = cache.join(format!("{SUITE}-{key}"));
    let image = dir.join("root.img");
    if image.is_file() {
        return Ok(NodeRootfs { image });
    }
    fs::create_dir_all(cache)?;
    // Images of other keys are stale: each is a few hundred MiB on disk.
    if let Ok(entries) = fs::read_dir(cache) {
        for entry in entries.flatten() {
            if entry.path() != dir && entry.file_name().to_string_lossy().starts_with(SUITE) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let work = cache.join(format!(".build-{key}"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let begun = std::time::Instant::now();
    eprintln!("testbed: building the systemd node's root filesystem (Debian {SUITE}, once)");
    let root = work.join("root");
    build_tree(&root, &work, kernel).context("building the node's root tree")?;
    let staged = work.join("root.img");
    run_checked(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "vfplane-root", "-d"])
            .arg(&root)
            .arg(&staged)
            .arg(IMAGE_SIZE),
    )
    .context("writing the root image with mkfs.ext4 -d")?;
    fs::create_dir_all(&dir)?;
    fs::rename(&staged, &image)?;
    let _ = fs::remove_dir_all(&work);
    eprintln!(
        "testbed: node root filesystem ready in {:.0} s ({})",
        begun.elapsed().as_secs_f64(),
        image.display()
    );
    Ok(NodeRootfs { image })
}

/// The tree: Debian by mmdebstrap, the kernel's modules, our files.
fn build_tree(root: &Path, work: &Path, kernel: &GuestKernel) -> Result<()> {
    let mut mmdebstrap = Command::new("mmdebstrap");
    mmdebstrap
        .args(["--quiet", "--mode=root", "--variant=minbase"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        // Documentation and translations are most of a minimal system's
        // files and nothing on a node reads them.
        .args([
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
        ])
        .arg(SUITE)
        .arg(root);
    run_checked(&mut mmdebstrap).context("mmdebstrap (testbed/install-host-deps.sh installs it)")?;

    // The kernel's own package, unpacked as dpkg would: its modules in
    // /lib/modules/<release> with their index, so modprobe, udev and
    // systemd-modules-load work as on any Debian node.
    let deb = super::kernel::download_deb(&work.join("kernel"), &kernel.package)?;
    // Unpacked beside, then moved in: the package holds a real lib/
    // directory, which unpacked over the root would replace the merged-/usr
    // root's lib -> usr/lib link.
    let unpacked = work.join("kernel-root");
    run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let modules = ["lib/modules", "usr/lib/modules"]
        .into_iter()
        .map(|dir| unpacked.join(dir).join(&kernel.release))
        .find(|dir| dir.is_dir())
        .context("the kernel package has no lib/modules/<release>")?;
    let target = root.join("usr/lib/modules");
    fs::create_dir_all(&target)?;
    run_checked(Command::new("mv").arg(&modules).arg(target.join(&kernel.release)))?;
    run_checked(Command::new("depmod").arg("-b").arg(root).arg(&kernel.release))
        .context("depmod on the node's module tree")?;

    for (path, contents, mode) in FILES {
        let file = root.join(path);
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&file, contents).with_context(|| format!("writing {}", file.display()))?;
        set_mode(&file, *mode)?;
    }
    for (link, target) in LINKS {
        let path = root.join(link);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(target, &path).with_context(|| format!("linking {}", path.display()))?;
    }
    // Each boot is a new machine: systemd makes the ID on first boot.
    fs::write(root.join("etc/machine-id"), "")?;
    // What the initramfs hands over to (a link to systemd).
    if !root.join("sbin/init").exists() {
        bail!("the root tree has no /sbin/init");
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_follows_the_inputs() {
        let a = cache_key("linux-image-6.12.95+deb12-amd64");
        let b = cache_key("linux-image-6.12.96+deb12-amd64");
        assert_eq!(a.len(), 16);
        assert_ne!(a, b, "another kernel package is another image");
        assert_eq!(a, cache_key("linux-image-6.12.95+deb12-amd64"));
    }

    #[test]
    fn every_enabled_unit_is_written() {
        for (link, target) in LINKS {
            if target.starts_with("/etc/") {
                assert!(
                    FILES.iter().any(|(path, _, _)| format!("/{path}") == *target),
                    "{link} points at {target}, which the image does not get"
                );
            }
        }
    }
}
