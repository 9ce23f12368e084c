//! The kubelet contract, end to end over unix sockets: a kubelet stand-in
//! speaking the real v1beta1 API against the plugin on a fake sysfs tree.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use common::*;
use tonic::Code;
use vfplane_device_plugin::kubelet_standin::connect_plugin;
use vfplane_proto::container_env::VfInfo;
use vfplane_proto::deviceplugin::v1beta1 as dp;
use vfplane_proto::vf_state::{VfState, clear_handed_out, handed_out_at, write_vf_mac, write_vf_state};
use vfplane_proto::{HEALTHY, UNHEALTHY};

const ONE_POOL: &str = "pools:\n  - name: fast\n    selector:\n      vendor: \"8086\"\n      device: \"10ca\"\n      drivers: [vfio-pci]\n";

fn allocate_request(containers: &[&[String]]) -> dp::AllocateRequest {
    dp::AllocateRequest {
        container_requests: containers
            .iter()
            .map(|ids| dp::ContainerAllocateRequest {
                devices_ids: ids.to_vec(),
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_after_serving_then_lists_healthy_vfs_with_numa() {
    let node = Node::new(&[(0, 3), (1, 2)]);
    node.write_config(ONE_POOL);
    let mut kubelet = node.standin().await;
    let plugin = node.start_plugin().await;

    let registration = kubelet.next_registration(WAIT).await.expect("a registration");
    let request = &registration.request;
    assert_eq!(request.version, "v1beta1");
    assert_eq!(request.endpoint, "vfplane-fast.sock");
    assert_eq!(request.resource_name, "vfplane.io/fast");
    let options = request.options.expect("options");
    assert!(options.get_preferred_allocation_available);
    assert!(!options.pre_start_required);
    // Served before registering: the endpoint answers.
    let mut client = client(registration.socket(kubelet.dir())).await;
    let options = client
        .get_device_plugin_options(dp::Empty {})
        .await
        .unwrap()
        .into_inner();
    assert!(options.get_preferred_allocation_available);

    let mut stream = list_and_watch(&mut client).await;
    let first = stream.message().await.unwrap().expect("a first list");
    assert_eq!(first.devices.len(), 5);
    for device in &first.devices {
        assert_eq!(device.health, HEALTHY, "{device:?}");
    }
    let ids: Vec<&str> = first.devices.iter().map(|d| d.id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted, "sorted by PCI address");
    for (pf, numa) in [(0usize, 0i64), (1, 1)] {
        for vf in &node.pfs[pf].vfs {
            let device = first.devices.iter().find(|d| d.id == vf.to_string()).unwrap();
            let nodes = &device.topology.as_ref().expect("topology").nodes;
            assert_eq!(nodes.iter().map(|n| n.id).collect::<Vec<_>>(), [numa]);
        }
    }
    assert!(kubelet.take_registrations().is_empty(), "registered once");
    plugin.shutdown().await.unwrap();
    assert!(!node.socket("fast").exists(), "socket removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_driver_vfio_node_group_link_scrub_and_presence() {
    let node = Node::new(&[(-1, 3)]);
    node.write_config(ONE_POOL);
    let _kubelet = node.standin().await;
    let plugin = node.start_plugin().await;
    let mut client = client(node.socket("fast")).await;
    let mut stream = list_and_watch(&mut client).await;
    let vf = node.pfs[0].vfs[1];
    let other = node.pfs[0].vfs[0];
    let group = node.pfs[0].groups[1];
    let first = wait_for(&mut stream, "all healthy", |m| m.devices.len() == 3).await;
    assert!(first.devices.iter().all(|d| d.health == HEALTHY));
    assert!(
        first.devices.iter().all(|d| d.topology.is_none()),
        "NUMA node -1: no topology"
    );

    // Driver unbound (override kept, as after `echo > .../vfio-pci/unbind`).
    node.fake.set_driver(vf, None).unwrap();
    let m = wait_for(&mut stream, "unbound VF unhealthy", |m| is(m, vf, UNHEALTHY)).await;
    assert!(is(&m, other, HEALTHY), "only that VF: {m:?}");
    node.fake.set_driver(vf, Some("vfio-pci")).unwrap();
    wait_for(&mut stream, "rebound VF healthy", |m| is(m, vf, HEALTHY)).await;

    // Bound to another driver.
    node.fake.set_driver(vf, Some("igbvf")).unwrap();
    wait_for(&mut stream, "igbvf VF unhealthy", |m| is(m, vf, UNHEALTHY)).await;
    node.fake.set_driver(vf, Some("vfio-pci")).unwrap();
    wait_for(&mut stream, "healthy again", |m| is(m, vf, HEALTHY)).await;

    // /dev/vfio/<group> removed.
    fs::remove_file(node.vfio_node(group)).unwrap();
    wait_for(&mut stream, "no VFIO node: unhealthy", |m| is(m, vf, UNHEALTHY)).await;
    node.fake.add_vfio_node(group).unwrap();
    wait_for(&mut stream, "node back: healthy", |m| is(m, vf, HEALTHY)).await;

    // Group no longer isolated: another device (a bridge, say) is in it.
    let bridge = addr("0000:00:1c.0");
    let mut device = vfplane_host::fake::FakeDevice::igb_pf(bridge);
    device.iommu_group = Some(group);
    device.driver = Some("pcieport".into());
    node.fake.add_device(&device).unwrap();
    let m = wait_for(&mut stream, "shared group: unhealthy", |m| is(m, vf, UNHEALTHY)).await;
    assert!(is(&m, other, HEALTHY));
    // The bridge is hot-unplugged: gone from the group and the bus.
    let sysfs = node.fake.sysfs_root();
    fs::remove_file(sysfs.join(format!("kernel/iommu_groups/{group}/devices/{bridge}"))).unwrap();
    fs::remove_file(sysfs.join(format!("bus/pci/devices/{bridge}"))).unwrap();
    node.fake.remove_device_dir(bridge).unwrap();
    wait_for(&mut stream, "alone again: healthy", |m| is(m, vf, HEALTHY)).await;

    // PF link down: every VF of the PF.
    node.set_link(0, false);
    wait_for(&mut stream, "link down: all unhealthy", |m| {
        m.devices.iter().all(|d| d.health == UNHEALTHY)
    })
    .await;
    node.set_link(0, true);
    wait_for(&mut stream, "link up: all healthy", |m| {
        m.devices.iter().all(|d| d.health == HEALTHY)
    })
    .await;

    // A scrub running stays Healthy: the scheduler counted the VF free
    // when its pod left, and the kubelet's admission would refuse a pod
    // placed on it while it were Unhealthy (Allocate waits for the scrub
    // instead). The other VF's unbind, after the state, makes a probe that
    // has seen the state too.
    write_vf_state(&node.state_dir(), vf, Some(VfState::ScrubPending)).unwrap();
    node.fake.set_driver(other, None).unwrap();
    let m = wait_for(&mut stream, "other VF unbound", |m| is(m, other, UNHEALTHY)).await;
    assert!(
        is(&m, vf, HEALTHY),
        "a VF under scrub is Healthy to the kubelet: {m:?}"
    );
    node.fake.set_driver(other, Some("vfio-pci")).unwrap();
    wait_for(&mut stream, "other VF rebound", |m| is(m, other, HEALTHY)).await;
    // The same state, written longer ago than any scrub takes: nobody is
    // finishing it (an agent gone or stuck), and the VF leaves the pool.
    let long_ago = std::time::SystemTime::now() - vfplane_proto::vf_state::SCRUB_STALLED * 2;
    fs::File::options()
        .write(true)
        .open(node.state_dir().join(vf.to_string()))
        .and_then(|f| f.set_modified(long_ago))
        .unwrap();
    wait_for(&mut stream, "stalled scrub: unhealthy", |m| is(m, vf, UNHEALTHY)).await;
    write_vf_state(&node.state_dir(), vf, None).unwrap();
    wait_for(&mut stream, "stalled scrub cleared: healthy", |m| {
        is(m, vf, HEALTHY)
    })
    .await;
    // A failed scrub quarantines it.
    write_vf_state(&node.state_dir(), vf, Some(VfState::ScrubFailed)).unwrap();
    wait_for(&mut stream, "scrub failed: unhealthy", |m| is(m, vf, UNHEALTHY)).await;
    write_vf_state(&node.state_dir(), vf, None).unwrap();
    wait_for(&mut stream, "cleared: healthy", |m| is(m, vf, HEALTHY)).await;
    // A word this plugin does not know is Unhealthy too.
    fs::write(node.state_dir().join(vf.to_string()), "something-new\n").unwrap();
    wait_for(&mut stream, "unknown word: unhealthy", |m| is(m, vf, UNHEALTHY)).await;
    write_vf_state(&node.state_dir(), vf, None).unwrap();
    wait_for(&mut stream, "cleared again: healthy", |m| is(m, vf, HEALTHY)).await;

    // The VF goes away (sriov_numvfs lowered): still listed, Unhealthy.
    let saved = node.fake.device_dir(vf);
    let backup = node.dir.path().join("saved-vf");
    copy_dir(&saved, &backup);
    node.fake.remove_device_dir(vf).unwrap();
    let gone = wait_for(&mut stream, "gone VF unhealthy", |m| is(m, vf, UNHEALTHY)).await;
    assert_eq!(gone.devices.len(), 3, "a gone VF stays listed");
    copy_dir(&backup, &saved);
    wait_for(&mut stream, "VF back: healthy", |m| is(m, vf, HEALTHY)).await;

    let text = metrics_text(&plugin).await;
    assert_eq!(
        metric(
            &text,
            "vfplane_device_plugin_devices{pool=\"fast\",health=\"healthy\"}"
        ),
        Some(3.0),
        "{text}"
    );
    // The stand-in's stream (it connects when the plugin registers, as the
    // kubelet does) and this test's.
    assert_eq!(
        metric(
            &text,
            "vfplane_device_plugin_list_and_watch_streams{pool=\"fast\"}"
        ),
        Some(2.0)
    );
    plugin.shutdown().await.unwrap();
}

/// Copies a directory tree, symlinks as symlinks.
#[allow(clippy::unwrap_used)] // a test helper: a panic is the failure report
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path()).unwrap(), target).unwrap();
        } else if kind.is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_hands_out_vfio_nodes_env_and_cdi() {
    let node = Node::new(&[(0, 2), (1, 2)]);
    node.write_config(ONE_POOL);
    let plugin = node.start_plugin().await;
    let mac_vf = node.pfs[0].vfs[0];
    write_vf_mac(&node.state_dir(), mac_vf, Some("52:54:00:AA:BB:01")).unwrap();
    let mut client = client(node.socket("fast")).await;
    let a = node.pfs[0].vfs[0].to_string();
    let b = node.pfs[1].vfs[1].to_string();
    let c = node.pfs[0].vfs[1].to_string();
    let response = client
        .allocate(allocate_request(&[
            &[a.clone(), b.clone()],
            std::slice::from_ref(&c),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.container_responses.len(), 2);

    let first = &response.container_responses[0];
    let paths: Vec<(&str, &str, &str)> = first
        .devices
        .iter()
        .map(|d| {
            (
                d.container_path.as_str(),
                d.host_path.as_str(),
                d.permissions.as_str(),
            )
        })
        .collect();
    let group_a = node.pfs[0].groups[0];
    let group_b = node.pfs[1].groups[1];
    assert_eq!(
        paths,
        [
            ("/dev/vfio/vfio", "/dev/vfio/vfio", "rw"),
            (
                format!("/dev/vfio/{group_a}").as_str(),
                format!("/dev/vfio/{group_a}").as_str(),
                "rw"
            ),
            (
                format!("/dev/vfio/{group_b}").as_str(),
                format!("/dev/vfio/{group_b}").as_str(),
                "rw"
            ),
        ]
    );
    for spec in &first.devices[1..] {
        // The host path is the node's /dev: under the dev root here.
        let under_root = node
            .fake
            .dev_root()
            .join(spec.host_path.trim_start_matches("/dev/"));
        assert!(under_root.exists(), "{}", under_root.display());
    }
    assert_eq!(first.envs["PCIDEVICE_VFPLANE_IO_FAST"], format!("{a},{b}"));
    let info: std::collections::BTreeMap<String, VfInfo> =
        serde_json::from_str(&first.envs["PCIDEVICE_VFPLANE_IO_FAST_INFO"]).unwrap();
    assert_eq!(info.len(), 2);
    let info_a = &info[&a];
    assert_eq!(info_a.group, group_a);
    assert_eq!(info_a.vfio_device, format!("/dev/vfio/{group_a}"));
    assert_eq!(info_a.numa_node, Some(0));
    assert_eq!(info_a.pf, Some(node.pfs[0].address));
    assert_eq!(info_a.vf_index, Some(0));
    assert_eq!(info_a.mac.as_deref(), Some("52:54:00:aa:bb:01"));
    assert_eq!(info[&b].numa_node, Some(1));
    assert_eq!(info[&b].vf_index, Some(1));
    assert_eq!(info[&b].mac, None);
    let cdi: Vec<&str> = first.cdi_devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(cdi, [format!("vfplane.io/vf={a}"), format!("vfplane.io/vf={b}")]);
    assert!(first.mounts.is_empty());

    let second = &response.container_responses[1];
    assert_eq!(second.devices.len(), 2, "vfio + one group, no duplicates");
    assert_eq!(second.envs["PCIDEVICE_VFPLANE_IO_FAST"], c);

    // The CDI spec names every VF with its group node.
    let spec: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(node.cdi_dir().join("vfplane.io-vf.json")).unwrap())
            .unwrap();
    assert_eq!(spec["kind"], "vfplane.io/vf");
    let names: BTreeSet<String> = spec["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(names.contains(&a) && names.contains(&b) && names.contains(&c));

    let text = metrics_text(&plugin).await;
    assert_eq!(
        metric(&text, "vfplane_device_plugin_allocations_total{pool=\"fast\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "vfplane_device_plugin_allocated_devices_total{pool=\"fast\"}"
        ),
        Some(3.0)
    );
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_refuses_malformed_unknown_unhealthy_and_foreign_ids_naming_them() {
    let node = Node::new(&[(0, 3)]);
    let vfs = node.pfs[0].vfs.clone();
    node.write_config(&format!(
        "pools:\n  - name: fast\n    devices: [\"{}\", \"{}\"]\n  - name: slow\n    devices: [\"{}\"]\n",
        vfs[0], vfs[1], vfs[2]
    ));
    let plugin = node.start_plugin().await;
    let mut client = client(node.socket("fast")).await;
    let good = vfs[0].to_string();
    let cases: Vec<(dp::AllocateRequest, Code, String)> = vec![
        (
            dp::AllocateRequest {
                container_requests: vec![],
            },
            Code::InvalidArgument,
            "no container requests".into(),
        ),
        (
            allocate_request(&[&[]]),
            Code::InvalidArgument,
            "names no device".into(),
        ),
        (
            allocate_request(&[&[String::new()]]),
            Code::InvalidArgument,
            "empty device ID".into(),
        ),
        (
            allocate_request(&[&[good.clone(), good.clone()]]),
            Code::InvalidArgument,
            format!("{good} is requested more than once"),
        ),
        (
            allocate_request(&[std::slice::from_ref(&good), std::slice::from_ref(&good)]),
            Code::InvalidArgument,
            format!("{good} is requested more than once"),
        ),
        (
            allocate_request(&[&["0000:00:1f.7".into()]]),
            Code::InvalidArgument,
            "unknown device ID 0000:00:1f.7".into(),
        ),
        (
            allocate_request(&[&["not-a-vf".into()]]),
            Code::InvalidArgument,
            "\"not-a-vf\"".into(),
        ),
        (
            allocate_request(&[&[vfs[2].to_string()]]),
            Code::InvalidArgument,
            format!("{} belongs to vfplane.io/slow", vfs[2]),
        ),
    ];
    for (request, code, words) in cases {
        let status = client.allocate(request.clone()).await.expect_err(&words);
        assert_eq!(status.code(), code, "{words}: {status}");
        assert!(
            status.message().contains(&words),
            "{words:?} not in {:?}",
            status.message()
        );
    }
    // Unhealthy at the moment of Allocate: refused even before the next scan.
    node.fake.set_driver(vfs[1], None).unwrap();
    let status = client
        .allocate(allocate_request(&[&[vfs[1].to_string()]]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains(&vfs[1].to_string()), "{status}");
    assert!(status.message().contains("not bound to vfio-pci"), "{status}");
    // Nothing of that changed what works.
    client.allocate(allocate_request(&[&[good]])).await.unwrap();
    let text = metrics_text(&plugin).await;
    assert_eq!(
        metric(
            &text,
            "vfplane_device_plugin_allocation_errors_total{pool=\"fast\"}"
        ),
        Some(9.0),
        "{text}"
    );
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_allocation_keeps_numa_spreads_pfs_and_honours_must_include() {
    // PFs 1 and 2 on NUMA 0 (3 VFs each), PF 3 on NUMA 1 (4 VFs).
    let node = Node::new(&[(0, 3), (0, 3), (1, 4)]);
    node.write_config("pools:\n  - name: fast\n    selector: {}\n");
    let plugin = node.start_plugin().await;
    let mut client = client(node.socket("fast")).await;
    let all: Vec<String> = node
        .pfs
        .iter()
        .flat_map(|p| p.vfs.iter().map(ToString::to_string))
        .collect();
    let ask = |must: Vec<String>, size: i32| dp::PreferredAllocationRequest {
        container_requests: vec![dp::ContainerPreferredAllocationRequest {
            available_device_i_ds: all.clone(),
            must_include_device_i_ds: must,
            allocation_size: size,
        }],
    };
    let numa_of = |id: &str| -> u32 {
        node.pfs
            .iter()
            .position(|p| p.vfs.iter().any(|v| v.to_string() == id))
            .map(|i| if i < 2 { 0 } else { 1 })
            .unwrap()
    };
    let pf_of = |id: &str| id[..7].to_owned();

    let got = client
        .get_preferred_allocation(ask(vec![], 4))
        .await
        .unwrap()
        .into_inner();
    let ids = &got.container_responses[0].device_i_ds;
    assert_eq!(ids.len(), 4);
    assert_eq!(
        ids.iter().map(|i| numa_of(i)).collect::<BTreeSet<_>>().len(),
        1,
        "{ids:?}"
    );
    let pfs: Vec<String> = ids.iter().map(|i| pf_of(i)).collect();
    assert_eq!(
        pfs.iter().collect::<BTreeSet<_>>().len(),
        2,
        "spread over both PFs: {ids:?}"
    );

    let must = node.pfs[2].vfs[3].to_string();
    let got = client
        .get_preferred_allocation(ask(vec![must.clone()], 3))
        .await
        .unwrap()
        .into_inner();
    let ids = &got.container_responses[0].device_i_ds;
    assert_eq!(ids[0], must);
    assert_eq!(ids.len(), 3);
    assert!(ids.iter().all(|i| numa_of(i) == 1), "{ids:?}");

    // The policy changes to pack, live: one PF for 3 VFs, on the
    // best-fitting node (NUMA 1, 4 VFs).
    node.write_config("pools:\n  - name: fast\n    selector: {}\n    preferredAllocation: pack\n");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = client
            .get_preferred_allocation(ask(vec![], 3))
            .await
            .unwrap()
            .into_inner();
        let ids = got.container_responses[0].device_i_ds.clone();
        if ids.iter().map(|i| pf_of(i)).collect::<BTreeSet<_>>().len() == 1 {
            assert!(ids.iter().all(|i| numa_of(i) == 1), "{ids:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pack never applied: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_restart_wiping_the_directory_brings_socket_and_registration_back() {
    let node = Node::new(&[(0, 2)]);
    node.write_config(ONE_POOL);
    let mut kubelet = node.standin().await;
    let plugin = node.start_plugin().await;
    kubelet.next_registration(WAIT).await.expect("first registration");
    for round in 0..3 {
        let created = kubelet.restart().await.unwrap();
        // One registration per kubelet: the socket served again and
        // kubelet.sock created make one, after the new kubelet.sock.
        let registration = kubelet
            .next_registration(WAIT)
            .await
            .unwrap_or_else(|| panic!("registration after restart {round}"));
        assert!(
            registration.at >= created,
            "round {round}: a registration before the restart"
        );
        assert_eq!(registration.request.resource_name, "vfplane.io/fast");
        // The socket is served again and answers.
        let mut client = connect_plugin(registration.socket(kubelet.dir())).await.unwrap();
        let mut stream = list_and_watch(&mut client).await;
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.devices.len(), 2);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(kubelet.take_registrations().is_empty(), "a second registration");
    let refusals = kubelet.take_refusals();
    assert!(refusals.is_empty(), "registered while connected: {refusals:?}");
    // The plugin counts a registration when the kubelet's answer is back,
    // a moment after the stand-in saw it.
    let registrations = wait_metric(
        &plugin,
        "vfplane_device_plugin_registrations_total{pool=\"fast\"}",
        |v| v >= 4.0,
    )
    .await;
    assert_eq!(registrations, 4.0);
    let text = metrics_text(&plugin).await;
    assert_eq!(
        metric(
            &text,
            "vfplane_device_plugin_registration_errors_total{pool=\"fast\"}"
        ),
        Some(0.0),
        "{text}"
    );
    plugin.shutdown().await.unwrap();
}

/// The kubelet (1.37) refuses a second registration of an endpoint it is
/// connected to, and the refusal wedges it (seen on the real node after a
/// kubelet restart: two kicks, two registrations, every later one refused).
/// A kick that finds the same kubelet.sock and the same socket of ours
/// registers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_for_the_same_kubelet_and_socket_registers_once() {
    let node = Node::new(&[(0, 2)]);
    node.write_config(ONE_POOL);
    let mut kubelet = node.standin().await;
    let plugin = node.start_plugin().await;
    kubelet.next_registration(WAIT).await.expect("first registration");
    // kubelet.sock moved away and back: "created" again, the same socket.
    let away = kubelet.dir().join("kubelet.sock.away");
    for _ in 0..3 {
        std::fs::rename(kubelet.socket_path(), &away).unwrap();
        std::fs::rename(&away, kubelet.socket_path()).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(kubelet.take_registrations().is_empty(), "registered again");
    let refusals = kubelet.take_refusals();
    assert!(refusals.is_empty(), "registered while connected: {refusals:?}");
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_without_a_kubelet_and_registers_when_it_appears() {
    let node = Node::new(&[(0, 1)]);
    node.write_config(ONE_POOL);
    let plugin = node.start_plugin().await;
    assert!(node.socket("fast").exists(), "served without a kubelet");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = metrics_text(&plugin).await;
    assert_eq!(
        metric(
            &text,
            "vfplane_device_plugin_registration_errors_total{pool=\"fast\"}"
        ),
        Some(0.0),
        "no attempts while there is no kubelet.sock: {text}"
    );
    let mut kubelet = node.standin().await;
    let registration = kubelet.next_registration(WAIT).await.expect("registration");
    assert_eq!(registration.request.endpoint, "vfplane-fast.sock");
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_restarted_while_the_kubelet_stays_registers_again() {
    let node = Node::new(&[(0, 2)]);
    node.write_config(ONE_POOL);
    let mut kubelet = node.standin().await;
    let plugin = node.start_plugin().await;
    kubelet.next_registration(WAIT).await.expect("first");
    let mut client = client(node.socket("fast")).await;
    let mut stream = list_and_watch(&mut client).await;
    stream.message().await.unwrap().unwrap();
    plugin.shutdown().await.unwrap();
    assert!(!node.socket("fast").exists());
    // The kubelet sees its stream end, as it would.
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("stream ends");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");

    let plugin = node.start_plugin().await;
    let registration = kubelet
        .next_registration(WAIT)
        .await
        .expect("second registration");
    let mut client = common::client(registration.socket(kubelet.dir())).await;
    let mut stream = list_and_watch(&mut client).await;
    assert_eq!(stream.message().await.unwrap().unwrap().devices.len(), 2);
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_moved_to_dra_stops_being_a_device_plugin_resource_and_comes_back_when_moved_back() {
    let node = Node::new(&[(0, 2)]);
    let pf0 = node.pfs[0].address;
    let plugin_pool = format!("pools:\n  - name: fast\n    selector: {{pfAddresses: [\"{pf0}\"]}}\n");
    node.write_config(&plugin_pool);
    let mut kubelet = node.standin().await;
    let plugin = node.start_plugin().await;
    kubelet
        .next_registration_of("vfplane.io/fast", WAIT)
        .await
        .expect("fast registers");
    let mut fast = client(node.socket("fast")).await;
    let mut stream = list_and_watch(&mut fast).await;
    assert_eq!(stream.message().await.unwrap().unwrap().devices.len(), 2);

    // resourceApi: dra: the socket goes and the stream ends (this plugin
    // runs without --dra, so nothing else serves the pool).
    node.write_config(&format!("{plugin_pool}    resourceApi: dra\n"));
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the stream ends");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    assert!(
        !node.socket("fast").exists(),
        "no device-plugin socket for a DRA pool"
    );

    // Back to the device plugin: served and registered again.
    node.write_config(&plugin_pool);
    kubelet
        .next_registration_of("vfplane.io/fast", WAIT)
        .await
        .expect("fast registers again");
    let mut fast = client(node.socket("fast")).await;
    let mut stream = list_and_watch(&mut fast).await;
    assert_eq!(stream.message().await.unwrap().unwrap().devices.len(), 2);
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_apply_live_and_a_bad_file_keeps_the_last_good_one() {
    let node = Node::new(&[(0, 2), (0, 2)]);
    let pf0 = node.pfs[0].address;
    let pf1 = node.pfs[1].address;
    let fast_only = format!("pools:\n  - name: fast\n    selector: {{pfAddresses: [\"{pf0}\"]}}\n");
    node.write_config(&fast_only);
    let mut kubelet = node.standin().await;
    let plugin = node.start_plugin().await;
    kubelet
        .next_registration_of("vfplane.io/fast", WAIT)
        .await
        .expect("fast");
    let mut fast = client(node.socket("fast")).await;
    let mut fast_stream = list_and_watch(&mut fast).await;
    assert_eq!(fast_stream.message().await.unwrap().unwrap().devices.len(), 2);

    // A pool is added: it registers; fast's stream is untouched.
    node.write_config(&format!(
        "{fast_only}  - name: slow\n    selector: {{pfAddresses: [\"{pf1}\"]}}\n"
    ));
    kubelet
        .next_registration_of("vfplane.io/slow", WAIT)
        .await
        .expect("slow registers");
    let mut slow = client(node.socket("slow")).await;
    let mut slow_stream = list_and_watch(&mut slow).await;
    assert_eq!(slow_stream.message().await.unwrap().unwrap().devices.len(), 2);

    // A bad file: refused, everything keeps serving.
    node.write_config("pools:\n  - name: fast\n    selectr: {}\n");
    wait_metric(
        &plugin,
        "vfplane_device_plugin_config_reloads_total{result=\"error\"}",
        |v| v == 1.0,
    )
    .await;
    assert!(node.socket("fast").exists() && node.socket("slow").exists());
    fast.get_device_plugin_options(dp::Empty {}).await.unwrap();

    // VFs added to fast's PF (sriov_numvfs raised): they join the pool.
    let vfs = [add_vf(&node, 0, 2, 200), add_vf(&node, 0, 3, 201)];
    let grown = wait_for(&mut fast_stream, "4 healthy VFs in fast", |m| {
        m.devices.len() == 4 && m.devices.iter().all(|d| d.health == HEALTHY)
    })
    .await;
    assert!(grown.devices.iter().any(|d| d.id == vfs[1].to_string()));

    // fast's setting changes (pack), slow is removed: fast's stream goes on,
    // slow's socket goes and its stream ends.
    node.write_config(&format!(
        "pools:\n  - name: fast\n    selector: {{pfAddresses: [\"{pf0}\"]}}\n    preferredAllocation: pack\n"
    ));
    let end = tokio::time::timeout(WAIT, slow_stream.message())
        .await
        .expect("slow's stream ends");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    assert!(!node.socket("slow").exists(), "slow's socket removed");
    node.fake.set_driver(vfs[1], None).unwrap();
    wait_for(&mut fast_stream, "fast's stream still live", |m| {
        is(m, vfs[1], UNHEALTHY)
    })
    .await;
    wait_metric(
        &plugin,
        "vfplane_device_plugin_config_reloads_total{result=\"ok\"}",
        |v| v == 2.0,
    )
    .await;
    let text = metrics_text(&plugin).await;
    assert!(!text.contains("pool=\"slow\""), "{text}");
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_at_start_is_refused_with_its_line_and_a_missing_one_waits() {
    let node = Node::new(&[(0, 1)]);
    node.write_config("pools:\n  - name: fast\n    devices: [\"0000:00:12.0\"]\n  - name: \"no/slash\"\n    devices: [\"0000:00:12.2\"]\n");
    let error = vfplane_device_plugin::start(node.plugin_config())
        .await
        .unwrap_err();
    let message = vfplane_host::error_chain(&error);
    assert!(message.contains("line 4"), "{message}");

    fs::remove_file(node.config_path()).unwrap();
    let mut kubelet = node.standin().await;
    let plugin = node.start_plugin().await;
    assert!(
        kubelet
            .next_registration(Duration::from_millis(200))
            .await
            .is_none()
    );
    node.write_config(ONE_POOL);
    kubelet
        .next_registration(WAIT)
        .await
        .expect("registers once the file appears");
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_are_served() {
    let node = Node::new(&[(0, 2)]);
    node.write_config(ONE_POOL);
    let plugin = node.start_plugin().await;
    let text = metrics_text(&plugin).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{text}"
    );
    for (family, kind) in [
        ("vfplane_device_plugin_devices", "gauge"),
        ("vfplane_device_plugin_allocations", "counter"),
        ("vfplane_device_plugin_registrations", "counter"),
        ("vfplane_device_plugin_list_and_watch_streams", "gauge"),
        ("vfplane_device_plugin_scans", "counter"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} {kind}\n")),
            "{family}\n{text}"
        );
    }
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(metric(&text, "vfplane_device_plugin_scans_total").unwrap() >= 1.0);
    let health = common::http_get(&plugin, "/healthz").await;
    assert!(
        health.starts_with("HTTP/1.1 200 OK\r\n") && health.ends_with("ok\n"),
        "{health}"
    );
    let missing = common::http_get(&plugin, "/nothing").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vf_handed_out_waits_for_its_scrub_and_is_refused_without_one() {
    let node = Node::new(&[(0, 2)]);
    node.write_config(ONE_POOL);
    let mut config = node.plugin_config();
    config.scrub_wait = Duration::from_secs(2);
    let plugin = vfplane_device_plugin::start(config).await.unwrap();
    let mut client = client(node.socket("fast")).await;
    let vf = node.pfs[0].vfs[0];
    assert_eq!(handed_out_at(&node.state_dir(), vf).unwrap(), None);
    client
        .allocate(allocate_request(&[&[vf.to_string()]]))
        .await
        .unwrap();
    assert!(
        handed_out_at(&node.state_dir(), vf).unwrap().is_some(),
        "the mark is written before the answer"
    );
    // The container left; the kubelet offers the VF again before the agent
    // scrubbed it, and no scrub comes: refused after the wait.
    let asked = std::time::Instant::now();
    let status = client
        .allocate(allocate_request(&[&[vf.to_string()]]))
        .await
        .unwrap_err();
    assert!(
        asked.elapsed() >= Duration::from_secs(2),
        "it waited for the scrub first"
    );
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
    assert!(
        status.message().contains(&format!(
            "device {vf} of vfplane.io/fast was given to a container before"
        )),
        "{status}"
    );
    // A request holding a clean VF and the dirty one marks neither.
    let other = node.pfs[0].vfs[1];
    client
        .allocate(allocate_request(&[&[other.to_string(), vf.to_string()]]))
        .await
        .unwrap_err();
    assert_eq!(handed_out_at(&node.state_dir(), other).unwrap(), None);
    // The agent scrubs it while the kubelet's Allocate waits: handed out.
    let state_dir = node.state_dir();
    let scrub = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        clear_handed_out(&state_dir, vf).unwrap();
    });
    client
        .allocate(allocate_request(&[&[vf.to_string()]]))
        .await
        .expect("handed out once the scrub removed the mark");
    scrub.await.unwrap();
    // A quarantined VF (its scrub failed) is refused without waiting; its
    // health takes it out of the pool too, so this is a kubelet that did
    // not see that yet.
    write_vf_state(&node.state_dir(), vf, Some(VfState::ScrubFailed)).unwrap();
    let asked = std::time::Instant::now();
    client
        .allocate(allocate_request(&[&[vf.to_string()]]))
        .await
        .unwrap_err();
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "no wait for a quarantined VF"
    );
    // A scrub running (its state written, the mark already gone, as a
    // scrub ending may be seen): the request waits for the state to clear,
    // then the VF is handed out. Refused at once before, failing the pod.
    write_vf_state(&node.state_dir(), vf, Some(VfState::ScrubPending)).unwrap();
    clear_handed_out(&node.state_dir(), vf).unwrap();
    let state_dir = node.state_dir();
    let scrub = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        write_vf_state(&state_dir, vf, None).unwrap();
    });
    let asked = std::time::Instant::now();
    client
        .allocate(allocate_request(&[&[vf.to_string()]]))
        .await
        .expect("handed out once the scrub's state cleared");
    assert!(
        asked.elapsed() >= Duration::from_millis(400),
        "it waited for the running scrub"
    );
    scrub.await.unwrap();
    // A scrub that does not end within the wait (the VF is Healthy to the
    // kubelet meanwhile, so only Allocate stands between it and a pod):
    // refused, naming the scrub.
    clear_handed_out(&node.state_dir(), vf).unwrap();
    write_vf_state(&node.state_dir(), vf, Some(VfState::ScrubPending)).unwrap();
    let status = client
        .allocate(allocate_request(&[&[vf.to_string()]]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
    assert!(
        status
            .message()
            .contains(&format!("device {vf} of vfplane.io/fast is being scrubbed")),
        "{status}"
    );
    assert_eq!(handed_out_at(&node.state_dir(), vf).unwrap(), None, "not marked");
    plugin.shutdown().await.unwrap();
}

/// Probes started by events do not push the periodic probe away: after
/// 200 state-directory changes (each a probe, as a busy node's Allocate
/// marks and scrubs make), a change that sends no event (a fake driver
/// link) is still found by the 1 s safety-net probe. Each event once moved
/// the periodic probe a whole period later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_driven_probes_leave_the_periodic_probe_on_time() {
    let node = Node::new(&[(0, 2)]);
    node.write_config(ONE_POOL);
    let _kubelet = node.standin().await;
    let mut config = node.plugin_config();
    config.rescan_interval = Duration::from_secs(1);
    let plugin = vfplane_device_plugin::start(config).await.unwrap();
    let mut client = client(node.socket("fast")).await;
    let mut stream = list_and_watch(&mut client).await;
    let first = stream.message().await.unwrap().unwrap();
    let vf = first.devices[0].id.clone();
    let unrelated = node.state_dir().join("0000:7f:00.0");
    fs::create_dir_all(node.state_dir()).unwrap();
    for _ in 0..100 {
        fs::write(&unrelated, "scrub-pending").unwrap();
        fs::remove_file(&unrelated).unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    node.fake.set_driver(vf.parse().unwrap(), None).unwrap();
    wait_for(&mut stream, "unbound VF unhealthy by the periodic probe", |m| {
        m.devices.iter().any(|d| d.id == vf && d.health == UNHEALTHY)
    })
    .await;
    plugin.shutdown().await.unwrap();
}

/// Clients that send garbage, cut frames short, send too much or stall:
/// each loses only its own connection or call, and the kubelet's next
/// request on a fresh connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_huge_and_stalled_clients_leave_the_next_request_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    /// The HTTP/2 client preface (RFC 9113, 3.4).
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    let node = Node::new(&[(0, 2)]);
    node.write_config(ONE_POOL);
    let plugin = node.start_plugin().await;
    let socket = node.socket("fast");
    let vf = node.pfs[0].vfs[0].to_string();
    async fn served(socket: &std::path::Path, vf: &str) {
        let mut client = client(socket).await;
        client.get_device_plugin_options(dp::Empty {}).await.unwrap();
        let reply = client
            .allocate(allocate_request(&[&[vf.to_owned()]]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.container_responses.len(), 1);
    }
    // Hands the VF back, as the agent's scrub would, for the next call.
    let state_dir = node.state_dir();
    let release = |vf: &str| {
        clear_handed_out(&state_dir, vf.parse().unwrap()).unwrap();
    };
    served(&socket, &vf).await;
    release(&vf);

    /// Writes `bytes` on a fresh connection, then reads until the plugin
    /// hangs up (or `WAIT` passes, which fails the test).
    async fn hung_up_on(socket: &std::path::Path, bytes: &[u8]) {
        let mut stream = UnixStream::connect(socket).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the plugin kept a connection that sent {bytes:?}");
    }
    // Not HTTP/2 at all.
    hung_up_on(&socket, b"\x00\xffGET / HTTP/1.1\r\n\r\ngarbage").await;
    served(&socket, &vf).await;
    release(&vf);
    // The preface, then a SETTINGS frame that claims 600 bytes and brings
    // 6, then the stream closes: cut short.
    let mut cut = PREFACE.to_vec();
    cut.extend_from_slice(&[0, 2, 0x58, 0x4, 0, 0, 0, 0, 0, 0, 0x3, 0, 0, 0, 0x64]);
    {
        let mut stream = UnixStream::connect(&socket).await.unwrap();
        stream.write_all(&cut).await.unwrap();
        stream.shutdown().await.unwrap();
    }
    // The preface, then a frame of a type and length that make no sense
    // (a DATA frame on stream 0): a protocol error, hung up on.
    let mut nonsense = PREFACE.to_vec();
    nonsense.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // empty SETTINGS
    nonsense.extend_from_slice(&[0, 0, 4, 0x0, 0, 0, 0, 0, 0, 1, 2, 3, 4]); // DATA on stream 0
    hung_up_on(&socket, &nonsense).await;
    served(&socket, &vf).await;
    release(&vf);

    // A request over the limit: refused by name, the connection stays
    // usable, and the pool still answers.
    let mut client = client(&socket).await;
    let huge = vec!["0000:00:10.0".to_owned(); vfplane_device_plugin::MAX_REQUEST_BYTES / 8];
    let status = client
        .allocate(allocate_request(&[&huge]))
        .await
        .expect_err("a request over the limit was taken");
    assert_eq!(status.code(), Code::OutOfRange, "{status}");
    let options = client.get_device_plugin_options(dp::Empty {}).await;
    assert!(
        options.is_ok(),
        "the connection did not survive a refused request"
    );
    served(&socket, &vf).await;
    release(&vf);

    // Stalled clients held open while the kubelet is served: connections
    // that never send a byte, and ones that stop inside the preface.
    let mut stalled = Vec::new();
    for i in 0..64 {
        let mut stream = UnixStream::connect(&socket).await.unwrap();
        if i % 2 == 1 {
            stream.write_all(&PREFACE[..10]).await.unwrap();
        }
        stalled.push(stream);
    }
    for _ in 0..3 {
        tokio::time::timeout(WAIT, served(&socket, &vf))
            .await
            .expect("the kubelet was not served while stalled clients were connected");
        release(&vf);
    }
    drop(stalled);
    plugin.shutdown().await.unwrap();
}

/// A pool that holds no VF now (`devices: []`, what the agent writes when
/// none of the pool's VFs is ready) is still registered and lists nothing,
/// so the kubelet knows the resource and reports it at 0. A kubelet that
/// never heard of a resource keeps the count the API server had and starts
/// a pod asking for it without a device (seen after a reboot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_no_vf_now_is_registered_and_lists_nothing() {
    let node = Node::new(&[(0, 2)]);
    node.write_config("pools:\n  - name: empty\n    devices: []\n");
    let mut kubelet = node.standin().await;
    let plugin = node.start_plugin().await;

    let registration = kubelet.next_registration(WAIT).await.expect("a registration");
    assert_eq!(registration.request.resource_name, "vfplane.io/empty");
    let mut client = client(registration.socket(kubelet.dir())).await;
    let mut stream = list_and_watch(&mut client).await;
    let first = stream.message().await.unwrap().expect("a first list");
    assert!(first.devices.is_empty(), "{:?}", first.devices);
    plugin.shutdown().await.unwrap();
}
