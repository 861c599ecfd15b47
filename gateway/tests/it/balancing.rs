//! Balancing and failover across replicas: fail fast with none ready, come
//! back without a restart, retry idempotent calls on another replica, learn
//! routes live.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use flotilla_echo::Echo;
use flotilla_proto::admin;
use flotilla_sdk::{AgentSpec, Call, Plugin, PluginError, ServeOptions};
use flotilla_testkit::{bind_loopback, eventually, metric, spawn_plugin, spawn_plugin_at};
use tonic::Code;

use crate::support::*;

const GET_OK: &str = "flyte_agent_requests_success_total{operation=\"get\",task_type=\"echo\"}";

async fn get(gw: &RunningGateway, meta: &[u8]) -> Result<admin::Resource, tonic::Status> {
    gw.async_client()
        .get_task(admin::GetTaskRequest {
            resource_meta: meta.to_vec(),
            task_category: category("echo"),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().resource.unwrap_or_default())
}

#[tokio::test]
async fn zero_ready_replicas_fail_fast_and_a_returning_replica_is_used_again() {
    let echo = spawn_plugin(Echo::default()).await;
    let addr = echo.addr;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{addr}"))], |c| {
        c.refresh_interval = flotilla_telemetry::config::HumanDuration(Duration::from_millis(300))
    })
    .await;
    let meta = create(&gw).await;
    let state = |s: &str| format!("flotilla_gateway_endpoints{{plugin=\"echo\",state=\"{s}\"}}");
    assert_eq!(
        (metric(gw.admin, &state("ready")).await, metric(gw.admin, &state("ejected")).await),
        (1.0, 0.0)
    );

    echo.shutdown.trigger();
    echo.task.await.unwrap().unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        let err = get(&gw, &meta).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
        assert!(
            err.message().contains("\"echo\"") && err.message().contains(&addr.to_string()),
            "{}",
            err.message()
        );
        assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    }
    eventually("the endpoint gauges to show the replica ejected", Duration::from_secs(5), || async {
        let now = (metric(gw.admin, &state("ready")).await, metric(gw.admin, &state("ejected")).await);
        (now == (0.0, 1.0)).then_some(())
    })
    .await;

    // The replica comes back on the same address: the gateway uses it again, no restart.
    let back = spawn_plugin_at(Echo::default(), addr, ServeOptions::default()).await;
    eventually("the returning replica to serve through the gateway", Duration::from_secs(15), || async {
        get(&gw, &meta).await.ok()
    })
    .await;
    assert!(metric(back.admin, GET_OK).await >= 1.0);
    eventually("the endpoint gauges to show the replica ready again", Duration::from_secs(5), || async {
        (metric(gw.admin, &state("ready")).await == 1.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn idempotent_calls_move_to_another_replica_when_one_goes_away() {
    let a = spawn_plugin(Echo::default()).await;
    let b = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{},{}", a.addr, b.addr))], |_| {}).await;
    let meta = create(&gw).await;
    gets(&gw, &meta, 60).await;
    assert!(
        metric(a.admin, GET_OK).await > 0.0 && metric(b.admin, GET_OK).await > 0.0,
        "both replicas serve"
    );

    a.shutdown.trigger();
    a.task.await.unwrap().unwrap();
    for i in 0..50 {
        let r = get(&gw, &meta).await.unwrap_or_else(|e| panic!("GetTask {i} failed: {e:?}"));
        assert_eq!(r.outputs, Some(inputs(1)));
    }
}

/// A plugin with one async task type, `flaky`.
#[derive(Clone)]
struct Flaky;

impl Plugin for Flaky {
    fn agents(&self) -> Vec<AgentSpec> {
        vec![AgentSpec::asynchronous("Flaky Agent", "flaky")]
    }

    async fn create(
        &self,
        _: &Call,
        _: admin::CreateTaskRequest,
    ) -> Result<admin::CreateTaskResponse, PluginError> {
        Ok(admin::CreateTaskResponse { resource_meta: b"flaky".to_vec() })
    }
}

#[tokio::test]
async fn a_service_started_after_the_gateway_becomes_routable_within_a_refresh() {
    let later = bind_loopback().await.local_addr().unwrap(); // free, nobody listening yet
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(
        vec![plugin("echo", format!("static://{}", echo.addr)), plugin("late", format!("static://{later}"))],
        |c| c.refresh_interval = flotilla_telemetry::config::HumanDuration(Duration::from_millis(300)),
    )
    .await;
    let flaky_create = || async {
        gw.async_client()
            .create_task(admin::CreateTaskRequest {
                template: Some(echo_template("flaky", &[])),
                ..Default::default()
            })
            .await
    };
    // Not NOT_FOUND: the type may be the silent plugin's, so the caller should come back.
    let err = flaky_create().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    let silent = format!("plugin \"late\" (static://{later}) has not answered ListAgents");
    assert!(err.message().contains(&silent), "{}", err.message());
    assert!(err.message().contains("the fleet knows: echo v0, echo_sync v0"), "{}", err.message());

    // Let the gateway fail against the absent service several times (its ejection backs off).
    eventually("failed polls of the absent service", Duration::from_secs(10), || async {
        let failed =
            metric(gw.admin, "flotilla_gateway_route_refreshes_total{plugin=\"late\",result=\"error\"}");
        (failed.await >= 4.0).then_some(())
    })
    .await;
    let _svc = spawn_plugin_at(Flaky, later, ServeOptions::default()).await;
    let started = Instant::now();
    eventually("the late service's task type to route", Duration::from_secs(5), || async {
        flaky_create().await.ok()
    })
    .await;
    // One refresh interval (300 ms), plus a poll, plus scheduling slack.
    assert!(started.elapsed() < Duration::from_millis(1500), "took {:?}", started.elapsed());
    // Echo was never disturbed.
    create(&gw).await;
}

#[tokio::test]
async fn a_service_whose_list_agents_fails_keeps_its_routes_and_others_are_undisturbed() {
    let (addr, recorder) = spawn_recorder().await;
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(
        vec![
            plugin("recorder", format!("static://{addr}")),
            plugin("echo", format!("static://{}", echo.addr)),
        ],
        |_| {},
    )
    .await;
    recorder.failing_list.store(true, Ordering::SeqCst);
    // Wait for polls that fail (refresh is 200 ms in tests), then check the routes survive.
    eventually("failed ListAgents polls", Duration::from_secs(5), || async {
        let failed =
            metric(gw.admin, "flotilla_gateway_route_refreshes_total{plugin=\"recorder\",result=\"error\"}");
        (failed.await >= 2.0).then_some(())
    })
    .await;
    gw.async_client()
        .create_task(admin::CreateTaskRequest {
            template: Some(echo_template("recorder", &[])),
            ..Default::default()
        })
        .await
        .expect("the failing service's last known routes still route");
    create(&gw).await;
    let agents =
        gw.metadata_client().list_agents(admin::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    assert!(agents.iter().any(|a| a.name == "Recorder") && agents.iter().any(|a| a.name == "Echo Agent"));
}
