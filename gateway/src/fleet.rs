//! The fleet: every plugin backend, and the route table learned from their
//! `ListAgents` answers. A background task polls each service on
//! `refresh_interval`; a failed poll keeps that service's last known agents.
//! The route table is rebuilt whole and swapped in, so requests read it
//! without a lock. The gateway's own `ListAgents`/`GetAgent` answer from it.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use flotilla_proto::{admin, service::agent_metadata_service_server::AgentMetadataService};
use flotilla_sdk::Category;
use flotilla_telemetry::Shutdown;
use tonic::{Request, Response, Status};

use crate::{backend::Backend, metrics::Metrics, route::RouteTable};

/// What the fleet knows right now.
#[derive(Default)]
pub struct FleetState {
    /// Category → backend index.
    pub routes: RouteTable,
    /// The union of every service's agents, as `ListAgents` answers it.
    pub agents: Vec<admin::Agent>,
    /// The plugins that have not answered `ListAgents` since the gateway
    /// started (as `"name" (discovery target)`): a task type nobody is known
    /// to serve may be theirs.
    pub unheard: Vec<String>,
}

/// Every backend and the learned routes.
pub struct Fleet {
    /// The backends, in configuration order.
    pub backends: Vec<Backend>,
    state: ArcSwap<FleetState>,
    metrics: Metrics,
}

impl Fleet {
    /// A fleet with no routes learned yet (pins apply at once).
    pub fn new(backends: Vec<Backend>, metrics: Metrics) -> Self {
        let fleet = Self { backends, state: ArcSwap::default(), metrics };
        let empty = vec![None; fleet.backends.len()];
        fleet.state.store(Arc::new(fleet.build(&empty, &mut HashSet::new())));
        fleet
    }

    /// The current state.
    pub fn state(&self) -> arc_swap::Guard<Arc<FleetState>> {
        self.state.load()
    }

    /// Polls every service's `ListAgents` once and swaps in the new table.
    /// `last` holds each service's last good answer; `reported` the conflicts already logged.
    pub async fn refresh(
        &self,
        last: &mut [Option<Vec<admin::Agent>>],
        reported: &mut HashSet<String>,
        timeout: Duration,
    ) {
        // Each poll runs as its own task: one slow service does not delay the others' answers.
        let polls: Vec<_> = self
            .backends
            .iter()
            .map(|b| {
                let mut client = b.metadata_client();
                tokio::spawn(async move {
                    let mut req = Request::new(admin::ListAgentsRequest {});
                    req.set_timeout(timeout);
                    tokio::time::timeout(timeout, client.list_agents(req)).await
                })
            })
            .collect();
        let mut answers = Vec::with_capacity(polls.len());
        for (poll, backend) in polls.into_iter().zip(&self.backends) {
            let answer = match poll.await {
                Ok(answer) => answer,
                Err(join) => Ok(Err(Status::internal(format!("the ListAgents poll panicked: {join}")))),
            };
            // With every replica ejected the balanced poll fails fast; the poll
            // then doubles as a health check, asking ejected replicas directly.
            let answer = match answer {
                Ok(Ok(a)) => Ok(Ok(a)),
                failed => probe(backend, timeout).await.map_or(failed, |a| Ok(Ok(a))),
            };
            answers.push(answer);
            backend.endpoints.report_states();
        }
        for ((backend, answer), slot) in self.backends.iter().zip(answers).zip(last.iter_mut()) {
            let name = &backend.plugin.name;
            let result = match answer {
                Ok(Ok(resp)) => {
                    let agents: Vec<admin::Agent> =
                        resp.into_inner().agents.into_iter().map(with_deprecated_types).collect();
                    if slot.as_ref() != Some(&agents) {
                        let kinds: Vec<String> =
                            agents.iter().flat_map(categories).map(|c| c.to_string()).collect();
                        tracing::info!(plugin = %name, task_types = ?kinds, "Learned the plugin's task types");
                    }
                    *slot = Some(agents);
                    "ok"
                }
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                    // An answer all the same: the service has no task types to tell.
                    slot.get_or_insert_with(Vec::new);
                    tracing::warn!(plugin = %name, "The plugin does not implement ListAgents; only its pinned categories route to it");
                    "unimplemented"
                }
                Ok(Err(status)) => {
                    tracing::warn!(plugin = %name, target = %backend.plugin.target_text, code = ?status.code(), message = status.message(), "ListAgents failed; keeping the last known task types");
                    "error"
                }
                Err(_) => {
                    tracing::warn!(plugin = %name, target = %backend.plugin.target_text, ?timeout, "ListAgents timed out; keeping the last known task types");
                    "timeout"
                }
            };
            self.metrics.route_refreshes.with_label_values(&[name, result]).inc();
        }
        self.state.store(Arc::new(self.build(last, reported)));
    }

    /// Builds the state from each service's agents. Pins first, then
    /// `ListAgents` answers in configuration order; a category two services
    /// claim stays with the first and the conflict is reported (once).
    fn build(&self, last: &[Option<Vec<admin::Agent>>], reported: &mut HashSet<String>) -> FleetState {
        let mut routes: HashMap<Category, usize> = HashMap::new();
        for (i, b) in self.backends.iter().enumerate() {
            for pin in &b.plugin.pins {
                routes.insert(pin.clone(), i);
            }
        }
        let mut agents = Vec::new();
        // (name, is_sync) → index in `agents`.
        let mut names: HashMap<(String, bool), usize> = HashMap::new();
        let mut conflicts = 0;
        for (i, answer) in last.iter().enumerate() {
            let Some(list) = answer else { continue };
            for agent in list {
                let mut agent = agent.clone();
                agent.supported_task_categories.retain(|c| {
                    let category = Category::from(c);
                    match routes.get(&category) {
                        Some(&j) if j == i => true,
                        Some(&j) if self.backends[j].plugin.pins.contains(&category) => {
                            false // pinned elsewhere on purpose: not a conflict
                        }
                        Some(&j) => {
                            conflicts += 1;
                            let msg = format!(
                                "task type {category} is claimed by plugin services {:?} and {:?}; routing it to {:?}. \
                                 Fix the configuration: one service per task type, or pin it with `categories`",
                                self.backends[j].plugin.name, self.backends[i].plugin.name, self.backends[j].plugin.name
                            );
                            if reported.insert(msg.clone()) {
                                tracing::error!("{msg}");
                            }
                            false
                        }
                        None => {
                            routes.insert(category, i);
                            true
                        }
                    }
                });
                #[allow(deprecated)]
                {
                    let kept: HashSet<&str> =
                        agent.supported_task_categories.iter().map(|c| c.name.as_str()).collect();
                    agent.supported_task_types.retain(|t| kept.contains(t.as_str()));
                }
                if agent.supported_task_categories.is_empty() {
                    continue;
                }
                // One name across services: like flytekit's registry, one agent
                // serving the union of their task types (each still routed to
                // its own service). A sync and an async agent cannot be one
                // (propeller reads `is_sync` per agent): both are listed.
                if let Some(&k) = names.get(&(agent.name.clone(), agent.is_sync)) {
                    let first: &mut admin::Agent = &mut agents[k];
                    first.supported_task_categories.append(&mut agent.supported_task_categories);
                    #[allow(deprecated)]
                    for t in std::mem::take(&mut agent.supported_task_types) {
                        if !first.supported_task_types.contains(&t) {
                            first.supported_task_types.push(t);
                        }
                    }
                    continue;
                }
                if names.contains_key(&(agent.name.clone(), !agent.is_sync)) {
                    let msg = format!(
                        "agent name {:?} is used by a sync and an async agent (plugin service {:?}); both are \
                         listed, and GetAgent answers the first",
                        agent.name, self.backends[i].plugin.name
                    );
                    if reported.insert(msg.clone()) {
                        tracing::warn!("{msg}");
                    }
                }
                names.insert((agent.name.clone(), agent.is_sync), agents.len());
                agents.push(agent);
            }
        }
        // Pinned categories of services that did not list them still appear in ListAgents.
        for (i, b) in self.backends.iter().enumerate() {
            let listed: HashSet<Category> = agents.iter().flat_map(categories).collect();
            let missing: Vec<&Category> =
                b.plugin.pins.iter().filter(|c| routes.get(*c) == Some(&i) && !listed.contains(*c)).collect();
            if missing.is_empty() {
                continue;
            }
            // Listed as an async agent named after the plugin; one of that name
            // already listed (the service's own) gains them, as names merge above.
            let k = *names.entry((b.plugin.name.clone(), false)).or_insert_with(|| {
                agents.push(admin::Agent { name: b.plugin.name.clone(), ..Default::default() });
                agents.len() - 1
            });
            let agent = &mut agents[k];
            agent.supported_task_categories.extend(missing.iter().map(|c| admin::TaskCategory::from(*c)));
            #[allow(deprecated)]
            for c in missing {
                if !agent.supported_task_types.contains(&c.name) {
                    agent.supported_task_types.push(c.name.clone());
                }
            }
        }
        self.metrics.route_conflicts.set(conflicts);
        let unheard = (self.backends.iter().zip(last))
            .filter(|(_, answer)| answer.is_none())
            .map(|(b, _)| format!("{:?} ({})", b.plugin.name, b.plugin.target_text))
            .collect();
        FleetState { routes: RouteTable::new(routes), agents, unheard }
    }

    /// Polls on `interval` until `shutdown`. The first poll has already happened in `start`.
    pub async fn keep_refreshing(
        self: Arc<Self>,
        mut last: Vec<Option<Vec<admin::Agent>>>,
        mut reported: HashSet<String>,
        interval: Duration,
        shutdown: Shutdown,
    ) {
        let timeout = poll_timeout(interval);
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.wait() => return,
            }
            self.refresh(&mut last, &mut reported, timeout).await;
        }
    }
}

/// Asks each ejected replica of `backend` directly; the first that answers is
/// brought back at once, and its answer is the poll's.
async fn probe(
    backend: &crate::backend::Backend,
    timeout: Duration,
) -> Option<Response<admin::ListAgentsResponse>> {
    for replica in backend.endpoints.ejected() {
        let mut req = Request::new(admin::ListAgentsRequest {});
        req.set_timeout(timeout);
        let mut client = replica.direct_client();
        if let Ok(Ok(answer)) = tokio::time::timeout(timeout, client.list_agents(req)).await {
            replica.recover();
            tracing::info!(plugin = %backend.plugin.name, addr = %replica.addr(), "Replica answers a probe again");
            return Some(answer);
        }
    }
    None
}

/// How long one `ListAgents` poll may take: like propeller's 3 s default, never more than the interval.
pub fn poll_timeout(interval: Duration) -> Duration {
    interval.min(Duration::from_secs(3))
}

/// The agent with each deprecated `supported_task_types` name that no category
/// names also among its categories at version 0, as propeller reads them: an
/// agent from before task categories lists only the names. (A category of the
/// name replaces the deprecated entry in propeller's registry, whatever its
/// version: flytekit and our SDK list both.)
fn with_deprecated_types(mut agent: admin::Agent) -> admin::Agent {
    #[allow(deprecated)]
    for name in &agent.supported_task_types {
        let listed = agent.supported_task_categories.iter().any(|c| &c.name == name);
        if !listed {
            agent.supported_task_categories.push(admin::TaskCategory { name: name.clone(), version: 0 });
        }
    }
    agent
}

fn categories(agent: &admin::Agent) -> impl Iterator<Item = Category> + '_ {
    agent.supported_task_categories.iter().map(Category::from)
}

#[cfg(test)]
mod tests {
    use flotilla_proto::admin;

    use super::with_deprecated_types;

    #[allow(deprecated)]
    fn agent(types: &[&str], categories: &[(&str, i32)]) -> admin::Agent {
        admin::Agent {
            name: "a".into(),
            supported_task_types: types.iter().map(|t| (*t).to_owned()).collect(),
            supported_task_categories: categories
                .iter()
                .map(|(n, v)| admin::TaskCategory { name: (*n).to_owned(), version: *v })
                .collect(),
            is_sync: false,
        }
    }

    #[test]
    fn a_deprecated_name_counts_at_version_0_only_when_no_category_names_it() {
        let got = |a: admin::Agent| {
            with_deprecated_types(a)
                .supported_task_categories
                .into_iter()
                .map(|c| (c.name, c.version))
                .collect::<Vec<_>>()
        };
        assert_eq!(got(agent(&["old"], &[])), [("old".to_owned(), 0)]);
        // As flytekit and the SDK list a category at version 1: the name stands for that version only.
        assert_eq!(got(agent(&["x"], &[("x", 1)])), [("x".to_owned(), 1)]);
        assert_eq!(got(agent(&["x", "y"], &[("x", 0)])), [("x".to_owned(), 0), ("y".to_owned(), 0)]);
    }
}

/// The gateway's own `AgentMetadataService`: the union over the fleet. Its
/// calls are counted in `flotilla_gateway_requests_total` and timed like the
/// forwarded ones, under `plugin="none"` (the gateway answers them itself).
#[derive(Clone)]
pub struct FleetMetadata(pub Arc<Fleet>);

impl FleetMetadata {
    /// Counts and times one call that started at `started`.
    fn record<T>(&self, method: &str, started: std::time::Instant, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        let metrics = &self.0.metrics;
        metrics.requests.with_label_values(&["none", method, flotilla_sdk::wire::code_name(code)]).inc();
        metrics.duration.with_label_values(&["none", method]).observe(started.elapsed().as_secs_f64());
    }
}

#[tonic::async_trait]
impl AgentMetadataService for FleetMetadata {
    async fn get_agent(
        &self,
        request: Request<admin::GetAgentRequest>,
    ) -> Result<Response<admin::GetAgentResponse>, Status> {
        let started = std::time::Instant::now();
        let name = request.into_inner().name;
        let state = self.0.state();
        let result = match state.agents.iter().find(|a| a.name == name) {
            Some(a) => Ok(Response::new(admin::GetAgentResponse { agent: Some(a.clone()) })),
            None => {
                let known: Vec<&str> = state.agents.iter().map(|a| a.name.as_str()).collect();
                Err(Status::not_found(format!(
                    "no agent named {}; the fleet has: {}",
                    flotilla_sdk::wire::Quoted(&name),
                    known.join(", ")
                )))
            }
        };
        self.record("GetAgent", started, &result);
        result
    }

    async fn list_agents(
        &self,
        _request: Request<admin::ListAgentsRequest>,
    ) -> Result<Response<admin::ListAgentsResponse>, Status> {
        let started = std::time::Instant::now();
        let result = Ok(Response::new(admin::ListAgentsResponse { agents: self.0.state().agents.clone() }));
        self.record("ListAgents", started, &result);
        result
    }
}
