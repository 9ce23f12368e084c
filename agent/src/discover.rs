//! `vfplane-agent discover`: the host model, as JSON or as a table for people.

use std::fmt::Write as _;

use vfplane_host::{HostModel, PhysicalFunction};

/// Renders the model for a terminal: one block per PF, one line per VF.
pub fn render_text(model: &HostModel) -> String {
    let mut out = String::new();
    let iommu = if model.iommu.enabled {
        format!("IOMMU on ({} groups)", model.iommu.groups)
    } else {
        "IOMMU off: no VF is isolated".to_owned()
    };
    let _ = writeln!(
        out,
        "sysfs {}: {} SR-IOV PF(s), {iommu}",
        model.sysfs_root,
        model.pfs.len()
    );
    for pf in &model.pfs {
        render_pf(&mut out, pf);
    }
    for problem in &model.problems {
        let _ = writeln!(out, "problem: {}", problem.message);
    }
    out
}

fn render_pf(out: &mut String, pf: &PhysicalFunction) {
    let netdevs: Vec<String> = pf
        .netdevs
        .iter()
        .map(|n| {
            let carrier = match n.carrier {
                Some(true) => "carrier",
                Some(false) => "no carrier",
                None => "carrier unknown",
            };
            format!("{} {} {carrier}", n.name, n.operstate)
        })
        .collect();
    let _ = writeln!(
        out,
        "PF {} {}:{} driver={} numa={} vfs={}/{} netdev=[{}]",
        pf.pci.address,
        pf.pci.vendor,
        pf.pci.device,
        pf.pci.driver.as_deref().unwrap_or("-"),
        pf.pci.numa_node.map_or("-".to_owned(), |n| n.to_string()),
        pf.num_vfs,
        pf.total_vfs,
        netdevs.join(", "),
    );
    for vf in &pf.vfs {
        let group = vf.iommu.as_ref().map_or("-".to_owned(), |g| {
            let isolation = if vf.isolated { "isolated" } else { "SHARED" };
            format!("{} ({isolation}, {} member(s))", g.id, g.members.len())
        });
        let _ = writeln!(
            out,
            "  VF {:>2} {} driver={} group={group} vfio={}",
            vf.index,
            vf.pci.address,
            vf.pci.driver.as_deref().unwrap_or("-"),
            vf.vfio_node.map_or_else(|| "-".to_owned(), |node| node.path()),
        );
    }
}

#[cfg(test)]
mod tests {
    use vfplane_host::fake::{FakeDevice, FakeSysfs};

    use super::*;

    #[test]
    fn text_names_every_vf_and_marks_shared_groups() {
        let fake = FakeSysfs::new().unwrap();
        let pf = "0000:00:02.0".parse().unwrap();
        fake.add_pf(&FakeDevice::igb_pf(pf), 7, "eth0").unwrap();
        fake.add_vfs(pf, 2, Some(4), -1).unwrap();
        // A second function in VF 1's group makes that group shared.
        let mut other = FakeDevice::igb_pf("0000:00:03.0".parse().unwrap());
        other.iommu_group = Some(5);
        fake.add_device(&other).unwrap();
        let text = render_text(&fake.host().discover().unwrap());
        assert!(text.contains("1 SR-IOV PF(s), IOMMU on"), "{text}");
        assert!(
            text.contains("PF 0000:00:02.0 8086:10c9 driver=igb numa=- vfs=2/7 netdev=[eth0 up carrier]"),
            "{text}"
        );
        assert!(text.contains("VF  0 0000:00:12.0"), "{text}");
        assert!(
            text.contains("VF  1 0000:00:12.2 driver=- group=5 (SHARED, 2 member(s))"),
            "{text}"
        );
    }
}
