//! Starting a gateway in front of plugin services, and clients for it.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use prost::Message;
use tonic::{Request, Response, Status, body::Body, server::NamedService};

use flotilla_gateway::{
    Config, Gateway,
    config::{GatewayConfig, PluginConfig},
};
use flotilla_proto::{
    admin, core,
    service::{
        agent_metadata_service_client::AgentMetadataServiceClient,
        agent_metadata_service_server::{AgentMetadataService, AgentMetadataServiceServer},
        async_agent_service_client::AsyncAgentServiceClient,
        sync_agent_service_client::SyncAgentServiceClient,
    },
};
use flotilla_telemetry::{Shutdown, config::HumanDuration};
use flotilla_testkit::{bind_loopback, frame};
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

/// Creates an echo task with `inputs(n)`, reads it back (SUCCEEDED, the inputs
/// as outputs) and deletes it, through `client`.
pub(crate) async fn echo_round_trip(client: &mut AsyncAgentServiceClient<Channel>, n: i64) {
    let created = client
        .create_task(admin::CreateTaskRequest {
            inputs: Some(inputs(n)),
            template: Some(echo_template("echo", &[])),
            ..Default::default()
        })
        .await
        .expect("CreateTask")
        .into_inner();
    let got = client
        .get_task(admin::GetTaskRequest {
            resource_meta: created.resource_meta.clone(),
            task_category: category("echo"),
            ..Default::default()
        })
        .await
        .expect("GetTask")
        .into_inner()
        .resource
        .expect("a resource");
    assert_eq!(got.phase, core::task_execution::Phase::Succeeded as i32);
    assert_eq!(got.outputs, Some(inputs(n)));
    client
        .delete_task(admin::DeleteTaskRequest {
            resource_meta: created.resource_meta,
            task_category: category("echo"),
            ..Default::default()
        })
        .await
        .expect("DeleteTask");
}

/// `n` GetTask calls from 6 concurrent callers, as propeller makes them.
pub(crate) async fn gets(gw: &RunningGateway, meta: &[u8], n: usize) {
    let callers = 6;
    let mut tasks = Vec::new();
    for c in 0..callers {
        let mut client = gw.async_client();
        let meta = meta.to_vec();
        tasks.push(tokio::spawn(async move {
            for i in (c..n).step_by(callers) {
                client
                    .get_task(admin::GetTaskRequest {
                        resource_meta: meta.clone(),
                        task_category: category("echo"),
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("GetTask {i} failed: {e:?}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Creates an echo task (inputs: n = 1) through the gateway and returns its resource_meta.
pub(crate) async fn create(gw: &RunningGateway) -> Vec<u8> {
    create_with(&mut gw.async_client(), 1).await
}

/// Creates an echo task (inputs: n) through `client` and returns its resource_meta.
pub(crate) async fn create_with(client: &mut AsyncAgentServiceClient<Channel>, n: i64) -> Vec<u8> {
    client
        .create_task(admin::CreateTaskRequest {
            inputs: Some(inputs(n)),
            template: Some(echo_template("echo", &[])),
            ..Default::default()
        })
        .await
        .expect("create succeeds")
        .into_inner()
        .resource_meta
}

pub(crate) fn category(name: &str) -> Option<admin::TaskCategory> {
    Some(admin::TaskCategory { name: name.into(), version: 0 })
}

/// A plugin service that records the raw bytes of every AsyncAgentService call
/// and lists one agent serving `recorder` v0.
#[derive(Clone, Default)]
pub(crate) struct Recorder {
    pub(crate) seen: Arc<Mutex<Vec<Bytes>>>,
    /// The headers of every call, in order.
    pub(crate) seen_headers: Arc<Mutex<Vec<http::HeaderMap>>>,
    /// While set, ListAgents answers INTERNAL.
    pub(crate) failing_list: Arc<AtomicBool>,
    /// While set, ListAgents names the task type the way agents from before
    /// task categories did: in the deprecated `supported_task_types` only.
    pub(crate) deprecated_list: Arc<AtomicBool>,
}

impl NamedService for Recorder {
    const NAME: &'static str = "flyteidl.service.AsyncAgentService";
}

impl tower::Service<http::Request<Body>> for Recorder {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let seen = self.seen.clone();
        self.seen_headers.lock().unwrap().push(req.headers().clone());
        Box::pin(async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            seen.lock().unwrap().push(body);
            let answer =
                frame(&admin::CreateTaskResponse { resource_meta: b"recorded".to_vec() }.encode_to_vec());
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let body = http_body_util::Full::new(answer)
                .map_err(|never| match never {})
                .with_trailers(async move { Some(Ok(trailers)) });
            Ok(http::Response::builder()
                .header("content-type", "application/grpc")
                .body(Body::new(body))
                .unwrap())
        })
    }
}

#[tonic::async_trait]
impl AgentMetadataService for Recorder {
    async fn get_agent(
        &self,
        _: Request<admin::GetAgentRequest>,
    ) -> Result<Response<admin::GetAgentResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
    async fn list_agents(
        &self,
        _: Request<admin::ListAgentsRequest>,
    ) -> Result<Response<admin::ListAgentsResponse>, Status> {
        if self.failing_list.load(Ordering::SeqCst) {
            return Err(Status::internal("ListAgents is broken on purpose"));
        }
        let old = self.deprecated_list.load(Ordering::SeqCst);
        #[allow(deprecated)]
        let agent = admin::Agent {
            name: "Recorder".into(),
            supported_task_types: if old { vec!["recorder".into()] } else { vec![] },
            is_sync: false,
            supported_task_categories: if old {
                vec![]
            } else {
                vec![admin::TaskCategory { name: "recorder".into(), version: 0 }]
            },
        };
        Ok(Response::new(admin::ListAgentsResponse { agents: vec![agent] }))
    }
}

pub(crate) async fn spawn_recorder() -> (SocketAddr, Recorder) {
    spawn_recorder_with(Recorder::default()).await
}

pub(crate) async fn spawn_recorder_with(recorder: Recorder) -> (SocketAddr, Recorder) {
    let listener = bind_loopback().await;
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(recorder.clone())
        .add_service(AgentMetadataServiceServer::new(recorder.clone()));
    tokio::spawn(server.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)));
    (addr, recorder)
}

/// The two messages of an ExecuteTaskSync call: the header carrying `template`, then `inputs`.
pub(crate) fn sync_messages(
    template: core::TaskTemplate,
    inputs: core::LiteralMap,
) -> [admin::ExecuteTaskSyncRequest; 2] {
    use admin::execute_task_sync_request::Part;
    let header = admin::CreateRequestHeader { template: Some(template), ..Default::default() };
    [
        admin::ExecuteTaskSyncRequest { part: Some(Part::Header(header)) },
        admin::ExecuteTaskSyncRequest { part: Some(Part::Inputs(inputs)) },
    ]
}
