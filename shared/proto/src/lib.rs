//! Flotilla's wire protocol: the Rust code generated from our own `.proto`
//! files under `proto/`, which are written to be wire-identical to flyteidl
//! 1.16.8 for everything reachable from the three agent services
//! (`tests/descriptors.rs` proves it against the upstream PyPI package).
//!
//! The module tree mirrors the protobuf packages: [`flyteidl::admin`] holds the
//! request and response messages, [`flyteidl::core`] the task template and
//! literal types, [`flyteidl::service`] the generated tonic clients and servers.
//! Well-known types come from `prost-types`.

#![allow(missing_docs)]

/// Generated code, one module per protobuf package.
pub mod flyteidl {
    /// `flyteidl.admin`: agent requests, responses and metadata.
    #[allow(clippy::all, unreachable_pub, rust_2018_idioms, deprecated)]
    pub mod admin {
        tonic::include_proto!("flyteidl.admin");
    }
    /// `flyteidl.core`: templates, literals, types and identifiers.
    #[allow(clippy::all, unreachable_pub, rust_2018_idioms, deprecated)]
    pub mod core {
        tonic::include_proto!("flyteidl.core");
    }
    /// `flyteidl.service`: tonic clients and servers for the three agent services.
    #[allow(clippy::all, unreachable_pub, rust_2018_idioms, deprecated)]
    pub mod service {
        tonic::include_proto!("flyteidl.service");
    }
}

pub mod codec;

pub use flyteidl::{admin, core, service};

/// The serialized `FileDescriptorSet` of our `.proto` files, as compiled for this crate.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/flotilla_descriptor.bin"));

/// Full gRPC method paths, as they appear in HTTP/2 `:path` headers.
pub mod paths {
    /// `AsyncAgentService/CreateTask`.
    pub const CREATE_TASK: &str = "/flyteidl.service.AsyncAgentService/CreateTask";
    /// `AsyncAgentService/GetTask`.
    pub const GET_TASK: &str = "/flyteidl.service.AsyncAgentService/GetTask";
    /// `AsyncAgentService/DeleteTask`.
    pub const DELETE_TASK: &str = "/flyteidl.service.AsyncAgentService/DeleteTask";
    /// `AsyncAgentService/GetTaskMetrics`.
    pub const GET_TASK_METRICS: &str = "/flyteidl.service.AsyncAgentService/GetTaskMetrics";
    /// `AsyncAgentService/GetTaskLogs` (server streaming).
    pub const GET_TASK_LOGS: &str = "/flyteidl.service.AsyncAgentService/GetTaskLogs";
    /// `SyncAgentService/ExecuteTaskSync` (bidirectional streaming).
    pub const EXECUTE_TASK_SYNC: &str = "/flyteidl.service.SyncAgentService/ExecuteTaskSync";
    /// `AgentMetadataService/GetAgent`.
    pub const GET_AGENT: &str = "/flyteidl.service.AgentMetadataService/GetAgent";
    /// `AgentMetadataService/ListAgents`.
    pub const LIST_AGENTS: &str = "/flyteidl.service.AgentMetadataService/ListAgents";
    /// `grpc.health.v1.Health/Check`.
    pub const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
}
