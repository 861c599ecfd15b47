//! The requests the load generator sends: what propeller would send for a
//! real task. A full `TaskTemplate` (identifier, interface, custom struct,
//! container with resources and environment, metadata with runtime, timeout
//! and retries), a `LiteralMap` of a few primitives, and optionally one
//! string input of a given size to show what payload size costs.
//!
//! Every message is built once; workers clone it per call, as a client that
//! builds its requests would.

use std::collections::HashMap;

use flotilla_proto::{
    admin,
    core::{
        self, Container, Identifier, KeyValuePair, Literal, LiteralMap, LiteralType, Primitive, Resources,
        RetryStrategy, RuntimeMetadata, Scalar, TaskMetadata, TaskTemplate, TypedInterface, Variable,
        VariableMap, literal, literal_type, primitive, resources, scalar,
    },
};
use prost_types::{Struct, Value, value::Kind};

/// Where the outputs would go; no target reads it.
const OUTPUT_PREFIX: &str = "s3://flotilla-bench/metadata/propeller/bench-exec/n0/data/0";
/// The name of the padding input.
pub const PADDING_INPUT: &str = "padding";

/// The task types and the optional padding the requests carry.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    /// Task type of the async agent (`echo` on every target).
    pub task_type: String,
    /// Task type of the sync agent (`echo_sync` on every target).
    pub sync_task_type: String,
    /// Size of an extra string input, 0 for none.
    pub payload_bytes: usize,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self { task_type: "echo".to_owned(), sync_task_type: "echo_sync".to_owned(), payload_bytes: 0 }
    }
}

/// Prebuilt requests for every scenario.
#[derive(Clone, Debug)]
pub struct Workload {
    /// What this workload was built from.
    pub spec: WorkloadSpec,
    /// CreateTask for the async task type.
    pub create: admin::CreateTaskRequest,
    /// The first message of ExecuteTaskSync for the sync task type.
    pub sync_header: admin::ExecuteTaskSyncRequest,
    /// The second message of ExecuteTaskSync: the inputs.
    pub sync_inputs: admin::ExecuteTaskSyncRequest,
    /// The inputs, which every echo answers as its outputs.
    pub inputs: LiteralMap,
}

impl Workload {
    /// Builds every request once.
    pub fn new(spec: WorkloadSpec) -> Self {
        let inputs = inputs(spec.payload_bytes);
        let create = admin::CreateTaskRequest {
            inputs: Some(inputs.clone()),
            template: Some(template(&spec.task_type, spec.payload_bytes)),
            output_prefix: OUTPUT_PREFIX.to_owned(),
            task_execution_metadata: Some(execution_metadata(&spec.task_type)),
        };
        let sync_header = admin::ExecuteTaskSyncRequest {
            part: Some(admin::execute_task_sync_request::Part::Header(admin::CreateRequestHeader {
                template: Some(template(&spec.sync_task_type, spec.payload_bytes)),
                output_prefix: OUTPUT_PREFIX.to_owned(),
                task_execution_metadata: Some(execution_metadata(&spec.sync_task_type)),
                max_dataset_size_bytes: 0,
            })),
        };
        let sync_inputs = admin::ExecuteTaskSyncRequest {
            part: Some(admin::execute_task_sync_request::Part::Inputs(inputs.clone())),
        };
        Self { spec, create, sync_header, sync_inputs, inputs }
    }

    /// The async task type as a `TaskCategory`.
    pub fn category(&self) -> admin::TaskCategory {
        admin::TaskCategory { name: self.spec.task_type.clone(), version: 0 }
    }

    /// GetTask for a task whose CreateTask answered `resource_meta`.
    pub fn get(&self, resource_meta: Vec<u8>) -> admin::GetTaskRequest {
        admin::GetTaskRequest {
            resource_meta,
            task_category: Some(self.category()),
            output_prefix: OUTPUT_PREFIX.to_owned(),
            ..Default::default()
        }
    }

    /// DeleteTask for a task whose CreateTask answered `resource_meta`.
    pub fn delete(&self, resource_meta: Vec<u8>) -> admin::DeleteTaskRequest {
        admin::DeleteTaskRequest { resource_meta, task_category: Some(self.category()), ..Default::default() }
    }
}

fn prim(value: primitive::Value) -> Literal {
    Literal {
        value: Some(literal::Value::Scalar(Box::new(Scalar {
            value: Some(scalar::Value::Primitive(Primitive { value: Some(value) })),
        }))),
        ..Default::default()
    }
}

/// An int, a float, a string and a bool, plus the padding string when asked.
fn inputs(payload_bytes: usize) -> LiteralMap {
    let mut literals = HashMap::from([
        ("count".to_owned(), prim(primitive::Value::Integer(42))),
        ("ratio".to_owned(), prim(primitive::Value::FloatValue(0.75))),
        ("label".to_owned(), prim(primitive::Value::StringValue("flotilla-bench".to_owned()))),
        ("dry_run".to_owned(), prim(primitive::Value::Boolean(false))),
    ]);
    if payload_bytes > 0 {
        // A repeating printable pattern: every target stores it as text (JSON, base64).
        let padding: String =
            b"0123456789abcdef".iter().cycle().take(payload_bytes).map(|&b| b as char).collect();
        literals.insert(PADDING_INPUT.to_owned(), prim(primitive::Value::StringValue(padding)));
    }
    LiteralMap { literals }
}

fn simple(t: core::SimpleType) -> Variable {
    Variable {
        r#type: Some(LiteralType {
            r#type: Some(literal_type::Type::Simple(t as i32)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn interface(payload_bytes: usize) -> TypedInterface {
    let mut variables = HashMap::from([
        ("count".to_owned(), simple(core::SimpleType::Integer)),
        ("ratio".to_owned(), simple(core::SimpleType::Float)),
        ("label".to_owned(), simple(core::SimpleType::String)),
        ("dry_run".to_owned(), simple(core::SimpleType::Boolean)),
    ]);
    if payload_bytes > 0 {
        variables.insert(PADDING_INPUT.to_owned(), simple(core::SimpleType::String));
    }
    let map = VariableMap { variables };
    TypedInterface { inputs: Some(map.clone()), outputs: Some(map) }
}

fn string(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_owned())) }
}

fn number(n: f64) -> Value {
    Value { kind: Some(Kind::NumberValue(n)) }
}

/// Plugin options as flytekit plugins serialize them (no key the echo agents act on).
fn custom() -> Struct {
    let nested = Struct {
        fields: [("region".to_owned(), string("us-east-1")), ("max_retries".to_owned(), number(5.0))].into(),
    };
    Struct {
        fields: [
            ("warehouse".to_owned(), string("bench_wh")),
            ("priority".to_owned(), number(3.0)),
            ("cache".to_owned(), Value { kind: Some(Kind::BoolValue(true)) }),
            ("connection".to_owned(), Value { kind: Some(Kind::StructValue(nested)) }),
        ]
        .into(),
    }
}

fn entry(name: resources::ResourceName, value: &str) -> resources::ResourceEntry {
    resources::ResourceEntry { name: name as i32, value: value.to_owned() }
}

fn container() -> Container {
    let args = [
        "pyflyte-execute",
        "--inputs",
        "{{.input}}",
        "--output-prefix",
        "{{.outputPrefix}}",
        "--raw-output-data-prefix",
        "{{.rawOutputDataPrefix}}",
        "--resolver",
        "flytekit.core.python_auto_container.default_task_resolver",
        "--",
        "task-module",
        "bench.tasks",
        "task-name",
        "bench_task",
    ];
    Container {
        image: "ghcr.io/flyteorg/flytekit:py3.11-1.16.31".to_owned(),
        args: args.iter().map(|&a| a.to_owned()).collect(),
        resources: Some(Resources {
            requests: vec![
                entry(resources::ResourceName::Cpu, "500m"),
                entry(resources::ResourceName::Memory, "1Gi"),
            ],
            limits: vec![
                entry(resources::ResourceName::Cpu, "1"),
                entry(resources::ResourceName::Memory, "2Gi"),
            ],
        }),
        env: vec![
            KeyValuePair {
                key: "FLYTE_INTERNAL_IMAGE".to_owned(),
                value: "ghcr.io/flyteorg/flytekit".to_owned(),
            },
            KeyValuePair { key: "BENCH_MODE".to_owned(), value: "closed-loop".to_owned() },
        ],
        ..Default::default()
    }
}

fn task_id(task_type: &str) -> Identifier {
    Identifier {
        resource_type: core::ResourceType::Task as i32,
        project: "flotilla".to_owned(),
        domain: "bench".to_owned(),
        name: format!("bench.tasks.{task_type}"),
        version: "v1".to_owned(),
        org: String::new(),
    }
}

fn template(task_type: &str, payload_bytes: usize) -> TaskTemplate {
    TaskTemplate {
        id: Some(task_id(task_type)),
        r#type: task_type.to_owned(),
        task_type_version: 0,
        metadata: Some(TaskMetadata {
            runtime: Some(RuntimeMetadata {
                r#type: core::runtime_metadata::RuntimeType::FlyteSdk as i32,
                version: "1.16.31".to_owned(),
                flavor: "python".to_owned(),
            }),
            timeout: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
            retries: Some(RetryStrategy { retries: 3 }),
            discoverable: true,
            discovery_version: "1".to_owned(),
            ..Default::default()
        }),
        interface: Some(interface(payload_bytes)),
        custom: Some(custom()),
        target: Some(core::task_template::Target::Container(container())),
        ..Default::default()
    }
}

fn execution_metadata(task_type: &str) -> admin::TaskExecutionMetadata {
    admin::TaskExecutionMetadata {
        task_execution_id: Some(core::TaskExecutionIdentifier {
            task_id: Some(task_id(task_type)),
            node_execution_id: Some(core::NodeExecutionIdentifier {
                node_id: "n0".to_owned(),
                execution_id: Some(core::WorkflowExecutionIdentifier {
                    project: "flotilla".to_owned(),
                    domain: "bench".to_owned(),
                    name: "bench-exec".to_owned(),
                    org: String::new(),
                }),
            }),
            retry_attempt: 0,
        }),
        namespace: "flotilla-bench".to_owned(),
        labels: HashMap::from([("team".to_owned(), "bench".to_owned())]),
        k8s_service_account: "default".to_owned(),
        max_attempts: 4,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn padding_sets_the_request_size() {
        let small = Workload::new(WorkloadSpec::default());
        let big = Workload::new(WorkloadSpec { payload_bytes: 65536, ..WorkloadSpec::default() });
        let grown = big.create.encoded_len() - small.create.encoded_len();
        assert!((65536..65536 + 256).contains(&grown), "grew by {grown}");
        assert_eq!(small.inputs.literals.len(), 4);
        assert!(big.inputs.literals.contains_key(PADDING_INPUT));
    }
}
