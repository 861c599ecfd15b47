//! Shared by the integration tests: templates as flytekit serializes them, the
//! plugin served on loopback against the fake Databricks workspace.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use flotilla_cloud::{api::ApiSettings, secret::SecretStore};
use flotilla_databricks::{Databricks, Settings};
use flotilla_proto::{
    admin, core,
    service::{
        agent_metadata_service_client::AgentMetadataServiceClient,
        async_agent_service_client::AsyncAgentServiceClient,
    },
};
use flotilla_sdk::telemetry::config::HumanDuration;
use flotilla_testkit::{
    RunningService, channel, fake_http::FakeHttp, fakes::databricks::FakeDatabricks, spawn_plugin,
};
use prost_types::value::Kind;
use serde_json::{Value, json};
use tonic::transport::Channel;

pub const TOKEN: &str = "dapi-0123456789abcdef-test-secret";
pub const INSTANCE: &str = "dbc-test.cloud.databricks.com";
pub const IMAGE: &str = "ghcr.io/acme/spark-task:abc123";

/// A JSON value as a protobuf `Value`, numbers as doubles (as on the wire).
pub fn to_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().expect("finite")),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => {
            Kind::ListValue(prost_types::ListValue { values: a.iter().map(to_value).collect() })
        }
        Value::Object(_) => Kind::StructValue(to_struct(v)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn to_struct(v: &Value) -> prost_types::Struct {
    let Value::Object(m) = v else { panic!("not an object: {v}") };
    prost_types::Struct { fields: m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect() }
}

/// The container args propeller renders for a fast-registered task.
pub fn args() -> Vec<String> {
    [
        "pyflyte-fast-execute",
        "--additional-distribution",
        "s3://bucket/fast/abc.tar.gz",
        "--dest-dir",
        ".",
        "--",
        "pyflyte-execute",
        "--inputs",
        "s3://bucket/metadata/inputs.pb",
        "--output-prefix",
        "s3://bucket/outputs/n0/0",
        "--raw-output-data-prefix",
        "s3://bucket/raw/xy",
        "--resolver",
        "flytekit.core.python_auto_container.default_task_resolver",
        "--",
        "task-module",
        "wf",
        "task-name",
        "hello_spark",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// A template as flytekitplugins-spark 1.16 serializes a Databricks task.
pub fn template(task_type: &str, custom: Value) -> core::TaskTemplate {
    core::TaskTemplate {
        r#type: task_type.to_owned(),
        custom: Some(to_struct(&custom)),
        target: Some(core::task_template::Target::Container(core::Container {
            image: IMAGE.to_owned(),
            args: args(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn classic_custom() -> Value {
    json!({
        "mainApplicationFile": "local:///usr/local/bin/entrypoint.py",
        "sparkConf": { "spark.driver.memory": "1000M" },
        "databricksConf": {
            "run_name": "flytekit databricks plugin example",
            "new_cluster": { "spark_version": "13.3.x-scala2.12", "node_type_id": "m6i.large", "num_workers": 2 },
            "timeout_seconds": 3600,
            "max_retries": 1,
        },
        "databricksInstance": INSTANCE,
    })
}

pub fn execution_metadata(retry: u32) -> admin::TaskExecutionMetadata {
    admin::TaskExecutionMetadata {
        task_execution_id: Some(core::TaskExecutionIdentifier {
            task_id: Some(core::Identifier {
                resource_type: 1,
                project: "flytesnacks".into(),
                domain: "development".into(),
                name: "wf.hello_spark".into(),
                version: "v1".into(),
                ..Default::default()
            }),
            node_execution_id: Some(core::NodeExecutionIdentifier {
                node_id: "n0".into(),
                execution_id: Some(core::WorkflowExecutionIdentifier {
                    project: "flytesnacks".into(),
                    domain: "development".into(),
                    name: "abc123".into(),
                    ..Default::default()
                }),
            }),
            retry_attempt: retry,
        }),
        namespace: "flytesnacks-development".into(),
        ..Default::default()
    }
}

pub fn create_request(task_type: &str, custom: Value) -> admin::CreateTaskRequest {
    admin::CreateTaskRequest {
        template: Some(template(task_type, custom)),
        output_prefix: "s3://bucket/outputs/n0/0".into(),
        task_execution_metadata: Some(execution_metadata(0)),
        ..Default::default()
    }
}

pub fn category(task_type: &str) -> Option<admin::TaskCategory> {
    Some(admin::TaskCategory { name: task_type.into(), version: 0 })
}

#[allow(deprecated)]
pub fn get_request(task_type: &str, meta: &[u8]) -> admin::GetTaskRequest {
    admin::GetTaskRequest {
        task_type: task_type.into(),
        task_category: category(task_type),
        resource_meta: meta.to_vec(),
        ..Default::default()
    }
}

#[allow(deprecated)]
pub fn delete_request(task_type: &str, meta: &[u8]) -> admin::DeleteTaskRequest {
    admin::DeleteTaskRequest {
        task_type: task_type.into(),
        task_category: category(task_type),
        resource_meta: meta.to_vec(),
    }
}

/// Fast retries, so fault-injection tests stay quick.
pub fn quick_api() -> ApiSettings {
    ApiSettings {
        backoff_initial: HumanDuration(Duration::from_millis(10)),
        backoff_max: HumanDuration(Duration::from_millis(50)),
        ..ApiSettings::default()
    }
}

/// A secret store with these environment variables, and an empty directory.
pub fn secrets(vars: &[(&str, &str)], dir: &std::path::Path) -> SecretStore {
    let vars: std::collections::HashMap<String, String> =
        vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    SecretStore::new(dir, move |k| vars.get(k).cloned())
}

/// The plugin in front of a fake workspace.
pub struct Rig {
    pub model: FakeDatabricks,
    pub fake: FakeHttp,
    pub svc: RunningService,
    pub client: AsyncAgentServiceClient<Channel>,
    pub meta_client: AgentMetadataServiceClient<Channel>,
    _dir: tempfile::TempDir,
}

impl Rig {
    pub async fn new() -> Self {
        Self::with(Some(TOKEN), |_| {}).await
    }

    pub async fn with(token: Option<&str>, tweak: impl FnOnce(&mut Settings)) -> Self {
        let vars: Vec<(&str, &str)> =
            token.map(|t| ("FLYTE_DATABRICKS_ACCESS_TOKEN", t)).into_iter().collect();
        Self::with_secrets(&vars, tweak).await
    }

    pub async fn with_secrets(vars: &[(&str, &str)], tweak: impl FnOnce(&mut Settings)) -> Self {
        let model = FakeDatabricks::new(TOKEN);
        let fake = model.start().await;
        let mut settings = Settings { base_url: Some(fake.url()), api: quick_api(), ..Settings::default() };
        tweak(&mut settings);
        let dir = tempfile::tempdir().expect("temp dir");
        let plugin = Databricks::new(settings, secrets(vars, dir.path())).expect("plugin builds");
        let svc = spawn_plugin(plugin).await;
        let client = AsyncAgentServiceClient::new(channel(svc.addr));
        let meta_client = AgentMetadataServiceClient::new(channel(svc.addr));
        Self { model, fake, svc, client, meta_client, _dir: dir }
    }

    pub async fn create(&mut self, task_type: &str, custom: Value) -> Result<Vec<u8>, tonic::Status> {
        self.client.create_task(create_request(task_type, custom)).await.map(|r| r.into_inner().resource_meta)
    }

    pub async fn get(&mut self, meta: &[u8]) -> Result<admin::Resource, tonic::Status> {
        self.client
            .get_task(get_request("spark", meta))
            .await
            .map(|r| r.into_inner().resource.expect("a resource"))
    }

    pub async fn delete(&mut self, meta: &[u8]) -> Result<(), tonic::Status> {
        self.client.delete_task(delete_request("spark", meta)).await.map(|_| ())
    }
}

pub fn phase(r: &admin::Resource) -> core::task_execution::Phase {
    core::task_execution::Phase::try_from(r.phase).expect("a known phase")
}
