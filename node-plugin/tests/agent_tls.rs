//! The node agent over TCP with mutual TLS: the controller's certificate gets in, nothing else
//! does. Certificates are made for the test by a throwaway CA (rcgen).

mod common;

use common::certs::Ca;
use common::*;
use qsd_csi_proto::agent::{self, agent_client::AgentClient};
use qsd_node::tls;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

async fn capacity(c: &mut AgentClient<tonic::transport::Channel>) -> Result<(), tonic::Status> {
    c.get_capacity(agent::PoolRef { pool: "local".into() }).await.map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_only_clients_with_a_certificate_from_the_cluster_ca() {
    let env = Env::new().await;
    let dir = env.dir.path();
    let cluster = Ca::new(dir, "cluster-ca");
    let rogue = Ca::new(dir, "rogue-ca");
    let node = cluster.leaf(dir, "node-1", &cluster);
    let controller = cluster.leaf(dir, "controller", &cluster);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let (core, node) = (env.core(), node.clone());
        async move {
            tls::serve_agent(core, listener, &node, async {
                let _ = stopped.await;
            })
            .await
        }
    });

    // The controller, with a certificate from the cluster's CA.
    let mut good = tls::connect_agent(addr, "node-1", &controller).await.expect("connect");
    capacity(&mut good).await.expect("a cluster client is served");

    // No client certificate at all: the handshake (or the first call) fails.
    let anonymous = async {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&cluster.pem).expect("ca")))
            .domain_name("node-1");
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        capacity(&mut AgentClient::new(channel)).await.map_err(|e| e.to_string())
    };
    assert!(anonymous.await.is_err(), "a client without a certificate was served");

    // A certificate from another CA.
    let impostor = rogue.leaf(dir, "controller-impostor", &cluster);
    let refused = match tls::connect_agent(addr, "node-1", &impostor).await {
        Ok(mut c) => capacity(&mut c).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client with a certificate from another CA was served");

    // And the controller refuses a node whose certificate the cluster's CA did not sign.
    let trusts_rogue = cluster.leaf(dir, "controller-2", &rogue);
    let refused = match tls::connect_agent(addr, "node-1", &trusts_rogue).await {
        Ok(mut c) => capacity(&mut c).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client accepted a server certificate its CA did not sign");

    // The good client still works, and the server stops cleanly.
    capacity(&mut good).await.expect("still served");
    let _ = stop.send(());
    server.await.expect("joins").expect("server ends cleanly");
}
