//! The three `flyteidl.service` gRPC services over a [`Plugin`]: resolve the
//! category, check it is served and of the right kind, call the plugin,
//! record flytekit's metrics, and turn errors into statuses.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, LazyLock},
    time::Instant,
};

use flotilla_proto::{
    admin::{self, execute_task_sync_request::Part},
    service::{
        agent_metadata_service_server::AgentMetadataService, async_agent_service_server::AsyncAgentService,
    },
};
use futures_util::Stream;
use tonic::{
    Request, Response, Status,
    metadata::{Ascii, MetadataKey, MetadataMap},
};

use crate::{
    AgentSpec, Call, Category, Plugin, PluginError,
    metrics::{AgentMetrics, InFlight, Operation},
    wire::parse_grpc_timeout,
};

/// The metadata keys read on every call, made once (a `&str` key is parsed on
/// each lookup): the request id the gateway carries to the service, and the deadline.
static REQUEST_ID_KEY: LazyLock<MetadataKey<Ascii>> =
    LazyLock::new(|| MetadataKey::from_static("x-request-id"));
static GRPC_TIMEOUT_KEY: LazyLock<MetadataKey<Ascii>> =
    LazyLock::new(|| MetadataKey::from_static("grpc-timeout"));

/// Which agent serves each category; built once from [`Plugin::agents`].
pub(crate) struct Table {
    agents: Vec<AgentSpec>,
    by_category: HashMap<Category, usize>,
}

impl Table {
    /// # Errors
    /// Names every category two agents both claim, and every agent without a category.
    pub(crate) fn new(agents: Vec<AgentSpec>) -> Result<Self, String> {
        let mut by_category = HashMap::new();
        let mut problems = Vec::new();
        for (i, agent) in agents.iter().enumerate() {
            if agent.categories.is_empty() {
                problems.push(format!("agent {:?} declares no task category", agent.name));
            }
            for c in &agent.categories {
                if let Some(j) = by_category.insert(c.clone(), i) {
                    problems.push(format!(
                        "task type {c} is claimed by both {:?} and {:?}",
                        agents[j].name, agent.name
                    ));
                }
            }
        }
        if problems.is_empty() { Ok(Self { agents, by_category }) } else { Err(problems.join("; ")) }
    }

    fn known(&self) -> String {
        let mut all: Vec<String> = self.by_category.keys().map(ToString::to_string).collect();
        all.sort();
        all.join(", ")
    }

    /// The agent for `category`, which must be of the wanted kind. The wrong
    /// kind is INTERNAL, as flytekit answers it (its servicer raises, and any
    /// exception but an unknown task type is INTERNAL: PROTOCOL.md §3.5),
    /// with a message that says which call to make instead.
    fn resolve(&self, category: &Category, want_sync: bool) -> Result<&AgentSpec, Status> {
        let Some(&i) = self.by_category.get(category) else {
            return Err(Status::not_found(format!(
                "no agent serves task type {} version {}; this service knows: {}",
                crate::wire::Quoted(&category.name),
                category.version,
                self.known()
            )));
        };
        let agent = &self.agents[i];
        match (agent.is_sync, want_sync) {
            (true, false) => Err(Status::internal(format!(
                "task type {category} is served by the sync agent {:?}: call ExecuteTaskSync",
                agent.name
            ))),
            (false, true) => Err(Status::internal(format!(
                "task type {category} is served by the async agent {:?}: call CreateTask",
                agent.name
            ))),
            _ => Ok(agent),
        }
    }
}

/// Serves the agent services for one plugin.
pub(crate) struct Services<P> {
    plugin: Arc<P>,
    table: Arc<Table>,
    metrics: AgentMetrics,
}

impl<P> Clone for Services<P> {
    fn clone(&self) -> Self {
        Self { plugin: self.plugin.clone(), table: self.table.clone(), metrics: self.metrics.clone() }
    }
}

impl<P: Plugin> Services<P> {
    pub(crate) fn new(plugin: Arc<P>, table: Table, metrics: AgentMetrics) -> Self {
        Self { plugin, table: Arc::new(table), metrics }
    }

    /// Resolves the agent, calls `f`, records the outcome under `op` (flytekit's
    /// metrics, when the method has them), and logs one line per call: at `debug`
    /// when it succeeded, at `info` when not, with the caller's request id.
    async fn instrumented<T, Fut>(
        &self,
        method: &'static str,
        op: Option<Operation>,
        category: Result<Category, Status>,
        want_sync: bool,
        metadata: &MetadataMap,
        f: impl FnOnce(Call) -> Fut,
    ) -> Result<T, Status>
    where
        Fut: Future<Output = Result<T, PluginError>>,
    {
        let started = Instant::now();
        let _in_flight = InFlight::enter(&self.metrics.in_flight);
        let category = match category {
            Ok(c) => c,
            Err(status) => {
                log_call(request_id(metadata), method, None, Some(&status), started);
                return Err(status);
            }
        };
        let result = match self.table.resolve(&category, want_sync) {
            Ok(_) => {
                let call = call_for(category.clone(), metadata, started);
                let unfinished = Unfinished { metadata, method, category: &category, started };
                let result = f(call).await.map_err(Status::from);
                std::mem::forget(unfinished); // finished: logged below
                result
            }
            Err(status) => Err(status),
        };
        if let Some(op) = op {
            let code = result.as_ref().err().map(Status::code);
            self.metrics.observe(&category.name, op, started.elapsed().as_secs_f64(), code);
        }
        log_call(request_id(metadata), method, Some(&category), result.as_ref().err(), started);
        result
    }
}

/// A plugin call on its way. Dropped before it finishes, the call was given
/// up: by the caller (it reset the stream or closed the connection), by the
/// server when the caller's deadline passed, or by a stop whose grace ran
/// out. It is logged, as a finished call is, with the code the caller saw;
/// not counted in the `flyte_agent_*` metrics, as upstream's server does not
/// count it either. It holds only references: nothing is copied per call.
///
/// The deadline's timer started when the request arrived, before its body was
/// read and before `started`: a body that took longer than
/// [`crate::wire::DEADLINE_MARGIN`] to arrive makes a call the deadline ended
/// read as CANCELLED here (the caller still gets DEADLINE_EXCEEDED).
struct Unfinished<'a> {
    metadata: &'a MetadataMap,
    method: &'static str,
    category: &'a Category,
    started: Instant,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return; // reported by the panic hook (and its stream reset)
        }
        let deadline = self.metadata.get(&*GRPC_TIMEOUT_KEY).and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let status = crate::wire::unanswered(deadline, self.started);
        log_call(request_id(self.metadata), self.method, Some(self.category), Some(&status), self.started);
    }
}

/// The caller's request id (`x-request-id`), if it sent a readable one.
pub(crate) fn request_id(metadata: &MetadataMap) -> Option<&str> {
    metadata.get(&*REQUEST_ID_KEY).and_then(|v| v.to_str().ok())
}

/// One line per finished call: `debug` when it succeeded, `info` when not.
/// The fields match the gateway's line for the same call (same `request_id`).
pub(crate) fn log_call(
    request_id: Option<&str>,
    method: &str,
    category: Option<&Category>,
    error: Option<&Status>,
    started: Instant,
) {
    let request_id = request_id.unwrap_or("");
    let task_type = category.map_or("", |c| c.name.as_str());
    match error {
        None => tracing::debug!(
            request_id,
            method,
            task_type,
            code = "OK",
            duration_us = started.elapsed().as_micros() as u64,
            "Call served"
        ),
        Some(status) => tracing::info!(
            request_id,
            method,
            task_type,
            code = crate::wire::code_name(status.code()),
            duration_us = started.elapsed().as_micros() as u64,
            error = status.message(),
            "Call failed"
        ),
    }
}

fn call_for(category: Category, metadata: &MetadataMap, started: Instant) -> Call {
    let deadline = metadata
        .get(&*GRPC_TIMEOUT_KEY)
        .and_then(|v| parse_grpc_timeout(v.as_bytes()))
        .and_then(|d| started.checked_add(d));
    let request_id = request_id(metadata).map(str::to_owned);
    Call { category, deadline, request_id }
}

/// The category Get/Delete/Metrics/Logs address: `task_category`, else the deprecated `task_type` at version 0.
fn addressed(category: Option<&admin::TaskCategory>, task_type: &str) -> Result<Category, Status> {
    match category {
        Some(c) if !c.name.is_empty() => Ok(c.into()),
        _ if !task_type.is_empty() => Ok(Category::new(task_type, 0)),
        _ => Err(Status::invalid_argument("task_category (or the deprecated task_type) is required")),
    }
}

fn template_category(template: Option<&flotilla_proto::core::TaskTemplate>) -> Result<Category, Status> {
    match template {
        Some(t) if !t.r#type.is_empty() => Ok(Category::new(t.r#type.clone(), t.task_type_version)),
        Some(_) => Err(Status::invalid_argument("template.type is required")),
        None => Err(Status::invalid_argument("template is required")),
    }
}

#[tonic::async_trait]
impl<P: Plugin> AsyncAgentService for Services<P> {
    async fn create_task(
        &self,
        request: Request<admin::CreateTaskRequest>,
    ) -> Result<Response<admin::CreateTaskResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let category = template_category(req.template.as_ref());
        if let Ok(category) = &category {
            // Like flytekit: every create is observed, one without inputs as 0 bytes.
            self.metrics
                .input_bytes(&category.name, req.inputs.as_ref().map_or(0, prost::Message::encoded_len));
        }
        let plugin = self.plugin.clone();
        self.instrumented(
            "CreateTask",
            Some(Operation::Create),
            category,
            false,
            &metadata,
            |call| async move { plugin.create(&call, req).await },
        )
        .await
        .map(Response::new)
    }

    async fn get_task(
        &self,
        request: Request<admin::GetTaskRequest>,
    ) -> Result<Response<admin::GetTaskResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        #[allow(deprecated)]
        let category = addressed(req.task_category.as_ref(), &req.task_type);
        let plugin = self.plugin.clone();
        let resource = self
            .instrumented("GetTask", Some(Operation::Get), category, false, &metadata, |call| async move {
                plugin.get(&call, req).await
            })
            .await?;
        Ok(Response::new(admin::GetTaskResponse { resource: Some(resource) }))
    }

    async fn delete_task(
        &self,
        request: Request<admin::DeleteTaskRequest>,
    ) -> Result<Response<admin::DeleteTaskResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        #[allow(deprecated)]
        let category = addressed(req.task_category.as_ref(), &req.task_type);
        let plugin = self.plugin.clone();
        self.instrumented(
            "DeleteTask",
            Some(Operation::Delete),
            category,
            false,
            &metadata,
            |call| async move { plugin.delete(&call, req).await },
        )
        .await?;
        Ok(Response::new(admin::DeleteTaskResponse {}))
    }

    async fn get_task_metrics(
        &self,
        request: Request<admin::GetTaskMetricsRequest>,
    ) -> Result<Response<admin::GetTaskMetricsResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        #[allow(deprecated)]
        let category = addressed(req.task_category.as_ref(), &req.task_type);
        let plugin = self.plugin.clone();
        self.instrumented("GetTaskMetrics", None, category, false, &metadata, |call| async move {
            plugin.metrics(&call, req).await
        })
        .await
        .map(Response::new)
    }

    type GetTaskLogsStream =
        Pin<Box<dyn Stream<Item = Result<admin::GetTaskLogsResponse, Status>> + Send + 'static>>;

    async fn get_task_logs(
        &self,
        request: Request<admin::GetTaskLogsRequest>,
    ) -> Result<Response<Self::GetTaskLogsStream>, Status> {
        let (metadata, _, req) = request.into_parts();
        #[allow(deprecated)]
        let category = addressed(req.task_category.as_ref(), &req.task_type);
        let plugin = self.plugin.clone();
        let parts = self
            .instrumented("GetTaskLogs", None, category, false, &metadata, |call| async move {
                plugin.logs(&call, req).await
            })
            .await?;
        Ok(Response::new(Box::pin(futures_util::stream::iter(parts.into_iter().map(Ok)))))
    }
}

/// The header and inputs of an ExecuteTaskSync request stream, from its
/// messages in order: the header first, then at most one inputs message.
fn sync_parts(
    messages: impl IntoIterator<Item = admin::ExecuteTaskSyncRequest>,
) -> Result<(admin::CreateRequestHeader, Option<flotilla_proto::core::LiteralMap>), Status> {
    let mut messages = messages.into_iter();
    let header = match messages.next() {
        Some(admin::ExecuteTaskSyncRequest { part: Some(Part::Header(h)) }) => h,
        Some(_) => {
            return Err(Status::invalid_argument(
                "the first ExecuteTaskSync message must be the header (CreateRequestHeader)",
            ));
        }
        None => return Err(Status::invalid_argument("ExecuteTaskSync stream ended before its header")),
    };
    let mut inputs = None;
    for msg in messages {
        match msg.part {
            Some(Part::Inputs(i)) if inputs.is_none() => inputs = Some(i),
            Some(Part::Inputs(_)) => {
                return Err(Status::invalid_argument("ExecuteTaskSync carries more than one inputs message"));
            }
            Some(Part::Header(_)) => {
                return Err(Status::invalid_argument("ExecuteTaskSync carries more than one header"));
            }
            None => {}
        }
    }
    Ok((header, inputs))
}

impl<P: Plugin> Services<P> {
    /// ExecuteTaskSync once its request stream has been read to the end (as
    /// `messages`, or the status that reading it failed with): the one answer.
    pub(crate) async fn execute_sync(
        &self,
        metadata: &MetadataMap,
        messages: Result<Vec<admin::ExecuteTaskSyncRequest>, Status>,
    ) -> Result<admin::ExecuteTaskSyncResponse, Status> {
        let (header, category, inputs) = match messages.and_then(sync_parts) {
            Ok((header, inputs)) => {
                let category = template_category(header.template.as_ref());
                (Some(header), category, inputs)
            }
            Err(status) => (None, Err(status), None),
        };
        let plugin = self.plugin.clone();
        let resource = self
            .instrumented(
                "ExecuteTaskSync",
                Some(Operation::Do),
                category,
                true,
                metadata,
                |call| async move {
                    // The category came from the header, so there is one.
                    let Some(header) = header else {
                        return Err(PluginError::InvalidArgument("ExecuteTaskSync without a header".into()));
                    };
                    plugin.execute(&call, header, inputs).await
                },
            )
            .await?;
        Ok(admin::ExecuteTaskSyncResponse {
            res: Some(admin::execute_task_sync_response::Res::Header(admin::ExecuteTaskSyncResponseHeader {
                resource: Some(resource),
            })),
        })
    }
}

#[tonic::async_trait]
impl<P: Plugin> AgentMetadataService for Services<P> {
    async fn get_agent(
        &self,
        request: Request<admin::GetAgentRequest>,
    ) -> Result<Response<admin::GetAgentResponse>, Status> {
        let name = request.into_inner().name;
        match self.table.agents.iter().find(|a| a.name == name) {
            Some(agent) => Ok(Response::new(admin::GetAgentResponse { agent: Some(agent.to_proto()) })),
            None => Err(Status::not_found(format!("no agent named {}", crate::wire::Quoted(&name)))),
        }
    }

    async fn list_agents(
        &self,
        _request: Request<admin::ListAgentsRequest>,
    ) -> Result<Response<admin::ListAgentsResponse>, Status> {
        Ok(Response::new(admin::ListAgentsResponse {
            agents: self.table.agents.iter().map(AgentSpec::to_proto).collect(),
        }))
    }
}
