//! The series a status and scrubs make, and the endpoint serving them.

use std::time::Duration;

use vfplane_proto::node_state::{PfStatus, VfContainerStatus, VfStatus};

use super::*;

fn status(owner: Option<(&str, &str)>, problems: &[&str]) -> NodeStateStatus {
    NodeStateStatus {
        pfs: vec![PfStatus {
            pci_address: "0000:00:02.0".to_owned(),
            vfs: vec![
                VfStatus {
                    pci_address: "0000:00:12.0".to_owned(),
                    pool: Some("fast".to_owned()),
                    health: vfplane_proto::vf_health::VfHealth::Healthy,
                    owner: owner.map(|(o, _)| o.to_owned()),
                    owner_pod_uid: owner.map(|(_, u)| u.to_owned()),
                    container: owner.map(|_| VfContainerStatus {
                        id: "c1".to_owned(),
                        problems: problems.iter().map(|p| (*p).to_owned()).collect(),
                        ..VfContainerStatus::default()
                    }),
                    ..VfStatus::default()
                },
                VfStatus {
                    pci_address: "0000:00:12.2".to_owned(),
                    pool: Some("fast".to_owned()),
                    health: vfplane_proto::vf_health::VfHealth::Quarantined("function reset failed".into()),
                    ..VfStatus::default()
                },
            ],
            ..PfStatus::default()
        }],
        ..NodeStateStatus::default()
    }
}

#[test]
fn every_vf_is_a_series_with_its_owner_and_the_owners_problems() {
    let metrics = AgentMetrics::default();
    metrics.observe_pass(
        &status(Some(("default/tenant-1/app", "u1")), &["memory.max is max"]),
        true,
    );
    let text = metrics.encode();
    assert!(
        text.contains(
            r#"vfplane_agent_vf_info{pf="0000:00:02.0",vf="0000:00:12.0",pool="fast",health="healthy",namespace="default",pod="tenant-1",container="app",pod_uid="u1"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"vfplane_agent_vf_info{pf="0000:00:02.0",vf="0000:00:12.2",pool="fast",health="quarantined",namespace="",pod="",container="",pod_uid=""} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"vfplane_agent_vf_container_problems{vf="0000:00:12.0",pool="fast",namespace="default",pod="tenant-1",container="app"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("vfplane_agent_converged 1"), "{text}");

    // The owner leaves: its series goes, the VF's stays without owner.
    metrics.observe_pass(&status(None, &[]), false);
    let text = metrics.encode();
    assert!(!text.contains("tenant-1"), "{text}");
    assert!(
        text.contains(
            r#"vfplane_agent_vf_info{pf="0000:00:02.0",vf="0000:00:12.0",pool="fast",health="healthy",namespace="",pod="",container="",pod_uid=""} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("vfplane_agent_passes_total 2"), "{text}");
    assert!(text.contains("vfplane_agent_converged 0"), "{text}");
}

#[test]
fn scrubs_are_counted_by_result_and_timed() {
    let metrics = AgentMetrics::default();
    let address = "0000:00:12.0".parse().unwrap_or_else(|e| panic!("{e}"));
    metrics.observe_scrub(&ScrubOutcome::Scrubbed {
        address,
        took: Duration::from_millis(1300),
    });
    metrics.observe_scrub(&ScrubOutcome::Failed {
        address,
        error: "x".to_owned(),
    });
    let text = metrics.encode();
    assert!(
        text.contains(r#"vfplane_agent_scrubs_total{result="scrubbed"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"vfplane_agent_scrubs_total{result="failed"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("vfplane_agent_scrub_duration_seconds_sum 1.3"),
        "{text}"
    );
    assert!(
        text.contains("vfplane_agent_scrub_duration_seconds_count 1"),
        "{text}"
    );
}

#[test]
fn the_endpoint_serves_the_text_format() {
    use std::io::{Read as _, Write as _};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let metrics = Arc::new(AgentMetrics::default());
    metrics.observe_pass(&status(None, &[]), true);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    runtime.spawn(async move { axum::serve(listener, router(metrics)).await });
    let thread = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    });
    let answer = runtime.block_on(async {
        loop {
            if thread.is_finished() {
                break thread.join().unwrap_or_default();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("vfplane_agent_vf_info{"), "{answer}");
}
