//! The plugin against the runtime's side of the protocol, played here over
//! a socket pair the way containerd's NRI adaptation plays it: frames on
//! two logical connections, ttrpc on each, `Configure` possibly before the
//! registration's answer, a split `Synchronize`, a refusal that carries its
//! message, an unknown method. (The real runtime is exercised on the
//! cluster's node.)
// Integration tests are not #[cfg(test)], so clippy's in-test allowance
// does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use prost::Message as _;
use tokio::io::{AsyncWriteExt as _, ReadHalf, WriteHalf};
use tokio::net::UnixStream;
use vfplane_nri::api;
use vfplane_nri::mux::{self, PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN};
use vfplane_nri::ttrpc::{self, Message, Reassembler, Request, Response, code};
use vfplane_nri::{Events, Plugin, Refusal, Registration};

/// Adjusts every container that has `WANT_PIDS=<n>` in its environment.
#[derive(Default)]
struct PidsPlugin {
    synchronized: Mutex<Vec<String>>,
    removed: Mutex<Vec<String>>,
    connections: Mutex<Vec<bool>>,
}

impl Plugin for PidsPlugin {
    fn events(&self) -> Events {
        Events::of(&[api::Event::CreateContainer, api::Event::RemoveContainer])
    }

    fn synchronize(
        &self,
        _pods: &[api::PodSandbox],
        containers: &[api::Container],
    ) -> Result<Vec<api::ContainerUpdate>, Refusal> {
        let mut seen = self.synchronized.lock().unwrap();
        seen.extend(containers.iter().map(|c| c.id.clone()));
        Ok(Vec::new())
    }

    fn create_container(
        &self,
        _pod: &api::PodSandbox,
        container: &api::Container,
    ) -> Result<api::ContainerAdjustment, Refusal> {
        let Some(value) = container.env.iter().find_map(|e| e.strip_prefix("WANT_PIDS=")) else {
            return Ok(api::ContainerAdjustment::default());
        };
        let limit: i64 = value
            .parse()
            .map_err(|_| Refusal::invalid(format!("WANT_PIDS={value} is not a number")))?;
        Ok(api::ContainerAdjustment {
            linux: Some(api::LinuxContainerAdjustment {
                resources: Some(api::LinuxResources {
                    pids: Some(api::LinuxPids { limit }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn connection_changed(&self, connected: bool) {
        self.connections.lock().unwrap().push(connected);
    }

    fn state_change(
        &self,
        event: api::Event,
        _pod: Option<&api::PodSandbox>,
        container: Option<&api::Container>,
    ) {
        if event == api::Event::RemoveContainer {
            self.removed
                .lock()
                .unwrap()
                .push(container.map(|c| c.id.clone()).unwrap_or_default());
        }
    }
}

/// The runtime's end of the socket.
struct Runtime {
    reader: ReadHalf<UnixStream>,
    writer: WriteHalf<UnixStream>,
    plugin_conn: Reassembler,
    runtime_conn: Reassembler,
    next_stream: u32,
}

impl Runtime {
    fn new(stream: UnixStream) -> Self {
        let (reader, writer) = tokio::io::split(stream);
        Self {
            reader,
            writer,
            plugin_conn: Reassembler::default(),
            runtime_conn: Reassembler::default(),
            next_stream: 1,
        }
    }

    async fn next(&mut self, conn: u32) -> Message {
        loop {
            let (got, payload) = mux::read_frame(&mut self.reader).await.unwrap().expect("a frame");
            let messages = match got {
                PLUGIN_SERVICE_CONN => self.plugin_conn.push(&payload).unwrap(),
                RUNTIME_SERVICE_CONN => self.runtime_conn.push(&payload).unwrap(),
                other => panic!("a frame on connection {other}"),
            };
            assert!(messages.len() <= 1, "one message at a time here");
            if let Some(message) = messages.into_iter().next() {
                assert_eq!(got, conn, "the message came on the other connection");
                return message;
            }
        }
    }

    async fn send(&mut self, conn: u32, message: Message) {
        let bytes = mux::frames(conn, &message.encode().unwrap());
        self.writer.write_all(&bytes).await.unwrap();
    }

    /// Calls the plugin's `method` and returns its answer.
    async fn call(&mut self, method: &str, payload: Vec<u8>) -> Response {
        let stream = self.next_stream;
        self.next_stream += 2;
        let request = Request {
            service: "nri.pkg.api.v1alpha1.Plugin".into(),
            method: method.into(),
            payload,
            timeout_nano: 2_000_000_000,
            metadata: Vec::new(),
        };
        self.send(
            PLUGIN_SERVICE_CONN,
            Message {
                stream,
                kind: ttrpc::TYPE_REQUEST,
                flags: 0,
                data: request.encode_to_vec(),
            },
        )
        .await;
        let answer = self.next(PLUGIN_SERVICE_CONN).await;
        assert_eq!(answer.stream, stream);
        assert_eq!(answer.kind, ttrpc::TYPE_RESPONSE);
        Response::decode(answer.data.as_slice()).unwrap()
    }
}

fn ok<M: prost::Message + Default>(response: &Response) -> M {
    assert_eq!(response.status, None, "the call failed");
    M::decode(response.payload.as_slice()).unwrap()
}

fn container(id: &str, env: &[&str]) -> api::Container {
    api::Container {
        id: id.into(),
        env: env.iter().map(|e| (*e).to_owned()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_plugin_registers_configures_synchronizes_and_adjusts_like_the_runtime_expects() {
    let (plugin_end, runtime_end) = UnixStream::pair().unwrap();
    let plugin = Arc::new(PidsPlugin::default());
    let registration = Registration::new("vfplane", "20").unwrap();
    let serving = tokio::spawn({
        let plugin = Arc::clone(&plugin);
        async move { vfplane_nri::serve(plugin_end, &registration, plugin).await }
    });
    let mut runtime = Runtime::new(runtime_end);

    // The registration, on the runtime's connection, from an odd stream.
    let register = runtime.next(RUNTIME_SERVICE_CONN).await;
    assert_eq!(register.kind, ttrpc::TYPE_REQUEST);
    assert_eq!(register.stream % 2, 1, "a client's streams are odd");
    let request = Request::decode(register.data.as_slice()).unwrap();
    assert_eq!(
        (request.service.as_str(), request.method.as_str()),
        ("nri.pkg.api.v1alpha1.Runtime", "RegisterPlugin")
    );
    let registered = api::RegisterPluginRequest::decode(request.payload.as_slice()).unwrap();
    assert_eq!(
        (registered.plugin_name.as_str(), registered.plugin_idx.as_str()),
        ("vfplane", "20")
    );

    // Configure before the registration is answered, as containerd may.
    let configured: api::ConfigureResponse = ok(&runtime
        .call(
            "Configure",
            api::ConfigureRequest {
                runtime_name: "containerd".into(),
                runtime_version: "v2.2.9".into(),
                registration_timeout: 5000,
                request_timeout: 2000,
                ..Default::default()
            }
            .encode_to_vec(),
        )
        .await);
    assert_eq!(
        configured.events,
        0x8 | 0x400,
        "CREATE_CONTAINER and REMOVE_CONTAINER"
    );
    runtime
        .send(
            RUNTIME_SERVICE_CONN,
            Message {
                stream: register.stream,
                kind: ttrpc::TYPE_RESPONSE,
                flags: 0,
                data: Response {
                    status: None,
                    payload: api::Empty {}.encode_to_vec(),
                }
                .encode_to_vec(),
            },
        )
        .await;

    // A synchronization split in two: the first part is answered with
    // more and nothing else, the plugin sees every container at the end.
    let first: api::SynchronizeResponse = ok(&runtime
        .call(
            "Synchronize",
            api::SynchronizeRequest {
                containers: vec![container("a", &[])],
                more: true,
                ..Default::default()
            }
            .encode_to_vec(),
        )
        .await);
    assert!(first.more && first.update.is_empty());
    let last: api::SynchronizeResponse = ok(&runtime
        .call(
            "Synchronize",
            api::SynchronizeRequest {
                containers: vec![container("b", &[])],
                more: false,
                ..Default::default()
            }
            .encode_to_vec(),
        )
        .await);
    assert!(!last.more);
    assert_eq!(*plugin.synchronized.lock().unwrap(), ["a", "b"]);

    // A container the plugin adjusts, with an environment large enough
    // that its request spans frames.
    let padding = format!("PADDING={}", "x".repeat(20_000));
    let created: api::CreateContainerResponse = ok(&runtime
        .call(
            "CreateContainer",
            api::CreateContainerRequest {
                pod: Some(api::PodSandbox::default()),
                container: Some(container("c", &[&padding, "WANT_PIDS=64"])),
            }
            .encode_to_vec(),
        )
        .await);
    let pids = created
        .adjust
        .and_then(|a| a.linux)
        .and_then(|l| l.resources)
        .and_then(|r| r.pids)
        .map(|p| p.limit);
    assert_eq!(pids, Some(64));

    // A refusal reaches the runtime with its code and message.
    let refused = runtime
        .call(
            "CreateContainer",
            api::CreateContainerRequest {
                pod: None,
                container: Some(container("d", &["WANT_PIDS=many"])),
            }
            .encode_to_vec(),
        )
        .await;
    let status = refused.status.expect("a status");
    assert_eq!(status.code, code::INVALID_ARGUMENT);
    assert_eq!(status.message, "WANT_PIDS=many is not a number");

    // An event through StateChange.
    let _: api::Empty = ok(&runtime
        .call(
            "StateChange",
            api::StateChangeEvent {
                event: api::Event::RemoveContainer as i32,
                pod: None,
                container: Some(container("c", &[])),
            }
            .encode_to_vec(),
        )
        .await);
    assert_eq!(*plugin.removed.lock().unwrap(), ["c"]);

    // A method the plugin does not know.
    let unknown = runtime.call("ValidateContainerAdjustment", Vec::new()).await;
    assert_eq!(unknown.status.map(|s| s.code), Some(code::UNIMPLEMENTED));

    // The runtime goes away: the connection ends without error.
    drop(runtime);
    serving.await.unwrap().expect("a clean end");
    assert_eq!(
        *plugin.connections.lock().unwrap(),
        [true, false],
        "both ends heard of"
    );
}

#[tokio::test]
async fn a_refused_registration_ends_the_connection_with_the_runtimes_reason() {
    let (plugin_end, runtime_end) = UnixStream::pair().unwrap();
    let registration = Registration::new("vfplane", "20").unwrap();
    let serving = tokio::spawn(async move {
        vfplane_nri::serve(plugin_end, &registration, Arc::new(PidsPlugin::default())).await
    });
    let mut runtime = Runtime::new(runtime_end);
    let register = runtime.next(RUNTIME_SERVICE_CONN).await;
    runtime
        .send(
            RUNTIME_SERVICE_CONN,
            Message {
                stream: register.stream,
                kind: ttrpc::TYPE_RESPONSE,
                flags: 0,
                data: Response {
                    status: Some(ttrpc::Status {
                        code: code::INVALID_ARGUMENT,
                        message: "invalid plugin index".into(),
                    }),
                    payload: Vec::new(),
                }
                .encode_to_vec(),
            },
        )
        .await;
    let error = serving.await.unwrap().unwrap_err();
    assert_eq!(
        error.to_string(),
        "the runtime refused the registration: invalid plugin index"
    );
}

#[test]
fn a_registration_needs_a_name_and_a_two_digit_index() {
    assert!(Registration::new("vfplane", "05").is_ok());
    assert_eq!(
        Registration::new("", "05").unwrap_err().to_string(),
        "an NRI plugin needs a name"
    );
    for bad in ["5", "005", "a1", ""] {
        assert!(Registration::new("vfplane", bad).is_err(), "{bad:?}");
    }
}
