//! gRPC clients for a CSI endpoint on a unix socket.

use std::path::{Path, PathBuf};

use qsd_csi_proto::csi::controller_client::ControllerClient;
use qsd_csi_proto::csi::identity_client::IdentityClient;
use qsd_csi_proto::csi::node_client::NodeClient;
use tonic::transport::Channel;

/// The socket path of an endpoint written `unix:///path`, `unix:/path` or `/path`.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(format!("endpoint {endpoint:?} is not an absolute unix socket path"));
    }
    Ok(PathBuf::from(path))
}

pub use qsd_node::grpc::connect_unix as connect;

/// The three CSI clients on one channel.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Identity.
    pub identity: IdentityClient<Channel>,
    /// Controller.
    pub controller: ControllerClient<Channel>,
    /// Node.
    pub node: NodeClient<Channel>,
}

impl Clients {
    /// Connects to the endpoint's socket.
    pub async fn connect(socket: &Path) -> Result<Clients, tonic::transport::Error> {
        let channel = connect(socket).await?;
        Ok(Clients {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_name_absolute_unix_sockets() {
        assert_eq!(socket_path("unix:///run/csi.sock").ok(), Some(PathBuf::from("/run/csi.sock")));
        assert_eq!(socket_path("unix:/run/csi.sock").ok(), Some(PathBuf::from("/run/csi.sock")));
        assert_eq!(socket_path("/run/csi.sock").ok(), Some(PathBuf::from("/run/csi.sock")));
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://relative.sock").is_err());
    }
}
