//! gRPC clients over unix sockets, the way the kubelet's APIs are reached
//! (device plugin registration, pod-resources) and the way the kubelet
//! reaches a device plugin.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Opens a gRPC channel to the unix socket at `path` (tonic's
/// `connect_with_connector`; the URI is a placeholder tonic needs and
/// never resolves). The `:authority` sent is `[::1]:1`, which the kubelet
/// and tonic servers accept.
///
/// # Errors
/// When the socket does not answer within `connect_timeout`.
pub async fn connect_unix(
    path: impl AsRef<Path>,
    connect_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let path: Arc<PathBuf> = Arc::new(path.as_ref().to_owned());
    Endpoint::from_static("http://[::1]:1")
        .connect_timeout(connect_timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = Arc::clone(&path);
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path.as_path()).await?)) }
        }))
        .await
}
