//! The registration socket the kubelet's plugin watcher finds in its
//! registry directory: it asks who we are, validates the answer and says
//! whether it took us.

use std::path::PathBuf;

use tonic::{Request, Response, Status};
use vfplane_proto::pluginregistration::v1 as reg;

use super::DRIVER_NAME;

/// The `Registration` service of the DRA driver.
#[derive(Debug, Clone)]
pub struct DraRegistration {
    /// The DRA socket the kubelet is to call.
    pub endpoint: PathBuf,
}

impl DraRegistration {
    /// What `GetInfo` answers: a DRA plugin named [`DRIVER_NAME`] serving
    /// the v1 DRA service and the v1alpha1 health service at `endpoint`.
    pub fn info(&self) -> reg::PluginInfo {
        reg::PluginInfo {
            r#type: vfplane_proto::dra::PLUGIN_TYPE.to_owned(),
            name: DRIVER_NAME.to_owned(),
            endpoint: self.endpoint.display().to_string(),
            supported_versions: vec![
                vfplane_proto::dra::DRA_PLUGIN_SERVICE.to_owned(),
                vfplane_proto::dra::HEALTH_SERVICE.to_owned(),
            ],
        }
    }
}

#[tonic::async_trait]
impl reg::registration_server::Registration for DraRegistration {
    async fn get_info(
        &self,
        _request: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        Ok(Response::new(self.info()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = DRIVER_NAME, "the kubelet registered the DRA driver");
            Ok(Response::new(reg::RegistrationStatusResponse {}))
        } else {
            tracing::error!(driver = DRIVER_NAME, error = %status.error, "the kubelet refused the DRA driver");
            Err(Status::failed_precondition(format!(
                "registration of {DRIVER_NAME} refused: {}",
                status.error
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_info_names_a_dra_plugin_its_socket_and_the_services_kubelet_1_37_speaks() {
        let info = DraRegistration {
            endpoint: PathBuf::from("/var/lib/kubelet/plugins/vfplane.io/dra.sock"),
        }
        .info();
        assert_eq!(info.r#type, "DRAPlugin");
        assert_eq!(info.name, "vfplane.io");
        assert_eq!(info.endpoint, "/var/lib/kubelet/plugins/vfplane.io/dra.sock");
        assert_eq!(
            info.supported_versions,
            ["v1.DRAPlugin", "v1alpha1.DRAResourceHealth"],
            "the kubelet takes the first DRA service it knows; health only when listed"
        );
    }
}
