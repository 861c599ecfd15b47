//! Bearer-token authentication: off by default; when tokens are configured,
//! every call but health checks needs one, a refusal is UNAUTHENTICATED and
//! names nothing secret, and the token does not travel on to the plugin.

use flotilla_proto::admin;
use flotilla_testkit::{frame, raw_call};
use prost::Message;
use tonic::{Code, Request, metadata::MetadataValue};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::*;

const TOKEN: &str = "s3cret-t0ken-for-tests";

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

#[tokio::test]
async fn calls_need_an_accepted_token_when_auth_is_on() {
    let (recorder_addr, recorder) = spawn_recorder().await;
    let gw = spawn_gateway(vec![plugin("rec", format!("static://{recorder_addr}"))], |c| {
        c.auth_token = Some(flotilla_gateway::auth::Secret(TOKEN.to_owned()));
    })
    .await;

    // No token, and a wrong one: refused, naming the header and not the token.
    let mut metadata = gw.metadata_client();
    for request in
        [Request::new(admin::ListAgentsRequest {}), with_token(admin::ListAgentsRequest {}, "guess")]
    {
        let e = metadata.list_agents(request).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("authorization: Bearer"), "{}", e.message());
        assert!(!e.message().contains(TOKEN), "{}", e.message());
    }
    let create =
        || admin::CreateTaskRequest { template: Some(echo_template("recorder", &[])), ..Default::default() };
    let e = gw.async_client().create_task(create()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(recorder.seen.lock().unwrap().is_empty(), "a refused call reached the plugin");

    // The right token: answered; the plugin never sees it.
    let agents = metadata.list_agents(with_token(admin::ListAgentsRequest {}, TOKEN)).await.unwrap();
    assert!(!agents.into_inner().agents.is_empty());
    gw.async_client().create_task(with_token(create(), TOKEN)).await.unwrap();
    let headers = recorder.seen_headers.lock().unwrap().clone();
    assert_eq!(headers.len(), 1);
    assert!(headers[0].get("authorization").is_none(), "{:?}", headers[0]);

    // Health checks (probes) need none.
    let health = HealthClient::new(gw.channel())
        .check(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    // Refusals are counted.
    let (_, metrics) = flotilla_testkit::http_get(gw.admin, "/metrics").await;
    let refused = |method: &str| {
        metrics.lines().any(|l| {
            l.starts_with("flotilla_gateway_requests_total{")
                && l.contains(&format!("method=\"{method}\""))
                && l.contains("code=\"UNAUTHENTICATED\"")
                && l.ends_with(" 2")
        })
    };
    assert!(refused("ListAgents"), "{metrics}");
    gw.shutdown.trigger();
}

#[tokio::test]
async fn with_auth_off_the_header_is_neither_needed_nor_checked() {
    let (recorder_addr, _recorder) = spawn_recorder().await;
    let gw = spawn_gateway(vec![plugin("rec", format!("static://{recorder_addr}"))], |_| {}).await;
    let body = frame(&admin::ListAgentsRequest {}.encode_to_vec());
    let answer = raw_call(gw.addr, "/flyteidl.service.AgentMetadataService/ListAgents", body).await;
    assert_eq!(answer.code, Code::Ok, "{}", answer.message);
    let mut metadata = gw.metadata_client();
    metadata.list_agents(with_token(admin::ListAgentsRequest {}, "anything")).await.unwrap();
    gw.shutdown.trigger();
}
