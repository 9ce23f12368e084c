//! The guest kernel: Debian's backports kernel package, fetched with apt
//! (the only registry this machine reaches), unpacked and cached under
//! `target/testbed/kernel`, with the modules the testbed needs decompressed
//! and put in load order.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::process::run_checked;

/// Modules the guest loads at boot, by name; their dependencies come along.
pub const BOOT_MODULES: &[&str] = &["igb", "vfio_iommu_type1", "vfio_pci"];
/// Modules shipped in the guest but loaded only on request (the kernel VF
/// driver, for netdevice VFs and the kernel-path baseline).
pub const OPTIONAL_MODULES: &[&str] = &["igbvf"];
/// Modules a Kubernetes node needs, loaded on request: containerd's
/// overlayfs snapshotter, the CNI bridge and veth pairs, nf_tables for
/// kube-proxy, and the virtio NIC the node is reached through.
pub const NODE_MODULES: &[&str] = &[
    // libcrc32c (nf_tables, nf_conntrack) asks the crypto API for "crc32c":
    // a soft dependency modules.dep does not list.
    "crc32c_generic",
    "overlay",
    "bridge",
    "veth",
    "br_netfilter",
    "nf_tables",
    "nft_ct",
    "nft_nat",
    "nft_chain_nat",
    "nft_masq",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_numgen",
    "nft_reject_inet",
    // `reject` in tables of family ip and ip6 (kube-proxy has both).
    "nft_reject_ipv4",
    "nft_reject_ipv6",
    "virtio_net",
];

/// Modules the systemd node's initramfs loads to mount its root disk (a
/// virtio disk holding ext4, whose metadata checksums ask the crypto API
/// for "crc32c").
pub const ROOT_MODULES: &[&str] = &["crc32c_generic", "virtio_blk", "ext4"];

/// A kernel ready to boot: its image and its modules in load order.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// The Debian package it came from (`linux-image-6.12.95+deb12-amd64`).
    pub package: String,
    /// Kernel release (`6.12.95+deb12-amd64`).
    pub release: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// Decompressed modules for [`BOOT_MODULES`] and their dependencies, in load order.
    pub boot_modules: Vec<PathBuf>,
    /// Decompressed optional modules (and any dependency not already loaded at boot), in load order.
    pub optional_modules: Vec<PathBuf>,
    /// Decompressed [`NODE_MODULES`] (and any dependency not loaded at boot), in load order.
    pub node_modules: Vec<PathBuf>,
    /// Decompressed [`ROOT_MODULES`] and their dependencies, in load order.
    pub root_modules: Vec<PathBuf>,
}

/// Makes sure the kernel is cached in `cache` and returns it.
///
/// # Errors
/// When apt cannot find or download the package, or the package lacks a module.
pub fn ensure(cache: &Path) -> Result<GuestKernel> {
    // The stamp records the module lists: a changed list refetches.
    let stamp = cache.join("READY");
    let wanted = format!("{BOOT_MODULES:?}\n{OPTIONAL_MODULES:?}\n{NODE_MODULES:?}\n{ROOT_MODULES:?}\n");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        fetch(cache)?;
        fs::write(&stamp, wanted)?;
    }
    load(cache)
}

fn load(cache: &Path) -> Result<GuestKernel> {
    let release = fs::read_to_string(cache.join("release"))?.trim().to_owned();
    let read_list = |name: &str| -> Result<Vec<PathBuf>> {
        Ok(fs::read_to_string(cache.join(name))?
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| cache.join("modules").join(l))
            .collect())
    };
    Ok(GuestKernel {
        vmlinuz: cache.join("vmlinuz"),
        boot_modules: read_list("boot-modules")?,
        optional_modules: read_list("optional-modules")?,
        node_modules: read_list("node-modules")?,
        root_modules: read_list("root-modules")?,
        package: fs::read_to_string(cache.join("package"))?.trim().to_owned(),
        release,
    })
}

/// The kernel package `linux-image-amd64` in bookworm-backports depends on.
fn kernel_package() -> Result<String> {
    let query = || -> Result<Option<String>> {
        let out = Command::new("apt-cache")
            .args(["depends", "-t", "bookworm-backports", "linux-image-amd64"])
            .output()
            .context("running apt-cache")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-6") || p.starts_with("linux-image-7"))
            .map(str::to_owned))
    };
    if let Some(package) = query()? {
        return Ok(package);
    }
    run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
    query()?.context(
        "apt-cache finds no linux-image-amd64 in bookworm-backports (is the backports suite configured?)",
    )
}

fn fetch(cache: &Path) -> Result<()> {
    let package = kernel_package()?;
    eprintln!("testbed: fetching guest kernel {package} with apt");
    let download = cache.join("download");
    let _ = fs::remove_dir_all(&download);
    let deb = download_deb(&download, &package)?;
    let root = download.join("root");
    run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;

    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("{} has no /boot", deb.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("the kernel package has no vmlinuz")?;
    let release = vmlinuz
        .file_name()
        .map(|n| n.to_string_lossy().trim_start_matches("vmlinuz-").to_owned())
        .context("vmlinuz name")?;
    fs::copy(&vmlinuz, cache.join("vmlinuz"))?;

    // Debian ships modules under /lib or /usr/lib, without modules.dep.
    let base = [root.clone(), root.join("usr")]
        .into_iter()
        .find(|b| b.join("lib/modules").join(&release).is_dir())
        .context("the kernel package has no lib/modules/<release>")?;
    run_checked(Command::new("depmod").arg("-b").arg(&base).arg(&release))?;
    let modules_dir = base.join("lib/modules").join(&release);
    let deps = parse_modules_dep(&fs::read_to_string(modules_dir.join("modules.dep"))?);

    let out = cache.join("modules");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let boot_order = load_order(&deps, BOOT_MODULES, &BTreeSet::new())?;
    let already: BTreeSet<String> = boot_order.iter().cloned().collect();
    let optional_order = load_order(&deps, OPTIONAL_MODULES, &already)?;
    let node_order = load_order(&deps, NODE_MODULES, &already)?;
    // The root disk's modules load before anything else, on their own.
    let root_order = load_order(&deps, ROOT_MODULES, &BTreeSet::new())?;
    for list in [&boot_order, &optional_order, &node_order, &root_order] {
        for path in list {
            decompress(&modules_dir.join(path), &out.join(module_file_name(path)))?;
        }
    }
    let names = |list: &[String]| {
        list.iter()
            .map(|p| module_file_name(p) + "\n")
            .collect::<String>()
    };
    fs::write(cache.join("boot-modules"), names(&boot_order))?;
    fs::write(cache.join("optional-modules"), names(&optional_order))?;
    fs::write(cache.join("node-modules"), names(&node_order))?;
    fs::write(cache.join("root-modules"), names(&root_order))?;
    fs::write(cache.join("package"), format!("{package}\n"))?;
    fs::write(cache.join("release"), format!("{release}\n"))?;
    fs::remove_dir_all(&download)?;
    Ok(())
}

/// Downloads the kernel package `package` from bookworm-backports with
/// apt into `dir` (made if missing) and returns the `.deb`.
///
/// # Errors
/// apt failing, or leaving no `.deb`.
pub(super) fn download_deb(dir: &Path, package: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    run_checked(
        Command::new("apt-get")
            .args(["download", "-qq", "-t", "bookworm-backports", package])
            .current_dir(dir),
    )
    .with_context(|| format!("apt-get download {package}"))?;
    fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")
}

/// `kernel/drivers/net/igb/igb.ko.xz` -> `igb.ko`.
fn module_file_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    format!("{stem}.ko")
}

/// Module name as the kernel compares them: `vfio-pci` and `vfio_pci` are one.
fn module_name(path: &str) -> String {
    module_file_name(path).trim_end_matches(".ko").replace('-', "_")
}

/// modules.dep: `path: dep-path dep-path ...`, keyed by module path.
fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(module, deps)| {
            (
                module.trim().to_owned(),
                deps.split_whitespace().map(str::to_owned).collect(),
            )
        })
        .collect()
}

/// The module paths to insmod, dependencies first, for `wanted`, leaving out
/// anything in `loaded`.
fn load_order(
    deps: &BTreeMap<String, Vec<String>>,
    wanted: &[&str],
    loaded: &BTreeSet<String>,
) -> Result<Vec<String>> {
    let by_name: BTreeMap<String, &String> = deps.keys().map(|path| (module_name(path), path)).collect();
    let mut order = Vec::new();
    let mut seen = loaded.clone();
    fn visit(
        path: &str,
        deps: &BTreeMap<String, Vec<String>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(path.to_owned()) {
            return;
        }
        for dep in deps.get(path).map(Vec::as_slice).unwrap_or_default() {
            visit(dep, deps, seen, order);
        }
        order.push(path.to_owned());
    }
    for name in wanted {
        let Some(path) = by_name.get(&name.replace('-', "_")) else {
            bail!("the guest kernel has no module {name} (it may be built in; check the kernel config)");
        };
        visit(path, deps, &mut seen, &mut order);
    }
    Ok(order)
}

fn decompress(source: &Path, dest: &Path) -> Result<()> {
    let name = source.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        fs::copy(source, dest)?;
        return Ok(());
    };
    let out = Command::new(tool)
        .args(["-d", "-c"])
        .arg(source)
        .output()
        .with_context(|| format!("running {tool} on {}", source.display()))?;
    if !out.status.success() {
        bail!(
            "{tool} -d {} failed: {}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fs::write(dest, out.stdout)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/net/ethernet/intel/igb/igb.ko.xz: kernel/drivers/dca/dca.ko.xz kernel/drivers/i2c/algos/i2c-algo-bit.ko.xz
kernel/drivers/dca/dca.ko.xz:
kernel/drivers/i2c/algos/i2c-algo-bit.ko.xz:
kernel/drivers/vfio/pci/vfio-pci.ko.xz: kernel/drivers/vfio/pci/vfio-pci-core.ko.xz kernel/drivers/vfio/vfio.ko.xz kernel/virt/lib/irqbypass.ko.xz
kernel/drivers/vfio/pci/vfio-pci-core.ko.xz: kernel/drivers/vfio/vfio.ko.xz kernel/virt/lib/irqbypass.ko.xz
kernel/drivers/vfio/vfio.ko.xz: kernel/virt/lib/irqbypass.ko.xz
kernel/drivers/vfio/vfio_iommu_type1.ko.xz: kernel/drivers/vfio/vfio.ko.xz
kernel/virt/lib/irqbypass.ko.xz:
";

    #[test]
    fn dependencies_load_first_and_once() {
        let deps = parse_modules_dep(DEP);
        let order = load_order(&deps, &["igb", "vfio_iommu_type1", "vfio-pci"], &BTreeSet::new()).unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "dca",
                "i2c_algo_bit",
                "igb",
                "irqbypass",
                "vfio",
                "vfio_iommu_type1",
                "vfio_pci_core",
                "vfio_pci"
            ]
        );
    }

    #[test]
    fn missing_module_is_named() {
        let deps = parse_modules_dep(DEP);
        let err = load_order(&deps, &["igbvf"], &BTreeSet::new()).unwrap_err();
        assert!(err.to_string().contains("igbvf"));
    }

    #[test]
    fn module_file_names_drop_compression() {
        assert_eq!(module_file_name("kernel/a/vfio-pci.ko.xz"), "vfio-pci.ko");
        assert_eq!(module_file_name("kernel/a/igb.ko"), "igb.ko");
    }
}
