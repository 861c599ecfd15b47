//! The closed-loop load generator: `concurrency` workers spread over
//! `connections` HTTP/2 connections, each sending its next request as soon as
//! the last one answered. A warmup runs first and is not recorded; the
//! measured window then runs for a duration or a count, and a [`Sampler`] is
//! called at its two ends so server costs cover exactly the recorded calls.
//!
//! Every loop is bounded: each call has a deadline, and the run a hard stop.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use flotilla_proto::{
    admin::{self, execute_task_sync_response::Res},
    core::task_execution::Phase,
    service::{
        agent_metadata_service_client::AgentMetadataServiceClient,
        async_agent_service_client::AsyncAgentServiceClient,
        sync_agent_service_client::SyncAgentServiceClient,
    },
};
use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::Request;

use crate::{procs, workload::Workload};

/// What one operation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// GetTask on one task created before the run.
    Get,
    /// CreateTask.
    Create,
    /// CreateTask, GetTask, DeleteTask on the new task: one operation.
    RoundTrip,
    /// ListAgents.
    List,
    /// ExecuteTaskSync: header, inputs, read the one answer.
    Sync,
}

impl Scenario {
    /// Every scenario, in report order.
    pub const ALL: [Scenario; 5] = [Self::Get, Self::Create, Self::RoundTrip, Self::List, Self::Sync];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Create => "create",
            Self::RoundTrip => "round-trip",
            Self::List => "list",
            Self::Sync => "sync",
        }
    }

    /// The RPC (or RPCs) one operation makes.
    pub fn rpc(self) -> &'static str {
        match self {
            Self::Get => "GetTask",
            Self::Create => "CreateTask",
            Self::RoundTrip => "CreateTask + GetTask + DeleteTask",
            Self::List => "ListAgents",
            Self::Sync => "ExecuteTaskSync",
        }
    }
}

/// How to run one load.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// The operation.
    pub scenario: Scenario,
    /// Workers, each with one call in flight.
    pub concurrency: usize,
    /// HTTP/2 connections the workers share round-robin.
    pub connections: usize,
    /// Unrecorded time before the window.
    pub warmup: Duration,
    /// Length of the window (ignored when `count` is set, except as a cap).
    pub duration: Duration,
    /// Operations to record instead of a duration.
    pub count: Option<u64>,
    /// Deadline of each call (sent as `grpc-timeout` and enforced locally).
    pub call_timeout: Duration,
}

/// Called at the start and the end of the measured window.
pub trait Sampler {
    /// The window opens: recorded operations start from here.
    fn window_start(&mut self) {}
    /// The window closes.
    fn window_end(&mut self) {}
}

impl Sampler for () {}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// From a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// A histogram of call latencies in nanoseconds, 100 ns to 60 s at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(100, 60_000_000_000, 3).expect("static bounds are valid")
}

/// The outcome of one load (or of several merged).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// What ran.
    pub scenario: Scenario,
    /// Where it was sent.
    pub target: String,
    /// Workers.
    pub concurrency: usize,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Size of the padding input.
    pub payload_bytes: usize,
    /// Operations recorded in the window (successful ones).
    pub ops: u64,
    /// Failed operations in the window.
    pub errors: u64,
    /// Failed operations during warmup.
    pub warmup_errors: u64,
    /// Length of the window.
    pub seconds: f64,
    /// `ops / seconds`.
    pub ops_per_sec: f64,
    /// Latency of a whole operation.
    pub latency_us: Percentiles,
    /// Latency of each RPC of a round trip.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub calls_us: BTreeMap<&'static str, Percentiles>,
    /// The load generator's own CPU seconds in the window.
    pub client_cpu_seconds: f64,
    /// Up to five distinct error messages.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_samples: Vec<String>,
    /// The whole-operation histogram, for merging.
    #[serde(skip)]
    pub histogram: Histogram<u64>,
    /// Per-RPC histograms, for merging.
    #[serde(skip)]
    pub call_histograms: BTreeMap<&'static str, Histogram<u64>>,
}

impl Report {
    /// Adds another run of the same load (windows add up, histograms merge).
    pub fn merge(&mut self, other: &Report) {
        self.ops += other.ops;
        self.errors += other.errors;
        self.warmup_errors += other.warmup_errors;
        self.seconds += other.seconds;
        self.client_cpu_seconds += other.client_cpu_seconds;
        self.histogram.add(&other.histogram).expect("same bounds");
        for (name, h) in &other.call_histograms {
            self.call_histograms.entry(name).or_insert_with(histogram).add(h).expect("same bounds");
        }
        for e in &other.error_samples {
            push_sample(&mut self.error_samples, e);
        }
        self.finish();
    }

    /// Recomputes the derived fields from the counters and histograms.
    fn finish(&mut self) {
        self.ops_per_sec = if self.seconds > 0.0 { self.ops as f64 / self.seconds } else { 0.0 };
        self.latency_us = Percentiles::of(&self.histogram);
        self.calls_us = self.call_histograms.iter().map(|(k, h)| (*k, Percentiles::of(h))).collect();
    }
}

fn push_sample(samples: &mut Vec<String>, e: &str) {
    if samples.len() < 5 && !samples.iter().any(|s| s == e) {
        samples.push(e.to_owned());
    }
}

/// Connects `n` HTTP/2 connections to `target`, each within `timeout`.
///
/// # Errors
/// When one cannot be established.
pub async fn connect(target: SocketAddr, n: usize, timeout: Duration) -> anyhow::Result<Vec<Connection>> {
    let mut connections = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        // The connection bounds its own connect by `timeout`.
        let connection = Connection::new(target, timeout);
        connection.connect().await.with_context(|| format!("connecting to {target}"))?;
        connections.push(connection);
    }
    Ok(connections)
}

/// One HTTP/2 connection that tonic's generated clients call through: the
/// gateway's own client connection ([`flotilla_gateway::h2`]), which sends a
/// call's headers and whole body in one write and costs about half the
/// instructions of the `h2` crate's client.
///
/// The load generator shares the two cores with the servers it measures, so
/// the CPU it spends per call they lose, whichever target it drives: over
/// hyper's client (the `h2` crate) it spent 12-13 µs of CPU per GetTask at
/// c=64, as much as the gateway itself; over this one, 81k instructions per
/// call fell to 50k (RESULTS.md, notes on the sixteenth run). tonic's
/// `Channel` is left out for the same reason: its buffer runs every call
/// through a task of its own. Calls still go through tonic's codec and
/// generated clients, as a Rust agent client's would.
pub type Connection = flotilla_gateway::h2::H2Endpoint;

/// The async runtime a load runs on: with 1 (the default of both bench
/// binaries) one thread for everything, else `threads` worker threads.
///
/// The load generator shares the machine's two cores with the servers it
/// measures. On one thread a call's wakeups stay on that thread; with two,
/// every answer wakes a worker on the other core, and the generator cost
/// 28-30 µs of CPU per GetTask against 12-14 µs on one (at c=64, RESULTS.md),
/// CPU that the servers under test lost. One thread carries more than
/// 60,000 GetTask a second, far above what any target here serves.
///
/// # Errors
/// When the runtime cannot start.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
}

/// What the run shares between the coordinator and the workers.
struct Shared {
    measuring: AtomicBool,
    stop: AtomicBool,
    /// Operations left to record in count mode.
    budget: AtomicI64,
    hard_stop: Instant,
}

/// One worker's tallies.
struct Tally {
    histogram: Histogram<u64>,
    calls: BTreeMap<&'static str, Histogram<u64>>,
    ops: u64,
    errors: u64,
    warmup_errors: u64,
    samples: Vec<String>,
}

/// The clients one worker calls through.
#[derive(Clone)]
struct Clients {
    agent: AsyncAgentServiceClient<Connection>,
    sync: SyncAgentServiceClient<Connection>,
    metadata: AgentMetadataServiceClient<Connection>,
}

impl Clients {
    fn new(connection: Connection) -> Self {
        Self {
            agent: AsyncAgentServiceClient::new(connection.clone()),
            sync: SyncAgentServiceClient::new(connection.clone()),
            metadata: AgentMetadataServiceClient::new(connection),
        }
    }
}

/// Runs one load against `target` and reports it.
///
/// # Errors
/// When the connections cannot be made or the setup call (the task GetTask reads) fails.
pub async fn run(
    target: SocketAddr,
    workload: Arc<Workload>,
    config: &LoadConfig,
    sampler: &mut dyn Sampler,
) -> anyhow::Result<Report> {
    if config.concurrency == 0 {
        bail!("concurrency must be at least 1");
    }
    let channels = connect(target, config.connections.min(config.concurrency), config.call_timeout).await?;
    let clients: Vec<Clients> = channels.into_iter().map(Clients::new).collect();

    // GetTask reads one task, created once.
    let get_request = if config.scenario == Scenario::Get {
        let mut agent = clients[0].agent.clone();
        let created = tokio::time::timeout(
            config.call_timeout,
            agent.create_task(with_timeout(workload.create.clone(), config.call_timeout)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {:?}", config.call_timeout))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .context("creating the task that GetTask reads")?
        .into_inner();
        Some(Arc::new(workload.get(created.resource_meta)))
    } else {
        None
    };

    let window_cap =
        config.duration.max(Duration::from_secs(1)) * if config.count.is_some() { 10 } else { 1 };
    let shared = Arc::new(Shared {
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        budget: AtomicI64::new(config.count.map_or(i64::MAX, |c| c as i64)),
        hard_stop: Instant::now() + config.warmup + window_cap + config.call_timeout,
    });
    let workers: Vec<_> = (0..config.concurrency)
        .map(|i| {
            let clients = clients[i % clients.len()].clone();
            let shared = shared.clone();
            let workload = workload.clone();
            let get_request = get_request.clone();
            let (scenario, timeout, counted) = (config.scenario, config.call_timeout, config.count.is_some());
            tokio::spawn(async move {
                worker(scenario, clients, workload, get_request, shared, timeout, counted).await
            })
        })
        .collect();

    tokio::time::sleep(config.warmup).await;
    let cpu_before = procs::self_cpu_seconds();
    sampler.window_start();
    let opened = Instant::now();
    shared.measuring.store(true, Ordering::SeqCst);
    let mut tallies = Vec::with_capacity(workers.len());
    let closed;
    if config.count.is_some() {
        // The window ends when the budget is spent, or at the cap.
        let mut handles = workers.into_iter();
        let deadline = tokio::time::Instant::now() + window_cap;
        for h in handles.by_ref() {
            match tokio::time::timeout_at(deadline, h).await {
                Ok(joined) => tallies.push(joined.context("a worker panicked")?),
                Err(_) => {
                    shared.stop.store(true, Ordering::SeqCst);
                    break;
                }
            }
        }
        closed = Instant::now();
        sampler.window_end();
        shared.stop.store(true, Ordering::SeqCst);
        for h in handles {
            tallies.push(h.await.context("a worker panicked")?);
        }
    } else {
        tokio::time::sleep(config.duration).await;
        shared.stop.store(true, Ordering::SeqCst);
        closed = Instant::now();
        sampler.window_end();
        for h in workers {
            tallies.push(h.await.context("a worker panicked")?);
        }
    }
    let client_cpu_seconds = procs::self_cpu_seconds() - cpu_before;

    let mut report = Report {
        scenario: config.scenario,
        target: target.to_string(),
        concurrency: config.concurrency,
        connections: clients.len(),
        payload_bytes: workload.spec.payload_bytes,
        ops: 0,
        errors: 0,
        warmup_errors: 0,
        seconds: (closed - opened).as_secs_f64(),
        ops_per_sec: 0.0,
        latency_us: Percentiles::default(),
        calls_us: BTreeMap::new(),
        client_cpu_seconds,
        error_samples: Vec::new(),
        histogram: histogram(),
        call_histograms: BTreeMap::new(),
    };
    for t in tallies {
        report.ops += t.ops;
        report.errors += t.errors;
        report.warmup_errors += t.warmup_errors;
        report.histogram.add(&t.histogram).expect("same bounds");
        for (name, h) in &t.calls {
            report.call_histograms.entry(name).or_insert_with(histogram).add(h).expect("same bounds");
        }
        for e in &t.samples {
            push_sample(&mut report.error_samples, e);
        }
    }
    report.finish();
    Ok(report)
}

fn with_timeout<T>(message: T, timeout: Duration) -> Request<T> {
    let mut req = Request::new(message);
    req.set_timeout(timeout);
    req
}

/// Per-RPC latencies of one round trip.
type CallTimes = [(&'static str, Duration); 3];

async fn worker(
    scenario: Scenario,
    mut clients: Clients,
    workload: Arc<Workload>,
    get_request: Option<Arc<admin::GetTaskRequest>>,
    shared: Arc<Shared>,
    timeout: Duration,
    counted: bool,
) -> Tally {
    let mut tally = Tally {
        histogram: histogram(),
        calls: BTreeMap::new(),
        ops: 0,
        errors: 0,
        warmup_errors: 0,
        samples: Vec::new(),
    };
    loop {
        if shared.stop.load(Ordering::Relaxed) || Instant::now() >= shared.hard_stop {
            break;
        }
        let measuring = shared.measuring.load(Ordering::Relaxed);
        if measuring && counted && shared.budget.fetch_sub(1, Ordering::Relaxed) <= 0 {
            break;
        }
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            timeout + Duration::from_millis(100),
            one_op(scenario, &mut clients, &workload, get_request.as_deref(), timeout),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        let took = started.elapsed();
        if outcome.is_err() {
            // A failure can come back without the call ever waiting (a
            // connection the server closed): let the other workers and the
            // coordinator run before trying again, on this one thread.
            tokio::task::yield_now().await;
        }
        // An operation counts when it started inside the window and ended before it closed.
        if !measuring || (!counted && shared.stop.load(Ordering::Relaxed)) {
            if outcome.is_err() && !measuring {
                tally.warmup_errors += 1;
                if let Err(e) = &outcome {
                    push_sample(&mut tally.samples, &format!("warmup: {e}"));
                }
            }
            continue;
        }
        match outcome {
            Ok(calls) => {
                tally.ops += 1;
                tally.histogram.saturating_record(took.as_nanos() as u64);
                for (name, d) in calls.into_iter().flatten() {
                    tally.calls.entry(name).or_insert_with(histogram).saturating_record(d.as_nanos() as u64);
                }
            }
            Err(e) => {
                tally.errors += 1;
                push_sample(&mut tally.samples, &e);
            }
        }
    }
    tally
}

fn status(rpc: &str, s: &tonic::Status) -> String {
    format!("{rpc}: {:?}: {}", s.code(), s.message())
}

/// Checks a GetTask or ExecuteTaskSync answer: SUCCEEDED with one output per input.
fn check_resource(rpc: &str, resource: Option<&admin::Resource>, workload: &Workload) -> Result<(), String> {
    let r = resource.ok_or_else(|| format!("{rpc}: no resource in the answer"))?;
    if r.phase != Phase::Succeeded as i32 {
        return Err(format!("{rpc}: phase {} ({})", r.phase, r.message));
    }
    let outputs = r.outputs.as_ref().map_or(0, |o| o.literals.len());
    if outputs != workload.inputs.literals.len() {
        return Err(format!("{rpc}: {outputs} outputs for {} inputs", workload.inputs.literals.len()));
    }
    Ok(())
}

async fn one_op(
    scenario: Scenario,
    c: &mut Clients,
    workload: &Workload,
    get_request: Option<&admin::GetTaskRequest>,
    timeout: Duration,
) -> Result<Option<CallTimes>, String> {
    match scenario {
        Scenario::Get => {
            let req = get_request.expect("GetTask request prepared for the get scenario").clone();
            let got =
                c.agent.get_task(with_timeout(req, timeout)).await.map_err(|s| status("GetTask", &s))?;
            check_resource("GetTask", got.get_ref().resource.as_ref(), workload)?;
            Ok(None)
        }
        Scenario::Create => {
            let created = c
                .agent
                .create_task(with_timeout(workload.create.clone(), timeout))
                .await
                .map_err(|s| status("CreateTask", &s))?;
            if created.get_ref().resource_meta.is_empty() {
                return Err("CreateTask: empty resource_meta".to_owned());
            }
            Ok(None)
        }
        Scenario::RoundTrip => {
            let t0 = Instant::now();
            let meta = c
                .agent
                .create_task(with_timeout(workload.create.clone(), timeout))
                .await
                .map_err(|s| status("CreateTask", &s))?
                .into_inner()
                .resource_meta;
            let t1 = Instant::now();
            let got = c
                .agent
                .get_task(with_timeout(workload.get(meta.clone()), timeout))
                .await
                .map_err(|s| status("GetTask", &s))?;
            check_resource("GetTask", got.get_ref().resource.as_ref(), workload)?;
            let t2 = Instant::now();
            c.agent
                .delete_task(with_timeout(workload.delete(meta), timeout))
                .await
                .map_err(|s| status("DeleteTask", &s))?;
            let t3 = Instant::now();
            Ok(Some([("CreateTask", t1 - t0), ("GetTask", t2 - t1), ("DeleteTask", t3 - t2)]))
        }
        Scenario::List => {
            let listed = c
                .metadata
                .list_agents(with_timeout(admin::ListAgentsRequest {}, timeout))
                .await
                .map_err(|s| status("ListAgents", &s))?;
            let wanted = &workload.spec.task_type;
            let found = listed
                .get_ref()
                .agents
                .iter()
                .any(|a| a.supported_task_categories.iter().any(|t| &t.name == wanted));
            if !found {
                return Err(format!("ListAgents: no agent lists {wanted}"));
            }
            Ok(None)
        }
        Scenario::Sync => {
            let messages = vec![workload.sync_header.clone(), workload.sync_inputs.clone()];
            let mut answers = c
                .sync
                .execute_task_sync(with_timeout(tokio_stream::iter(messages), timeout))
                .await
                .map_err(|s| status("ExecuteTaskSync", &s))?
                .into_inner();
            let mut headers = 0;
            // Read the response stream to its end (bounded by the call's deadline).
            while let Some(answer) = answers.message().await.map_err(|s| status("ExecuteTaskSync", &s))? {
                match answer.res {
                    Some(Res::Header(h)) => {
                        headers += 1;
                        check_resource("ExecuteTaskSync", h.resource.as_ref(), workload)?;
                    }
                    Some(Res::Outputs(_)) | None => {}
                }
            }
            if headers != 1 {
                return Err(format!("ExecuteTaskSync: {headers} header messages, expected 1"));
            }
            Ok(None)
        }
    }
}
