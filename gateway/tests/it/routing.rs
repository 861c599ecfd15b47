//! Routing: calls reach the plugin that serves their task type, with their bytes untouched.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use flotilla_echo::Echo;
use flotilla_proto::{
    admin,
    service::agent_metadata_service_server::{AgentMetadataService, AgentMetadataServiceServer},
};
use flotilla_testkit::{bind_loopback, frame, raw_call, spawn_plugin};
use http_body_util::BodyExt;
use prost::Message;
use tonic::{Code, Request, Response, Status, body::Body, server::NamedService};

use crate::support::*;

#[tokio::test]
async fn echo_round_trip_through_the_gateway() {
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |_| {}).await;
    let mut client = gw.async_client();
    let created = client
        .create_task(admin::CreateTaskRequest {
            inputs: Some(inputs(5)),
            template: Some(echo_template("echo", &[])),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = client
        .get_task(admin::GetTaskRequest {
            resource_meta: created.resource_meta.clone(),
            task_category: category("echo"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .resource
        .unwrap();
    assert_eq!(got.phase, flotilla_proto::core::task_execution::Phase::Succeeded as i32);
    assert_eq!(got.outputs, Some(inputs(5)));
    client
        .delete_task(admin::DeleteTaskRequest {
            resource_meta: created.resource_meta,
            task_category: category("echo"),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn unknown_task_type_is_not_found_naming_it_and_the_known_ones() {
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |_| {}).await;
    let err = gw
        .async_client()
        .create_task(admin::CreateTaskRequest {
            template: Some(echo_template("teleport", &[])),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("\"teleport\""), "{}", err.message());
    assert!(err.message().contains("echo v0"), "{}", err.message());
}

/// A plugin service that records the raw bytes of every AsyncAgentService call
/// and lists one agent serving `recorder` v0.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Bytes>>>,
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
        #[allow(deprecated)]
        let agent = admin::Agent {
            name: "Recorder".into(),
            supported_task_types: vec![],
            is_sync: false,
            supported_task_categories: vec![admin::TaskCategory { name: "recorder".into(), version: 0 }],
        };
        Ok(Response::new(admin::ListAgentsResponse { agents: vec![agent] }))
    }
}

async fn spawn_recorder() -> (SocketAddr, Recorder) {
    let recorder = Recorder::default();
    let listener = bind_loopback().await;
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(recorder.clone())
        .add_service(AgentMetadataServiceServer::new(recorder.clone()));
    tokio::spawn(server.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)));
    (addr, recorder)
}

#[tokio::test]
async fn unknown_fields_reach_the_plugin_untouched() {
    let (addr, recorder) = spawn_recorder().await;
    let gw = spawn_gateway(vec![plugin("recorder", format!("static://{addr}"))], |_| {}).await;

    // A template carrying field 4242 (unknown to flyteidl 1.16.8), inside a request carrying field 99.
    let mut template = flotilla_testkit::encode(&echo_template("recorder", &[]));
    template.extend_from_slice(&[0x92, 0x89, 0x02, 5, b'f', b'u', b't', b'u', b'r']);
    let mut request = Vec::new();
    request.push(0x12); // field 2 (template), length-delimited
    request.push(u8::try_from(template.len()).unwrap());
    request.extend_from_slice(&template);
    request.extend_from_slice(&[0x9a, 0x06, 3, b'n', b'e', b'w']);
    let sent = frame(&request);

    let answer = raw_call(gw.addr, flotilla_proto::paths::CREATE_TASK, sent.clone()).await;
    assert_eq!(answer.code, Code::Ok, "{}", answer.message);
    assert_eq!(
        admin::CreateTaskResponse::decode(answer.messages[0].clone()).unwrap().resource_meta,
        b"recorded"
    );
    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(seen, vec![sent], "the plugin must receive the exact bytes the client sent");
}

#[tokio::test]
async fn list_and_get_agent_answer_for_the_whole_fleet() {
    let echo = spawn_plugin(Echo::default()).await;
    let (addr, _recorder) = spawn_recorder().await;
    let gw = spawn_gateway(
        vec![
            plugin("echo", format!("static://{}", echo.addr)),
            plugin("recorder", format!("static://{addr}")),
        ],
        |_| {},
    )
    .await;
    let mut client = gw.metadata_client();
    let agents = client.list_agents(admin::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    let mut names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["Echo Agent", "Echo Sync Agent", "Recorder"]);
    let got =
        client.get_agent(admin::GetAgentRequest { name: "Recorder".into() }).await.unwrap().into_inner();
    assert_eq!(got.agent.unwrap().supported_task_categories[0].name, "recorder");
    let err = client.get_agent(admin::GetAgentRequest { name: "Nobody".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("Nobody"));
}

#[tokio::test]
async fn a_category_claimed_twice_routes_to_the_first_and_is_reported() {
    let first = spawn_plugin(Echo::default()).await;
    let second = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(
        vec![
            plugin("first", format!("static://{}", first.addr)),
            plugin("second", format!("static://{}", second.addr)),
        ],
        |_| {},
    )
    .await;
    let (status, metrics) = flotilla_testkit::http_get(gw.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("flotilla_gateway_route_conflicts 2"), "{metrics}");
    // Calls still route (to the first), and ListAgents shows each agent once.
    let agents =
        gw.metadata_client().list_agents(admin::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    assert_eq!(agents.len(), 2);
    gw.async_client()
        .create_task(admin::CreateTaskRequest {
            template: Some(echo_template("echo", &[])),
            ..Default::default()
        })
        .await
        .unwrap();
    let (_, first_metrics) = flotilla_testkit::http_get(first.admin, "/metrics").await;
    assert!(
        first_metrics
            .contains("flyte_agent_requests_success_total{operation=\"create\",task_type=\"echo\"} 1"),
        "{first_metrics}"
    );
}
