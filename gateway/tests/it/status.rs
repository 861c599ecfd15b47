//! The status-code contract (ARCHITECTURE.md), as the gateway answers it.

use std::time::{Duration, Instant};

use flotilla_echo::Echo;
use flotilla_proto::{admin, core, paths};
use flotilla_testkit::{bind_loopback, frame, raw_call, spawn_plugin};
use prost_types::value::Kind;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn a_body_that_is_not_protobuf_is_invalid_argument_and_the_gateway_keeps_serving() {
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |_| {}).await;
    for path in [paths::CREATE_TASK, paths::GET_TASK, paths::DELETE_TASK] {
        let answer = raw_call(gw.addr, path, frame(b"\xff\xff\xff\xff\x0f")).await;
        assert_eq!(answer.code, Code::InvalidArgument, "{path}: {}", answer.message);
        assert!(answer.message.contains("not a valid"), "{}", answer.message);
    }
    // A body that is not even one gRPC frame.
    let answer = raw_call(gw.addr, paths::CREATE_TASK, bytes::Bytes::from_static(b"\0\0\0")).await;
    assert_eq!(answer.code, Code::InvalidArgument, "{}", answer.message);
    gw.metadata_client().list_agents(admin::ListAgentsRequest {}).await.unwrap();
}

#[tokio::test]
async fn the_gateways_own_services_answer_a_malformed_body_with_invalid_argument_too() {
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |_| {}).await;
    for addr in [gw.addr, echo.addr] {
        for path in [paths::LIST_AGENTS, paths::GET_AGENT, paths::HEALTH_CHECK] {
            let answer = raw_call(addr, path, frame(b"\xff\xff\xff\xff\x0f")).await;
            assert_eq!(answer.code, Code::InvalidArgument, "{addr}{path}: {}", answer.message);
            // No message at all is not one message of the type either.
            let answer = raw_call(addr, path, bytes::Bytes::new()).await;
            assert_eq!(answer.code, Code::InvalidArgument, "{addr}{path} (empty): {}", answer.message);
        }
        // And a good one still answers.
        let answer = raw_call(addr, paths::HEALTH_CHECK, frame(b"")).await;
        assert_eq!(answer.code, Code::Ok, "{addr}: {}", answer.message);
    }
}

#[tokio::test]
async fn an_oversized_request_is_resource_exhausted_naming_size_and_limit() {
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |c| {
        c.max_request_bytes = 4096
    })
    .await;
    let big = admin::CreateTaskRequest {
        template: Some(echo_template("echo", &[("pad", Kind::StringValue("x".repeat(10_000)))])),
        ..Default::default()
    };
    let err = gw.async_client().create_task(big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("limit of 4096 bytes"), "{}", err.message());
    gw.async_client()
        .create_task(admin::CreateTaskRequest {
            template: Some(echo_template("echo", &[])),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn the_size_limit_holds_for_the_gateways_own_services_too() {
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |c| {
        c.max_request_bytes = 4096
    })
    .await;
    // An unknown field of 10,000 bytes (field 15, length-delimited) in each request.
    let mut padded = vec![0x7a, 0x90, 0x4e];
    padded.extend(std::iter::repeat_n(b'x', 10_000));
    for path in [paths::LIST_AGENTS, paths::GET_AGENT, paths::HEALTH_CHECK] {
        let answer = raw_call(gw.addr, path, frame(&padded)).await;
        assert_eq!(answer.code, Code::ResourceExhausted, "{path}: {}", answer.message);
        assert!(answer.message.contains("4096"), "{path}: {}", answer.message);
    }
    // Under the limit, an unknown field is skipped as protobuf says.
    let mut small = vec![0x7a, 90];
    small.extend(std::iter::repeat_n(b'x', 90));
    let answer = raw_call(gw.addr, paths::LIST_AGENTS, frame(&small)).await;
    assert_eq!(answer.code, Code::Ok, "{}", answer.message);
}

#[tokio::test]
async fn an_unreachable_plugin_is_unavailable_naming_it() {
    // A port that was free a moment ago and has nobody listening.
    let closed = bind_loopback().await.local_addr().unwrap();
    let mut p = plugin("ghost", format!("static://{closed}"));
    p.categories = vec!["ghost:0".into()];
    let gw = spawn_gateway(vec![p], |_| {}).await;
    let started = Instant::now();
    let err = gw
        .async_client()
        .create_task(admin::CreateTaskRequest {
            template: Some(echo_template("ghost", &[])),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains("\"ghost\""), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn the_route_timeout_caps_a_slow_call_with_deadline_exceeded() {
    let echo = spawn_plugin(Echo::default()).await;
    let mut p = plugin("echo", format!("static://{}", echo.addr));
    p.timeout = Some(flotilla_telemetry::config::HumanDuration(Duration::from_millis(200)));
    let gw = spawn_gateway(vec![p], |_| {}).await;
    let header = admin::ExecuteTaskSyncRequest {
        part: Some(admin::execute_task_sync_request::Part::Header(admin::CreateRequestHeader {
            template: Some(echo_template("echo_sync", &[("duration_ms", Kind::NumberValue(5000.0))])),
            ..Default::default()
        })),
    };
    let started = Instant::now();
    let err = gw.sync_client().execute_task_sync(tokio_stream::iter([header])).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    // Whose deadline it was: the plugin's timeout in the gateway's configuration, not the caller's.
    assert!(
        err.message().contains("the timeout the gateway sets for this plugin of 200ms"),
        "{}",
        err.message()
    );
}

/// A caller that sends its ExecuteTaskSync header and then nothing: the call
/// ends when the deadline does, the caller's or the gateway's, not when the
/// caller gets round to sending the rest.
#[tokio::test]
async fn a_request_still_arriving_when_the_deadline_passes_ends_then() {
    use tokio_stream::StreamExt as _;
    let echo = spawn_plugin(Echo::default()).await;
    let header = || admin::ExecuteTaskSyncRequest {
        part: Some(admin::execute_task_sync_request::Part::Header(admin::CreateRequestHeader {
            template: Some(echo_template("echo_sync", &[])),
            ..Default::default()
        })),
    };
    let stalled = || tokio_stream::iter([header()]).chain(tokio_stream::pending());

    // The gateway's timeout for the plugin; the caller sets none.
    let mut p = plugin("echo", format!("static://{}", echo.addr));
    p.timeout = Some(flotilla_telemetry::config::HumanDuration(Duration::from_millis(300)));
    let gw = spawn_gateway(vec![p], |_| {}).await;
    let started = Instant::now();
    let err = gw.sync_client().execute_task_sync(stalled()).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(
        err.message().contains("the timeout the gateway sets for ExecuteTaskSync calls of 300ms passed while the request was still arriving"),
        "{}",
        err.message()
    );

    // The caller's deadline, with no timeout in the gateway's configuration:
    // a bare HTTP/2 client, which sends `grpc-timeout` but does not enforce it.
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |_| {}).await;
    let socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(socket).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(paths::EXECUTE_TASK_SYNC)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(())
        .unwrap();
    let (answer, mut stream) = client.send_request(request, false).unwrap();
    stream.send_data(frame(&prost::Message::encode_to_vec(&header())), false).unwrap();
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(5), answer).await.expect("an answer").unwrap();
    let status = tonic::Status::from_header_map(answer.headers()).expect("a trailers-only answer");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{}", status.message());
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(
        status
            .message()
            .contains("the caller's deadline of 300ms passed while the request was still arriving"),
        "{}",
        status.message()
    );
    drop(stream);
    // Counted as a call answered before a plugin was chosen.
    let (_, metrics) = flotilla_testkit::http_get(gw.admin, "/metrics").await;
    assert!(
        metrics.contains(r#"flotilla_gateway_requests_total{code="DEADLINE_EXCEEDED",method="ExecuteTaskSync",plugin="none"} 1"#),
        "{metrics}"
    );
}

/// A plugin whose `create` never finishes, and says when its call is dropped.
#[derive(Clone)]
struct Stuck {
    started: std::sync::Arc<tokio::sync::Notify>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

struct SetOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl flotilla_sdk::Plugin for Stuck {
    fn agents(&self) -> Vec<flotilla_sdk::AgentSpec> {
        vec![flotilla_sdk::AgentSpec::asynchronous("Stuck Agent", "stuck")]
    }

    async fn create(
        &self,
        _: &flotilla_sdk::Call,
        _: admin::CreateTaskRequest,
    ) -> Result<admin::CreateTaskResponse, flotilla_sdk::PluginError> {
        let _guard = SetOnDrop(self.dropped.clone());
        self.started.notify_one();
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_client_that_gives_up_cancels_the_call_at_the_plugin() {
    let stuck = Stuck { started: Default::default(), dropped: Default::default() };
    let service = spawn_plugin(stuck.clone()).await;
    let gw = spawn_gateway(vec![plugin("stuck", format!("static://{}", service.addr))], |_| {}).await;
    // The connection stays up (this channel outlives the call), so only the
    // call's stream is reset, not the whole connection.
    let channel = gw.channel();
    let mut client =
        flotilla_proto::service::async_agent_service_client::AsyncAgentServiceClient::new(channel.clone());
    let call = tokio::spawn(async move {
        client
            .create_task(admin::CreateTaskRequest {
                inputs: Some(inputs(1)),
                template: Some(echo_template("stuck", &[])),
                ..Default::default()
            })
            .await
    });
    tokio::time::timeout(Duration::from_secs(5), stuck.started.notified())
        .await
        .expect("the call reaches the plugin");
    assert!(!stuck.dropped.load(std::sync::atomic::Ordering::SeqCst));
    // The client gives up: its stream is reset (RST_STREAM), and the gateway
    // must reset its own stream to the plugin in turn.
    call.abort();
    flotilla_testkit::eventually("the plugin's call to be dropped", Duration::from_secs(5), || async {
        stuck.dropped.load(std::sync::atomic::Ordering::SeqCst).then_some(())
    })
    .await;
    flotilla_testkit::eventually(
        "the gateway to count no call in flight",
        Duration::from_secs(5),
        || async {
            let (_, metrics) = flotilla_testkit::http_get(gw.admin, "/metrics").await;
            metrics.contains("flotilla_gateway_in_flight_requests 0").then_some(())
        },
    )
    .await;
    // And it is counted as the caller saw it end: CANCELLED, under the plugin it was routed to.
    let (_, metrics) = flotilla_testkit::http_get(gw.admin, "/metrics").await;
    let cancelled = metrics.lines().any(|l| {
        l.starts_with("flotilla_gateway_requests_total{")
            && l.contains("plugin=\"stuck\"")
            && l.contains("method=\"CreateTask\"")
            && l.contains("code=\"CANCELLED\"")
            && l.ends_with(" 1")
    });
    assert!(cancelled, "no CANCELLED CreateTask counted for plugin stuck:\n{metrics}");
    // The same connection still serves.
    flotilla_proto::service::agent_metadata_service_client::AgentMetadataServiceClient::new(channel)
        .list_agents(admin::ListAgentsRequest {})
        .await
        .expect("the connection survives the reset of one of its streams");
}

/// A plugin whose external system is down: GetTask answers UNAVAILABLE with the
/// plugin's own message, and counts the calls it got.
#[derive(Clone, Default)]
struct Outage {
    gets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl flotilla_sdk::Plugin for Outage {
    fn agents(&self) -> Vec<flotilla_sdk::AgentSpec> {
        vec![flotilla_sdk::AgentSpec::asynchronous("Outage Agent", "outage")]
    }

    async fn get(
        &self,
        _: &flotilla_sdk::Call,
        _: admin::GetTaskRequest,
    ) -> Result<admin::Resource, flotilla_sdk::PluginError> {
        self.gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err(flotilla_sdk::PluginError::Unavailable("the warehouse answered 503 backendError".into()))
    }
}

async fn get_outage(gw: &RunningGateway) -> tonic::Status {
    gw.async_client()
        .get_task(admin::GetTaskRequest { task_category: category("outage"), ..Default::default() })
        .await
        .expect_err("the plugin answers UNAVAILABLE")
}

#[tokio::test]
async fn a_plugins_own_unavailable_reaches_the_caller_and_ejects_nobody() {
    let outage = Outage::default();
    let service = spawn_plugin(outage.clone()).await;
    let gw = spawn_gateway(vec![plugin("outage", format!("static://{}", service.addr))], |_| {}).await;
    for n in 1..=5 {
        let err = get_outage(&gw).await;
        assert_eq!(err.code(), Code::Unavailable, "call {n}: {}", err.message());
        assert_eq!(err.message(), "the warehouse answered 503 backendError", "call {n}");
    }
    // One replica: nowhere else to retry, and the plugin already retried its API.
    assert_eq!(outage.gets.load(std::sync::atomic::Ordering::SeqCst), 5);
    assert_eq!(
        flotilla_testkit::metric(gw.admin, "flotilla_gateway_ejections_total{plugin=\"outage\"}").await,
        0.0
    );
}

/// A replica of the same plugin whose external system is up, and slower to
/// answer than the one whose system is down: peak-EWMA prefers the fast one.
#[derive(Clone)]
struct Healthy;

impl flotilla_sdk::Plugin for Healthy {
    fn agents(&self) -> Vec<flotilla_sdk::AgentSpec> {
        Outage::default().agents()
    }

    async fn get(
        &self,
        _: &flotilla_sdk::Call,
        _: admin::GetTaskRequest,
    ) -> Result<admin::Resource, flotilla_sdk::PluginError> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(flotilla_sdk::resource::succeeded(None))
    }
}

#[tokio::test]
async fn an_unavailable_answer_is_retried_on_another_ready_replica() {
    let outage = Outage::default();
    let down = spawn_plugin(outage.clone()).await;
    let up = spawn_plugin(Healthy).await;
    let gw =
        spawn_gateway(vec![plugin("outage", format!("static://{},{}", down.addr, up.addr))], |_| {}).await;
    // The replica that answers UNAVAILABLE answers fastest, so the balancer
    // prefers it once it has tried both; each such answer must be retried on
    // the other, and the caller never sees it. Calls go on (bounded) until the
    // failing replica, the odd one out beside a healthy peer, is ejected.
    let ejections =
        || flotilla_testkit::metric(gw.admin, "flotilla_gateway_ejections_total{plugin=\"outage\"}");
    let mut calls = 0;
    while ejections().await < 1.0 {
        assert!(calls < 500, "{calls} calls and the failing replica was never ejected");
        let answer = gw
            .async_client()
            .get_task(admin::GetTaskRequest { task_category: category("outage"), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("call {calls}: {e:?}"));
        assert_eq!(
            answer.into_inner().resource.map(|r| r.phase),
            Some(core::task_execution::Phase::Succeeded as i32)
        );
        calls += 1;
    }
    let retries = flotilla_testkit::metric(
        gw.admin,
        "flotilla_gateway_retries_total{method=\"GetTask\",plugin=\"outage\",reason=\"unavailable\"}",
    )
    .await;
    let gets = outage.gets.load(std::sync::atomic::Ordering::SeqCst);
    assert!(gets >= 3, "ejected after {gets} UNAVAILABLE answers, not three in a row");
    assert_eq!(retries, gets as f64, "every UNAVAILABLE answer was retried once, elsewhere");
}

/// Every family ARCHITECTURE.md lists is on a fresh gateway's `/metrics`,
/// each plugin's counters at zero, before any call or failure.
#[tokio::test]
async fn every_metric_family_is_exported_from_the_start() {
    // A plugin nobody listens for: no call is made and no lookup fails (static discovery).
    let addr = bind_loopback().await.local_addr().unwrap();
    let gw = spawn_gateway(vec![plugin("ghost", format!("static://{addr}"))], |_| {}).await;
    let (_, metrics) = flotilla_testkit::http_get(gw.admin, "/metrics").await;
    for family in [
        "flotilla_gateway_requests_total counter",
        "flotilla_gateway_request_duration_seconds histogram",
        "flotilla_gateway_in_flight_requests gauge",
        "flotilla_gateway_endpoints gauge",
        "flotilla_gateway_discovery_refreshes_total counter",
        "flotilla_gateway_discovery_errors_total counter",
        "flotilla_gateway_discovery_changes_total counter",
        "flotilla_gateway_ejections_total counter",
        "flotilla_gateway_route_refreshes_total counter",
        "flotilla_gateway_retries_total counter",
    ] {
        assert!(metrics.contains(&format!("# TYPE {family}\n")), "no {family} in:\n{metrics}");
    }
    for sample in [
        r#"flotilla_gateway_discovery_errors_total{plugin="ghost"} 0"#,
        r#"flotilla_gateway_retries_total{method="GetTask",plugin="ghost",reason="unavailable"} 0"#,
        r#"flotilla_gateway_retries_total{method="CreateTask",plugin="ghost",reason="connect"} 0"#,
    ] {
        assert!(metrics.lines().any(|l| l == sample), "no {sample} in:\n{metrics}");
    }
}

#[tokio::test]
async fn a_burst_of_cancelled_calls_ends_only_those_calls_not_the_connection() {
    // A client that starts many calls and cancels them at once (RST_STREAM
    // right after HEADERS), while another call on the same connection runs.
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |_| {}).await;
    let sync_body = || {
        let header = admin::ExecuteTaskSyncRequest {
            part: Some(admin::execute_task_sync_request::Part::Header(admin::CreateRequestHeader {
                template: Some(echo_template("echo_sync", &[("duration_ms", Kind::NumberValue(300.0))])),
                ..Default::default()
            })),
        };
        let inputs = admin::ExecuteTaskSyncRequest {
            part: Some(admin::execute_task_sync_request::Part::Inputs(inputs(1))),
        };
        let mut body = frame(&prost::Message::encode_to_vec(&header)).to_vec();
        body.extend_from_slice(&frame(&prost::Message::encode_to_vec(&inputs)));
        bytes::Bytes::from(body)
    };
    let request = |path: &str| {
        http::Request::post(path)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    };
    for (who, addr) in [("gateway", gw.addr), ("echo", echo.addr)] {
        let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(socket).await.unwrap();
        tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let (answer, mut stream) = client.send_request(request(paths::EXECUTE_TASK_SYNC), false).unwrap();
        stream.send_data(sync_body(), true).unwrap();
        // 200 calls started and cancelled without yielding: they leave in one burst.
        for _ in 0..200 {
            client = client.ready().await.unwrap();
            let (_, mut cancelled) = client.send_request(request(paths::GET_TASK), false).unwrap();
            cancelled.send_reset(h2::Reason::CANCEL);
        }
        let answer = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .unwrap_or_else(|_| panic!("{who}: an answer within 10 s"))
            .unwrap_or_else(|e| panic!("{who}: the call in flight was ended with its connection: {e}"));
        let (parts, mut body) = answer.into_parts();
        assert_eq!(parts.status, 200, "{who}");
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap_or_else(|e| panic!("{who}: {e}"));
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.unwrap_or_else(|e| panic!("{who}: {e}")).expect("trailers");
        let status = tonic::Status::from_header_map(&trailers).expect("a grpc-status");
        assert_eq!(status.code(), Code::Ok, "{who}: {}", status.message());
        // The connection still takes calls.
        let client = client.ready().await.unwrap_or_else(|e| panic!("{who}: the connection ended: {e}"));
        drop(client);
    }
}
