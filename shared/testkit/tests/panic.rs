//! A plugin method that panics fails its own call, not the connection: a call
//! in flight on the same HTTP/2 connection still gets its answer (both the
//! polled and the spawned way of serving calls).

use std::{sync::Arc, time::Duration};

use flotilla_proto::{admin, service::async_agent_service_client::AsyncAgentServiceClient};
use flotilla_sdk::{AgentSpec, Call, Plugin, PluginError};
use flotilla_testkit::{channel, spawn_plugin};
use tokio::sync::Notify;

#[derive(Default)]
struct Gates {
    /// CreateTask has started and waits for `release`.
    entered: Notify,
    release: Notify,
}

struct Panics(Arc<Gates>);

impl Plugin for Panics {
    fn agents(&self) -> Vec<AgentSpec> {
        vec![AgentSpec::asynchronous("Panicking Agent", "panics")]
    }

    async fn create(
        &self,
        _call: &Call,
        _request: admin::CreateTaskRequest,
    ) -> Result<admin::CreateTaskResponse, PluginError> {
        self.0.entered.notify_one();
        self.0.release.notified().await;
        Ok(admin::CreateTaskResponse { resource_meta: b"kept".to_vec() })
    }

    async fn get(
        &self,
        _call: &Call,
        _request: admin::GetTaskRequest,
    ) -> Result<admin::Resource, PluginError> {
        panic!("a plugin bug");
    }
}

async fn a_panic_fails_only_its_call() {
    let plugin = Arc::new(Gates::default());
    let svc = spawn_plugin(Panics(plugin.clone())).await;
    let mut agent = AsyncAgentServiceClient::new(channel(svc.addr)); // one HTTP/2 connection
    let create = admin::CreateTaskRequest {
        template: Some(flotilla_proto::core::TaskTemplate { r#type: "panics".into(), ..Default::default() }),
        ..Default::default()
    };
    let mut in_flight = agent.clone();
    let pending = tokio::spawn(async move { in_flight.create_task(create).await });
    tokio::time::timeout(Duration::from_secs(10), plugin.entered.notified())
        .await
        .expect("CreateTask started");

    let get = admin::GetTaskRequest {
        task_category: Some(admin::TaskCategory { name: "panics".into(), version: 0 }),
        ..Default::default()
    };
    let failed = agent.get_task(get).await.expect_err("the plugin panicked");
    assert_ne!(failed.code(), tonic::Code::Ok);

    plugin.release.notify_one();
    let created = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("CreateTask answered in time")
        .expect("the task did not panic")
        .expect("the call in flight beside the panic succeeds");
    assert_eq!(created.into_inner().resource_meta, b"kept");
}

#[tokio::test]
async fn polled_calls() {
    a_panic_fails_only_its_call().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_calls() {
    a_panic_fails_only_its_call().await;
}
