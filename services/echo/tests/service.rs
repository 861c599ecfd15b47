//! The echo plugin served by the SDK, checked over real gRPC on 127.0.0.1:
//! the status-code contract, health, metrics, and graceful shutdown.

use std::time::Duration;

use flotilla_echo::Echo;
use flotilla_proto::{
    admin, paths,
    service::{
        async_agent_service_client::AsyncAgentServiceClient,
        sync_agent_service_client::SyncAgentServiceClient,
    },
};
use flotilla_sdk::ServeOptions;
use flotilla_testkit::{channel, frame, http_get, raw_call, spawn_plugin, spawn_plugin_with};
use prost_types::value::Kind;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn template(kind: &str, custom: &[(&str, Kind)]) -> flotilla_proto::core::TaskTemplate {
    flotilla_proto::core::TaskTemplate {
        r#type: kind.into(),
        custom: Some(prost_types::Struct {
            fields: custom
                .iter()
                .map(|(k, v)| ((*k).into(), prost_types::Value { kind: Some(v.clone()) }))
                .collect(),
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn health_answers_serving() {
    let svc = spawn_plugin(Echo::default()).await;
    let mut health = HealthClient::new(channel(svc.addr));
    for service in ["", "flyteidl.service.AsyncAgentService"] {
        let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    assert_eq!(http_get(svc.admin, "/livez").await.0, 200);
    assert_eq!(http_get(svc.admin, "/readyz").await.0, 200);
    assert_eq!(http_get(svc.admin, "/nope").await.0, 404);
}

/// Health watchers learn that the server stops (NOT_SERVING, then the end of
/// the stream; a watch of a name the server does not report, SERVICE_UNKNOWN
/// and then the end) and never hold the shutdown for its grace.
#[tokio::test]
async fn health_watches_end_when_the_server_stops_without_holding_it() {
    use tokio_stream::StreamExt as _;
    let grace = Duration::from_secs(30);
    let svc =
        spawn_plugin_with(Echo::default(), ServeOptions { shutdown_grace: grace, ..Default::default() })
            .await;
    let mut health = HealthClient::new(channel(svc.addr));
    let watch = |service: &str| HealthCheckRequest { service: service.into() };
    let mut known = health.watch(watch("")).await.unwrap().into_inner();
    let mut unknown = health.watch(watch("nope")).await.unwrap().into_inner();
    assert_eq!(known.next().await.unwrap().unwrap().status, ServingStatus::Serving as i32);
    assert_eq!(unknown.next().await.unwrap().unwrap().status, ServingStatus::ServiceUnknown as i32);

    let started = std::time::Instant::now();
    svc.shutdown.trigger();
    let known: Vec<i32> =
        tokio::time::timeout(Duration::from_secs(5), known.map(|a| a.unwrap().status).collect())
            .await
            .expect("the watch ends");
    assert_eq!(known, [ServingStatus::NotServing as i32]);
    let unknown: Vec<_> = tokio::time::timeout(Duration::from_secs(5), unknown.collect::<Vec<_>>())
        .await
        .expect("the watch of an unknown name ends");
    assert!(unknown.is_empty(), "{unknown:?}");
    tokio::time::timeout(Duration::from_secs(5), svc.task).await.expect("serve returns").unwrap().unwrap();
    assert!(started.elapsed() < grace, "the shutdown waited {:?}", started.elapsed());
}

#[tokio::test]
async fn the_status_contract_holds() {
    let svc =
        spawn_plugin_with(Echo::default(), ServeOptions { max_request_bytes: 2048, ..Default::default() })
            .await;
    let mut client = AsyncAgentServiceClient::new(channel(svc.addr));
    let unknown = client
        .create_task(admin::CreateTaskRequest { template: Some(template("warp", &[])), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(unknown.message().contains("\"warp\""), "{}", unknown.message());

    let wrong_kind = client
        .create_task(admin::CreateTaskRequest {
            template: Some(template("echo_sync", &[])),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // INTERNAL, as flytekit answers a CreateTask for a sync agent.
    assert_eq!(wrong_kind.code(), Code::Internal);
    assert!(wrong_kind.message().contains("ExecuteTaskSync"), "{}", wrong_kind.message());

    let mistyped = client
        .create_task(admin::CreateTaskRequest {
            template: Some(template("echo", &[("duration_ms", Kind::StringValue("soon".into()))])),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(mistyped.code(), Code::InvalidArgument);
    assert!(mistyped.message().contains("custom.duration_ms"), "{}", mistyped.message());

    let garbage = raw_call(svc.addr, paths::CREATE_TASK, frame(b"\xff\xff\xff\xff\x0f")).await;
    assert_eq!(garbage.code, Code::InvalidArgument, "{}", garbage.message);
    assert!(garbage.message.contains("CreateTaskRequest"), "{}", garbage.message);

    // The compressed flag set with no grpc-encoding to read it by: INTERNAL, as the gRPC protocol has it.
    let mut compressed = frame(b"").to_vec();
    compressed[0] = 1;
    let answer = raw_call(svc.addr, paths::GET_TASK, compressed.clone().into()).await;
    assert_eq!(answer.code, Code::Internal, "{}", answer.message);
    assert!(answer.message.contains("grpc-encoding"), "{}", answer.message);
    // An encoding the service does not read: UNIMPLEMENTED, naming those it does.
    let answer = flotilla_testkit::raw_call_with(
        svc.addr,
        paths::GET_TASK,
        &[("grpc-encoding", "zstd")],
        compressed.into(),
    )
    .await;
    assert_eq!(answer.code, Code::Unimplemented, "{}", answer.message);
    assert!(answer.message.contains("gzip"), "{}", answer.message);

    // Two messages in a unary request body.
    let mut two = frame(b"").to_vec();
    two.extend_from_slice(&frame(b""));
    let two = raw_call(svc.addr, paths::GET_TASK, two.into()).await;
    assert_eq!(two.code, Code::InvalidArgument, "{}", two.message);
    assert!(two.message.contains("exactly one message"), "{}", two.message);

    let big = client
        .create_task(admin::CreateTaskRequest {
            template: Some(template("echo", &[("pad", Kind::StringValue("y".repeat(5000)))])),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(big.code(), Code::ResourceExhausted);
    assert!(big.message().contains("limit of 2048 bytes"), "{}", big.message());

    let no_key = client.get_task(admin::GetTaskRequest::default()).await.unwrap_err();
    assert_eq!(no_key.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn every_task_type_has_its_series_before_its_first_call() {
    let svc = spawn_plugin(Echo::default()).await;
    let (status, text) = http_get(svc.admin, "/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "flyte_agent_requests_success_total{operation=\"create\",task_type=\"echo\"} 0",
        "flyte_agent_requests_success_total{operation=\"get\",task_type=\"echo\"} 0",
        "flyte_agent_requests_success_total{operation=\"delete\",task_type=\"echo\"} 0",
        "flyte_agent_requests_success_total{operation=\"do\",task_type=\"echo_sync\"} 0",
        "flyte_agent_request_latency_seconds_count{operation=\"do\",task_type=\"echo_sync\"} 0",
        "flyte_agent_input_literal_bytes_count{task_type=\"echo\"} 0",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    assert!(!text.contains("operation=\"do\",task_type=\"echo\""), "{text}");
    // Input sizes are CreateTask's (as flytekit observes them): no series for a sync type.
    assert!(!text.contains("input_literal_bytes_count{task_type=\"echo_sync\"}"), "{text}");
}

#[tokio::test]
async fn flytekit_metric_names_are_exported() {
    let svc = spawn_plugin(Echo::default()).await;
    let mut client = AsyncAgentServiceClient::new(channel(svc.addr));
    client
        .create_task(admin::CreateTaskRequest { template: Some(template("echo", &[])), ..Default::default() })
        .await
        .unwrap();
    let _ = client
        .create_task(admin::CreateTaskRequest { template: Some(template("nope", &[])), ..Default::default() })
        .await;
    let (status, text) = http_get(svc.admin, "/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "flyte_agent_requests_success_total{operation=\"create\",task_type=\"echo\"} 1",
        "flyte_agent_requests_failure_total{error_code=\"404\",operation=\"create\",task_type=\"nope\"} 1",
        "flyte_agent_request_latency_seconds_count{operation=\"create\",task_type=\"echo\"} 1",
        // flytekit's types: summaries (a count and a sum, no quantiles).
        "# TYPE flyte_agent_request_latency_seconds summary",
        "flyte_agent_request_latency_seconds_sum{operation=\"create\",task_type=\"echo\"} ",
        "# TYPE flyte_agent_input_literal_bytes summary",
        "flyte_agent_input_literal_bytes_count{task_type=\"echo\"} 1",
        // Flotilla's own: both calls answered, none in flight.
        "# TYPE flotilla_service_in_flight_requests gauge",
        "\nflotilla_service_in_flight_requests 0\n",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

#[tokio::test]
async fn shutdown_finishes_the_call_in_flight_then_stops() {
    let svc = spawn_plugin(Echo::default()).await;
    let mut client = SyncAgentServiceClient::new(channel(svc.addr));
    let header = admin::ExecuteTaskSyncRequest {
        part: Some(admin::execute_task_sync_request::Part::Header(admin::CreateRequestHeader {
            // Long enough for the drain's checks below, which take milliseconds.
            template: Some(template("echo_sync", &[("duration_ms", Kind::NumberValue(2000.0))])),
            ..Default::default()
        })),
    };
    let inputs = admin::ExecuteTaskSyncRequest {
        part: Some(admin::execute_task_sync_request::Part::Inputs(Default::default())),
    };
    let call = tokio::spawn(async move {
        let mut s = client.execute_task_sync(tokio_stream::iter([header, inputs])).await?.into_inner();
        s.message().await
    });
    // The call is in flight once the whole request is read, just before the plugin runs.
    flotilla_testkit::eventually("the call to reach the plugin", Duration::from_secs(5), || async {
        let (_, text) = http_get(svc.admin, "/metrics").await;
        text.contains("\nflotilla_service_in_flight_requests 1\n").then_some(())
    })
    .await;
    // flytekit counts input sizes at CreateTask only: not for a sync call.
    let (_, text) = http_get(svc.admin, "/metrics").await;
    assert!(!text.contains("flyte_agent_input_literal_bytes_count{task_type=\"echo_sync\"}"), "{text}");
    svc.shutdown.trigger();
    // Through the drain the admin listener still answers: not ready, and the metrics scrape.
    flotilla_testkit::eventually("/readyz to answer 503", Duration::from_secs(5), || async {
        (http_get(svc.admin, "/readyz").await.0 == 503).then_some(())
    })
    .await;
    let (status, text) = http_get(svc.admin, "/metrics").await;
    assert!(status == 200 && text.contains("\nflotilla_service_in_flight_requests 1\n"), "{status}: {text}");
    let answer = call.await.unwrap().expect("the in-flight call completes").expect("one answer");
    assert!(answer.res.is_some());
    tokio::time::timeout(Duration::from_secs(5), svc.task).await.expect("serve returns").unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(svc.addr).await.is_err(), "still accepting after shutdown");
    assert!(
        tokio::net::TcpStream::connect(svc.admin).await.is_err(),
        "admin still accepting after the drain"
    );
}

/// The framed header and inputs of an ExecuteTaskSync call for `task_type`.
fn sync_start(task_type: &str) -> Vec<u8> {
    use admin::execute_task_sync_request::Part;
    use prost::Message as _;
    let message = |part: Part| frame(&admin::ExecuteTaskSyncRequest { part: Some(part) }.encode_to_vec());
    let header = message(Part::Header(admin::CreateRequestHeader {
        template: Some(template(task_type, &[])),
        ..Default::default()
    }));
    let inputs = message(Part::Inputs(flotilla_proto::core::LiteralMap::default()));
    [header, inputs].concat()
}

#[tokio::test]
async fn execute_task_sync_answers_an_open_stream_and_reads_the_rest_without_a_reset() {
    let svc = spawn_plugin(Echo::default()).await;
    // A client that reads the answer before closing its side, then sends more
    // (upstream's server ignores it) and closes: never reset.
    for (task_type, code) in [("echo_sync", Code::Ok), ("nope", Code::NotFound)] {
        let extra = frame(b"\x12\x00");
        let seen = flotilla_testkit::call_before_closing(
            svc.addr,
            paths::EXECUTE_TASK_SYNC,
            sync_start(task_type).into(),
            extra,
        )
        .await;
        assert_eq!(seen.answer.code, code, "{task_type}: {}", seen.answer.message);
        assert_eq!(seen.answer.messages.len(), usize::from(code == Code::Ok), "{task_type}");
        assert_eq!(
            seen.reset, None,
            "{task_type}: the server reset a stream the client was still sending on"
        );
        assert!(seen.sent_after, "{task_type}");
    }
}

#[tokio::test]
async fn execute_task_sync_reads_its_stream_in_order() {
    use admin::execute_task_sync_request::Part;
    use prost::Message as _;
    let svc = spawn_plugin(Echo::default()).await;
    let message =
        |part: Part| frame(&admin::ExecuteTaskSyncRequest { part: Some(part) }.encode_to_vec()).to_vec();
    let header = || {
        message(Part::Header(admin::CreateRequestHeader {
            template: Some(template("echo_sync", &[])),
            ..Default::default()
        }))
    };
    let inputs = || message(Part::Inputs(flotilla_proto::core::LiteralMap::default()));
    let stream = |parts: &[Vec<u8>]| parts.concat();

    let ok = raw_call(svc.addr, paths::EXECUTE_TASK_SYNC, stream(&[header(), inputs()]).into()).await;
    assert_eq!(ok.code, Code::Ok, "{}", ok.message);
    let answer = admin::ExecuteTaskSyncResponse::decode(ok.messages[0].clone()).unwrap();
    assert!(matches!(answer.res, Some(admin::execute_task_sync_response::Res::Header(_))), "{answer:?}");

    for (parts, code, needle) in [
        (vec![inputs(), header()], Code::InvalidArgument, "must be the header"),
        (vec![header(), header()], Code::InvalidArgument, "more than one header"),
        (vec![], Code::InvalidArgument, "no complete gRPC message"),
    ] {
        let answer = raw_call(svc.addr, paths::EXECUTE_TASK_SYNC, stream(&parts).into()).await;
        assert_eq!(answer.code, code, "{}", answer.message);
        assert!(answer.message.contains(needle), "{needle:?} not in {:?}", answer.message);
    }
    // Like upstream's server, only the header and the inputs are read as messages: what
    // follows is read to the end of the stream and dropped.
    let extra =
        raw_call(svc.addr, paths::EXECUTE_TASK_SYNC, stream(&[header(), inputs(), inputs()]).into()).await;
    assert_eq!(extra.code, Code::Ok, "{}", extra.message);
    assert_eq!(extra.messages.len(), 1);
    // A stream cut inside its second message.
    let whole = stream(&[header(), inputs()]);
    let cut = whole[..whole.len() - 1].to_vec();
    let answer = raw_call(svc.addr, paths::EXECUTE_TASK_SYNC, cut.into()).await;
    assert_eq!(answer.code, Code::InvalidArgument, "{}", answer.message);
    assert!(answer.message.contains("inside its message 2"), "{}", answer.message);
}

/// A plugin service with `tls_cert_file`/`tls_key_file` (ServeOptions::tls)
/// serves its agent services and health over TLS, as a propeller set to
/// `insecure: false` dials it.
#[tokio::test]
async fn a_service_with_tls_serves_over_tls() {
    let ca = flotilla_testkit::tls::TestCa::new();
    let files = ca.issue("echo");
    let tls = flotilla_sdk::tls::ServerTls::load(&files.cert, &files.key).unwrap();
    let svc = spawn_plugin_with(Echo::default(), ServeOptions { tls: Some(tls), ..Default::default() }).await;

    let mut health = HealthClient::new(ca.channel(svc.addr));
    let r = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(r.status, ServingStatus::Serving as i32);

    use admin::execute_task_sync_request::Part;
    let header = admin::ExecuteTaskSyncRequest {
        part: Some(Part::Header(admin::CreateRequestHeader {
            template: Some(template("echo_sync", &[])),
            ..Default::default()
        })),
    };
    let inputs = admin::ExecuteTaskSyncRequest { part: Some(Part::Inputs(Default::default())) };
    let mut sync = SyncAgentServiceClient::new(ca.channel(svc.addr));
    let mut answers =
        sync.execute_task_sync(tokio_stream::iter([header, inputs])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    let Some(admin::execute_task_sync_response::Res::Header(h)) = answer.res else { panic!("{answer:?}") };
    assert_eq!(
        h.resource.expect("a resource").phase,
        flotilla_proto::core::task_execution::Phase::Succeeded as i32
    );

    // Plaintext gets nothing on the TLS port.
    let plain =
        HealthClient::new(channel(svc.addr)).check(HealthCheckRequest { service: String::new() }).await;
    assert!(plain.is_err(), "{plain:?}");
}
