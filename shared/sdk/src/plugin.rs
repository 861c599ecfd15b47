//! The [`Plugin`] trait: what a plugin author writes.

use std::{fmt, future::Future, time::Instant};

use flotilla_proto::{admin, core};

use crate::PluginError;

/// A task category: `TaskTemplate.type` and `TaskTemplate.task_type_version`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Category {
    /// The task type name, e.g. `bigquery_query_job_task`.
    pub name: String,
    /// The task type version; almost always 0.
    pub version: i32,
}

impl Category {
    /// A category of the given name and version.
    pub fn new(name: impl Into<String>, version: i32) -> Self {
        Self { name: name.into(), version }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} v{}", self.name, self.version)
    }
}

impl From<&admin::TaskCategory> for Category {
    fn from(c: &admin::TaskCategory) -> Self {
        Self::new(c.name.clone(), c.version)
    }
}

impl From<&Category> for admin::TaskCategory {
    fn from(c: &Category) -> Self {
        Self { name: c.name.clone(), version: c.version }
    }
}

/// One agent a plugin carries: its name in `ListAgents`, and the categories it serves.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// Display name, as flytekit's `AgentBase.name` (e.g. "Bigquery Agent").
    pub name: String,
    /// Task categories this agent serves.
    pub categories: Vec<Category>,
    /// Sync agents answer `ExecuteTaskSync`; async ones `CreateTask`/`GetTask`/`DeleteTask`.
    pub is_sync: bool,
}

impl AgentSpec {
    /// An async agent serving `task_type` version 0.
    pub fn asynchronous(name: impl Into<String>, task_type: impl Into<String>) -> Self {
        Self { name: name.into(), categories: vec![Category::new(task_type, 0)], is_sync: false }
    }

    /// A sync agent serving `task_type` version 0.
    pub fn sync(name: impl Into<String>, task_type: impl Into<String>) -> Self {
        Self { name: name.into(), categories: vec![Category::new(task_type, 0)], is_sync: true }
    }

    /// The `flyteidl.admin.Agent` message `ListAgents` answers with. The deprecated
    /// `supported_task_types` is filled too, as flytekit does, for older propellers.
    pub fn to_proto(&self) -> admin::Agent {
        #[allow(deprecated)]
        admin::Agent {
            name: self.name.clone(),
            supported_task_types: self.categories.iter().map(|c| c.name.clone()).collect(),
            is_sync: self.is_sync,
            supported_task_categories: self.categories.iter().map(Into::into).collect(),
        }
    }
}

/// What the SDK knows about the call being served.
#[derive(Clone, Debug)]
pub struct Call {
    /// The category the request was routed by.
    pub category: Category,
    /// When the caller stops waiting (from `grpc-timeout`), if it said.
    pub deadline: Option<Instant>,
    /// The request id carried in `x-request-id` metadata, if any.
    pub request_id: Option<String>,
}

/// A Flyte agent implementation. Implement the methods your agents need; the
/// others answer `UNIMPLEMENTED`. The SDK has already checked that the request's
/// category is one [`Plugin::agents`] declares, and of the right kind (sync/async).
///
/// Plugins must be stateless between calls: everything `get` and `delete` need
/// travels in `resource_meta`, so any replica can answer for a task another created.
///
/// The methods run on the async runtime (on a one-thread runtime, on the task
/// of the caller's connection): they must not block. Waiting on I/O with
/// `.await` is fine; put heavy CPU work in `tokio::task::spawn_blocking`.
pub trait Plugin: Send + Sync + 'static {
    /// The agents this plugin carries. Called once when serving starts.
    fn agents(&self) -> Vec<AgentSpec>;

    /// The plugin's own settings as `--check-config` prints them, one
    /// `(key, value)` per line: where it calls, where its credentials come
    /// from, its budgets. Never a secret's value.
    fn settings(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// Starts a task; the answer's `resource_meta` comes back in `get` and `delete`.
    fn create(
        &self,
        call: &Call,
        request: admin::CreateTaskRequest,
    ) -> impl Future<Output = Result<admin::CreateTaskResponse, PluginError>> + Send {
        let _ = request;
        unimplemented_for(call, "create")
    }

    /// Reports a task's state. Must be quick: propeller's deadline is a few seconds.
    fn get(
        &self,
        call: &Call,
        request: admin::GetTaskRequest,
    ) -> impl Future<Output = Result<admin::Resource, PluginError>> + Send {
        let _ = request;
        unimplemented_for(call, "get")
    }

    /// Cancels a task. Must be idempotent.
    fn delete(
        &self,
        call: &Call,
        request: admin::DeleteTaskRequest,
    ) -> impl Future<Output = Result<(), PluginError>> + Send {
        let _ = request;
        unimplemented_for(call, "delete")
    }

    /// Runs a sync task to a terminal phase and returns it with the outputs inline.
    fn execute(
        &self,
        call: &Call,
        header: admin::CreateRequestHeader,
        inputs: Option<core::LiteralMap>,
    ) -> impl Future<Output = Result<admin::Resource, PluginError>> + Send {
        let _ = (header, inputs);
        unimplemented_for(call, "execute")
    }

    /// Metrics of a running task (`GetTaskMetrics`).
    fn metrics(
        &self,
        call: &Call,
        request: admin::GetTaskMetricsRequest,
    ) -> impl Future<Output = Result<admin::GetTaskMetricsResponse, PluginError>> + Send {
        let _ = request;
        unimplemented_for(call, "metrics")
    }

    /// Log lines of a task (`GetTaskLogs`), answered as a stream of these messages.
    fn logs(
        &self,
        call: &Call,
        request: admin::GetTaskLogsRequest,
    ) -> impl Future<Output = Result<Vec<admin::GetTaskLogsResponse>, PluginError>> + Send {
        let _ = request;
        unimplemented_for(call, "logs")
    }
}

fn unimplemented_for<T: Send>(
    call: &Call,
    what: &str,
) -> impl Future<Output = Result<T, PluginError>> + Send + use<T> {
    let error = PluginError::Unimplemented(format!(
        "the agent for task type {} does not implement {what}",
        call.category
    ));
    std::future::ready(Err(error))
}
