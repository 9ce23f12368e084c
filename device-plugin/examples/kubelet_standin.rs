//! `kubelet-standin`: a stand-in kubelet for the testbed, printing what it
//! sees as JSON lines on stdout (one object per line, `event` says what):
//!
//! - `registration`: the plugin registered (version, endpoint, resource,
//!   options);
//! - `options`: GetDevicePluginOptions on the plugin's socket;
//! - `devices`: every ListAndWatch message (id, health, NUMA nodes);
//! - `preferred` and `allocate` (with `--allocate N`): GetPreferredAllocation
//!   over the healthy devices, then Allocate of its answer, each device
//!   spec with `hostPathExists` checked on this machine;
//! - `done` when the stop file appears or the timeout passes.
//!
//! Every line carries `uptime`, the machine's `/proc/uptime`, so a script
//! can time what it did against what the stand-in saw. Errors are printed
//! as `{"event":"error",...}` and make the exit code 1.
//!
//! ```text
//! kubelet-standin --kubelet-dir DIR --resource vfplane.io/POOL [--allocate N]
//!                 [--ready-file FILE] [--stop-file FILE] [--timeout-secs S]
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use vfplane_device_plugin::kubelet_standin::{KubeletStandin, connect_plugin};
use vfplane_proto::HEALTHY;
use vfplane_proto::deviceplugin::v1beta1 as dp;

#[derive(Debug, Parser)]
struct Args {
    /// The kubelet's device-plugin directory (kubelet.sock is served there).
    #[arg(long)]
    kubelet_dir: PathBuf,
    /// The resource to wait for.
    #[arg(long)]
    resource: String,
    /// Ask for a preferred allocation of this many devices and Allocate it.
    #[arg(long)]
    allocate: Option<usize>,
    /// Created once the first list (and the allocation) is done.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Stop when this file appears.
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// Stop after this long in any case.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

fn uptime() -> Option<f64> {
    std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn emit(mut value: Value) {
    if let Some(object) = value.as_object_mut() {
        object.insert("uptime".to_owned(), json!(uptime()));
    }
    println!("{value}");
}

fn devices_json(message: &dp::ListAndWatchResponse) -> Value {
    Value::Array(
        message
            .devices
            .iter()
            .map(|d| {
                let numa: Vec<i64> = d
                    .topology
                    .as_ref()
                    .map(|t| t.nodes.iter().map(|n| n.id).collect())
                    .unwrap_or_default();
                json!({"id": d.id, "health": d.health, "numa": numa})
            })
            .collect(),
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => emit(json!({"event": "done"})),
        Err(error) => {
            emit(json!({"event": "error", "message": error}));
            std::process::exit(1);
        }
    }
}

async fn run(args: &Args) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut kubelet = KubeletStandin::start(&args.kubelet_dir)
        .await
        .map_err(|e| format!("cannot serve kubelet.sock in {}: {e}", args.kubelet_dir.display()))?;
    emit(json!({"event": "kubelet", "socket": kubelet.socket_path()}));
    let registration = kubelet
        .next_registration_of(&args.resource, left())
        .await
        .ok_or_else(|| format!("no registration of {} in time", args.resource))?;
    let request = &registration.request;
    emit(json!({
        "event": "registration",
        "version": request.version,
        "endpoint": request.endpoint,
        "resource": request.resource_name,
        "preferredAllocation": request.options.as_ref().is_some_and(|o| o.get_preferred_allocation_available),
    }));
    let mut client = connect_plugin(registration.socket(kubelet.dir()))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", request.endpoint))?;
    let options = client
        .get_device_plugin_options(dp::Empty {})
        .await
        .map_err(|e| format!("GetDevicePluginOptions: {e}"))?
        .into_inner();
    emit(json!({
        "event": "options",
        "preferredAllocation": options.get_preferred_allocation_available,
        "preStartRequired": options.pre_start_required,
    }));
    let mut stream = client
        .list_and_watch(dp::Empty {})
        .await
        .map_err(|e| format!("ListAndWatch: {e}"))?
        .into_inner();
    // The stream is read by its own task, so waiting on it can be
    // interrupted without losing a message.
    let (tx, mut messages) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let next = stream.message().await;
            let end = !matches!(next, Ok(Some(_)));
            if tx.send(next).is_err() || end {
                return;
            }
        }
    });
    let mut ready = false;
    loop {
        let next = tokio::select! {
            message = messages.recv() => message,
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                let stop = args.stop_file.as_ref().is_some_and(|f| f.exists());
                if stop || left().is_zero() {
                    return Ok(());
                }
                continue;
            }
        };
        let message = match next {
            Some(Ok(Some(message))) => message,
            None | Some(Ok(None)) => return Err("the ListAndWatch stream ended".to_owned()),
            Some(Err(status)) => return Err(format!("ListAndWatch failed: {status}")),
        };
        emit(json!({"event": "devices", "devices": devices_json(&message)}));
        if ready {
            continue;
        }
        let healthy: Vec<String> = message
            .devices
            .iter()
            .filter(|d| d.health == HEALTHY)
            .map(|d| d.id.clone())
            .collect();
        if let Some(size) = args.allocate {
            if healthy.len() < size {
                continue;
            }
            allocate(&mut client, healthy, size).await?;
        }
        ready = true;
        if let Some(file) = &args.ready_file {
            std::fs::write(file, "").map_err(|e| format!("cannot write {}: {e}", file.display()))?;
        }
    }
}

async fn allocate(
    client: &mut dp::device_plugin_client::DevicePluginClient<tonic::transport::Channel>,
    healthy: Vec<String>,
    size: usize,
) -> Result<(), String> {
    let preferred = client
        .get_preferred_allocation(dp::PreferredAllocationRequest {
            container_requests: vec![dp::ContainerPreferredAllocationRequest {
                available_device_i_ds: healthy,
                must_include_device_i_ds: Vec::new(),
                allocation_size: i32::try_from(size).unwrap_or(i32::MAX),
            }],
        })
        .await
        .map_err(|e| format!("GetPreferredAllocation: {e}"))?
        .into_inner();
    let ids = preferred
        .container_responses
        .first()
        .map(|c| c.device_i_ds.clone())
        .unwrap_or_default();
    emit(json!({"event": "preferred", "ids": ids}));
    let started = Instant::now();
    let response = client
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest { devices_ids: ids }],
        })
        .await
        .map_err(|e| format!("Allocate: {e}"))?
        .into_inner();
    let micros = started.elapsed().as_micros();
    let containers: Vec<Value> = response
        .container_responses
        .iter()
        .map(|c| {
            let devices: Vec<Value> = c
                .devices
                .iter()
                .map(|d| {
                    json!({
                        "containerPath": d.container_path,
                        "hostPath": d.host_path,
                        "permissions": d.permissions,
                        "hostPathExists": std::path::Path::new(&d.host_path).exists(),
                    })
                })
                .collect();
            let cdi: Vec<&str> = c.cdi_devices.iter().map(|d| d.name.as_str()).collect();
            json!({"devices": devices, "envs": c.envs, "cdiDevices": cdi})
        })
        .collect();
    emit(json!({"event": "allocate", "micros": micros, "containers": containers}));
    Ok(())
}
