//! Starting a gateway in front of plugin services, and clients for it.

use std::{net::SocketAddr, time::Duration};

use flotilla_gateway::{
    Config, Gateway,
    config::{GatewayConfig, PluginConfig},
};
use flotilla_proto::{
    admin, core,
    service::{
        agent_metadata_service_client::AgentMetadataServiceClient,
        async_agent_service_client::AsyncAgentServiceClient,
        sync_agent_service_client::SyncAgentServiceClient,
    },
};
use flotilla_telemetry::{Shutdown, config::HumanDuration};
use flotilla_testkit::bind_loopback;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub(crate) struct RunningGateway {
    pub(crate) addr: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) shutdown: Shutdown,
    pub(crate) task: JoinHandle<Result<(), flotilla_gateway::Error>>,
}

impl RunningGateway {
    pub(crate) fn channel(&self) -> Channel {
        flotilla_testkit::channel(self.addr)
    }
    pub(crate) fn async_client(&self) -> AsyncAgentServiceClient<Channel> {
        AsyncAgentServiceClient::new(self.channel())
    }
    pub(crate) fn sync_client(&self) -> SyncAgentServiceClient<Channel> {
        SyncAgentServiceClient::new(self.channel())
    }
    pub(crate) fn metadata_client(&self) -> AgentMetadataServiceClient<Channel> {
        AgentMetadataServiceClient::new(self.channel())
    }
}

pub(crate) fn plugin(name: &str, discovery: String) -> PluginConfig {
    PluginConfig {
        name: name.into(),
        discovery,
        nameserver: None,
        timeout: None,
        timeouts: Default::default(),
        categories: vec![],
    }
}

pub(crate) async fn spawn_gateway(
    plugins: Vec<PluginConfig>,
    tweak: impl FnOnce(&mut GatewayConfig),
) -> RunningGateway {
    let (grpc, admin) = (bind_loopback().await, bind_loopback().await);
    let addr = grpc.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let mut raw = GatewayConfig {
        listen: addr,
        admin_listen: admin_addr,
        refresh_interval: HumanDuration(Duration::from_millis(200)),
        plugins,
        ..GatewayConfig::default()
    };
    tweak(&mut raw);
    let config = Config::validate(raw, vec![]).expect("valid test config");
    let gateway = Gateway::start(config).await.expect("gateway starts");
    let shutdown = Shutdown::new();
    let task = tokio::spawn(gateway.serve(grpc, admin, shutdown.clone()));
    RunningGateway { addr, admin: admin_addr, shutdown, task }
}

pub(crate) fn echo_template(kind: &str, custom: &[(&str, prost_types::value::Kind)]) -> core::TaskTemplate {
    core::TaskTemplate {
        r#type: kind.into(),
        custom: Some(prost_types::Struct {
            fields: custom
                .iter()
                .map(|(k, v)| ((*k).to_owned(), prost_types::Value { kind: Some(v.clone()) }))
                .collect(),
        }),
        ..Default::default()
    }
}

pub(crate) fn inputs(n: i64) -> core::LiteralMap {
    let lit = core::Literal {
        value: Some(core::literal::Value::Scalar(Box::new(core::Scalar {
            value: Some(core::scalar::Value::Primitive(core::Primitive {
                value: Some(core::primitive::Value::Integer(n)),
            })),
        }))),
        ..Default::default()
    };
    core::LiteralMap { literals: [("n".to_owned(), lit)].into() }
}

pub(crate) fn category(name: &str) -> Option<admin::TaskCategory> {
    Some(admin::TaskCategory { name: name.into(), version: 0 })
}
