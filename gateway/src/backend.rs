//! One plugin service as the gateway sees it: tower's p2c `Balance` over
//! peak-EWMA endpoints, each an [`H2Endpoint`] (one HTTP/2 connection to one
//! replica) wrapped in [`Ejecting`], so that a replica that refuses
//! connections or keeps failing sits out a backoff before it is probed again.
//! Each worker thread has its own balancer, fed by the same discovery changes,
//! so a call takes no lock and crosses no queue on its way to a replica. A
//! plugin with a single replica skips the balancer (nothing to choose), with
//! the same ejection.
//! [`Endpoints`] holds what discovery found and answers, without a lock,
//! whether any replica is ready; with none, calls fail fast.

use std::{
    collections::BTreeSet,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use flotilla_proto::service::agent_metadata_service_client::AgentMetadataServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::body::Body;
use tower::{
    BoxError, Service,
    balance::p2c::Balance,
    discover::Change,
    load::{CompleteOnResponse, PeakEwma},
    retry::budget::TpsBudget,
};

use crate::{
    config::Plugin,
    h2::{EndpointError, H2Endpoint},
    metrics::Metrics,
};

/// The latency an endpoint is assumed to have before it has answered anything.
/// Low on purpose: a replica that joins must look cheap enough to be tried, or
/// p2c would keep choosing the replicas it already knows to be fast (on
/// loopback they answer in well under a millisecond) until the guess decays.
const DEFAULT_RTT: Duration = Duration::from_micros(500);
/// How fast peak-EWMA forgets a latency peak.
const DECAY: Duration = Duration::from_secs(5);
/// First ejection; doubles with each ejection in a row (a probe that fails again).
const EJECT_BASE: Duration = Duration::from_millis(100);
/// Longest ejection.
const EJECT_MAX: Duration = Duration::from_secs(10);
/// Consecutive failures (other than refused connections) that eject an endpoint.
const FAILURES_TO_EJECT: u32 = 3;

type Changes = mpsc::UnboundedSender<Result<Change<SocketAddr, PeakEwma<Ejecting>>, Infallible>>;
type Balancer = Balance<
    UnboundedReceiverStream<Result<Change<SocketAddr, PeakEwma<Ejecting>>, Infallible>>,
    http::Request<Body>,
>;

thread_local! {
    /// Each worker thread's own balancer per backend (keyed by [`Endpoints::id`]).
    /// `Balance` needs `&mut self`; one per thread means no lock and no queue
    /// on the request path. The load each sees is its thread's share of it.
    static BALANCERS: std::cell::RefCell<std::collections::HashMap<u64, Balancer>> = Default::default();
}

/// No replica of the plugin is ready: none discovered, or all ejected.
#[derive(Debug, thiserror::Error)]
#[error("no ready replica ({discovered} discovered{})", if *.discovered > 0 { ", all failing" } else { "" })]
pub struct NoEndpoints {
    /// How many replicas discovery knows.
    pub discovered: usize,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// Health of one replica, shared between its endpoint and [`Endpoints`].
#[derive(Debug)]
pub struct EndpointState {
    addr: SocketAddr,
    /// A handle on the replica's connection, for direct health probes.
    endpoint: H2Endpoint,
    failures: AtomicU32,
    /// Ejections since the replica last answered: the backoff's exponent.
    ejections: AtomicU32,
    /// Milliseconds since [`epoch`] until which the endpoint sits out.
    ejected_until: AtomicU64,
}

impl EndpointState {
    fn new(addr: SocketAddr, endpoint: H2Endpoint) -> Self {
        Self {
            addr,
            endpoint,
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
        }
    }

    /// The replica's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A metadata client straight to this replica, bypassing the balancer.
    pub fn direct_client(&self) -> AgentMetadataServiceClient<H2Endpoint> {
        AgentMetadataServiceClient::new(self.endpoint.clone())
    }

    /// Ends an ejection early: a direct probe found the replica answering.
    pub fn recover(&self) {
        self.failures.store(0, Ordering::Release);
        self.ejections.store(0, Ordering::Release);
        self.ejected_until.store(0, Ordering::Release);
    }

    /// Whether calls may go to this replica now (not ejected, or its backoff is over: a probe).
    pub fn is_ready(&self) -> bool {
        self.ejected_until.load(Ordering::Acquire) <= now_ms()
    }

    fn ejected_until(&self) -> Option<Instant> {
        let until = self.ejected_until.load(Ordering::Acquire);
        (until > now_ms()).then(|| epoch() + Duration::from_millis(until))
    }

    /// Records a success; returns whether the endpoint had been failing.
    fn succeeded(&self) -> bool {
        // Plain loads first: the common path writes nothing shared.
        if self.failures.load(Ordering::Acquire) == 0 && self.ejections.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.ejections.store(0, Ordering::Release);
        self.failures.swap(0, Ordering::AcqRel) > 0
    }

    /// Records a failure; ejects at once when the connection was refused,
    /// else after [`FAILURES_TO_EJECT`] in a row. Returns the ejection, if any.
    ///
    /// The calls in flight when a replica goes away all fail together: the
    /// first failure ejects it, and the others, ending while it sits out,
    /// neither count nor lengthen the backoff. The backoff doubles only when
    /// the replica fails again after sitting out (the probe failed).
    fn failed(&self, refused: bool) -> Option<Duration> {
        let now = now_ms();
        let until = self.ejected_until.load(Ordering::Acquire);
        if until > now {
            return None;
        }
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        // Ejected since it last answered, the replica is on probation: any failure ejects again.
        let k = self.ejections.load(Ordering::Acquire);
        if !refused && n < FAILURES_TO_EJECT && k == 0 {
            return None;
        }
        let backoff = EJECT_BASE.saturating_mul(1 << k.min(10)).min(EJECT_MAX);
        // Of failures racing here, one ejects.
        self.ejected_until
            .compare_exchange(until, now + backoff.as_millis() as u64, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        self.ejections.fetch_add(1, Ordering::AcqRel);
        Some(backoff)
    }
}

/// An endpoint that sits out its ejection before it reports ready again.
pub struct Ejecting {
    inner: H2Endpoint,
    state: Arc<EndpointState>,
    plugin: Arc<str>,
    ejections: prometheus::IntCounter,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Service<http::Request<Body>> for Ejecting {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if let Some(until) = self.state.ejected_until() {
            let until = tokio::time::Instant::from_std(until);
            let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if sleep.deadline() != until {
                sleep.as_mut().reset(until);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.sleep = None;
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let state = self.state.clone();
        let plugin = self.plugin.clone();
        let ejections = self.ejections.clone();
        let inner = self.inner.clone();
        // One boxed future per call, not one per layer.
        Box::pin(async move { send_to(&inner, &state, &plugin, &ejections, req).await })
    }
}

/// The replica that answered a call UNAVAILABLE, on the response's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnsweredBy(pub SocketAddr);

/// Sends `req` to one replica and records the outcome in its health: an
/// answer clears its failures, and a refused connection or repeated transport
/// failures eject it (see [`EndpointState::failed`]). An UNAVAILABLE answer
/// neither clears nor counts here: it is marked with [`AnsweredBy`], and the
/// caller judges it with [`Endpoints::answered_unavailable`], which counts it
/// only against a replica that has ready peers (a plugin answers UNAVAILABLE
/// when the external system behind it is down, and every replica would
/// otherwise be ejected and the plugin's own message replaced by the gateway's).
/// The balancer's endpoints and the one-replica path both send through here.
async fn send_to(
    endpoint: &H2Endpoint,
    state: &EndpointState,
    plugin: &str,
    ejections: &prometheus::IntCounter,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, BoxError> {
    let mut result = endpoint.send(req).await.map_err(BoxError::from);
    match &mut result {
        Ok(resp) => {
            if grpc_status(resp.headers()) == Some(tonic::Code::Unavailable) {
                // So that a retry can go elsewhere (rare: no allocation on the common path).
                resp.extensions_mut().insert(AnsweredBy(state.addr));
            } else if state.succeeded() {
                tracing::info!(plugin = %plugin, addr = %state.addr, "Replica answers again");
            }
        }
        Err(e) => {
            let refused = e.downcast_ref::<EndpointError>().is_some_and(EndpointError::refused);
            let why = flotilla_telemetry::error_chain(e.as_ref());
            note_failure(state, plugin, ejections, refused, &why);
        }
    }
    result
}

fn note_failure(
    state: &EndpointState,
    plugin: &str,
    ejections: &prometheus::IntCounter,
    refused: bool,
    why: &str,
) {
    if let Some(backoff) = state.failed(refused) {
        ejections.inc();
        tracing::warn!(plugin, addr = %state.addr, ?backoff, error = why, "Replica ejected");
    }
}

/// The gRPC status of a trailers-only answer, if the headers carry one.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers.get(&flotilla_sdk::wire::header::GRPC_STATUS).map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

/// Whether an error proves the request never reached a replica: the
/// connection was never made, or no replica was ready to take it.
pub fn never_reached(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<NoEndpoints>()
            || err.downcast_ref::<EndpointError>().is_some_and(EndpointError::never_sent)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The replicas discovery found for one plugin.
pub struct Endpoints {
    /// Unique per backend, the key of its balancers.
    id: u64,
    plugin: Arc<str>,
    target: String,
    connect_timeout: Duration,
    /// One change stream per thread balancer; touched only when a balancer is
    /// made and when discovery changes the set, never per call.
    subscribers: std::sync::Mutex<Vec<Changes>>,
    states: ArcSwap<Vec<Arc<EndpointState>>>,
    metrics: Metrics,
    /// This plugin's `flotilla_gateway_ejections_total`.
    ejections: prometheus::IntCounter,
    /// Thread balancers in existence: while there are none, the one-replica
    /// path need not look for one to drop.
    balancers: AtomicUsize,
}

impl Endpoints {
    /// The plugin's name.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// The plugin's discovery target, as written.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether any replica can take a call now. Lock-free: read on every call.
    pub fn any_ready(&self) -> Result<(), NoEndpoints> {
        let states = self.states.load();
        if states.iter().any(|s| s.is_ready()) {
            Ok(())
        } else {
            Err(NoEndpoints { discovered: states.len() })
        }
    }

    /// A replica other than `addr` that can take a call now, spread over the
    /// ready ones, so that a retry lands elsewhere than the replica that just
    /// answered (a rare path: no balancer state to consult).
    pub fn ready_besides(&self, addr: SocketAddr) -> Option<Arc<EndpointState>> {
        let states = self.states.load();
        let others: Vec<&Arc<EndpointState>> =
            states.iter().filter(|s| s.addr != addr && s.is_ready()).collect();
        (!others.is_empty()).then(|| others[now_ms() as usize % others.len()].clone())
    }

    /// Records that `addr` answered UNAVAILABLE. While other replicas are
    /// ready it counts as a failure (three in a row eject it, as a replica
    /// whose own credentials or network broke should be); the last ready
    /// replica is never ejected for it, so in an outage of the external system
    /// the plugin's own answer keeps reaching callers.
    pub fn answered_unavailable(&self, addr: SocketAddr) {
        if self.ready_besides(addr).is_none() {
            return;
        }
        if let Some(state) = self.states.load().iter().find(|s| s.addr == addr) {
            note_failure(
                state,
                &self.plugin,
                &self.ejections,
                false,
                "answered UNAVAILABLE while other replicas were ready",
            );
        }
    }

    /// Replaces the replica set with `addrs`: new ones are inserted, gone ones removed.
    pub fn update(&self, addrs: &BTreeSet<SocketAddr>) {
        let current = self.states.load();
        let known: BTreeSet<SocketAddr> = current.iter().map(|s| s.addr).collect();
        if &known == addrs {
            return;
        }
        let mut next: Vec<Arc<EndpointState>> =
            current.iter().filter(|s| addrs.contains(&s.addr)).cloned().collect();
        let mut subscribers = self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for gone in known.difference(addrs) {
            subscribers.retain(|tx| tx.send(Ok(Change::Remove(*gone))).is_ok());
        }
        for &added in addrs.difference(&known) {
            let state = Arc::new(EndpointState::new(added, H2Endpoint::new(added, self.connect_timeout)));
            next.push(state.clone());
            self.warm_up(state.clone());
            subscribers.retain(|tx| tx.send(Ok(Change::Insert(added, self.endpoint(&state)))).is_ok());
        }
        drop(subscribers);
        let added: Vec<_> = addrs.difference(&known).collect();
        let removed: Vec<_> = known.difference(addrs).collect();
        let changes = &self.metrics.discovery_changes;
        changes.with_label_values(&[&self.plugin, "added"]).inc_by(added.len() as u64);
        changes.with_label_values(&[&self.plugin, "removed"]).inc_by(removed.len() as u64);
        tracing::info!(plugin = %self.plugin, target = %self.target, ?added, ?removed, replicas = next.len(), "Replicas changed");
        self.metrics.endpoints.with_label_values(&[&self.plugin, "discovered"]).set(next.len() as i64);
        self.states.store(Arc::new(next));
        self.report_states();
    }

    /// Sets the `ready` and `ejected` endpoint gauges from the replicas' current states. Called
    /// when the replica set changes and after every ListAgents poll (which also probes ejected
    /// replicas), so the gauges are at most one refresh interval old.
    pub fn report_states(&self) {
        let states = self.states.load();
        let ejected = states.iter().filter(|s| !s.is_ready()).count();
        let gauge = |state: &str| self.metrics.endpoints.with_label_values(&[&self.plugin, state]);
        gauge("ready").set((states.len() - ejected) as i64);
        gauge("ejected").set(ejected as i64);
    }

    /// Connects to a new replica before calls need it, so that no call pays
    /// for (and peak-EWMA does not remember) the TCP and HTTP/2 handshakes;
    /// a replica that refuses is ejected before any call is sent its way.
    fn warm_up(&self, state: Arc<EndpointState>) {
        let plugin = self.plugin.clone();
        let ejections = self.ejections.clone();
        let timeout = self.connect_timeout.saturating_mul(2);
        tokio::spawn(async move {
            let mut client = state.direct_client();
            let mut req = tonic::Request::new(flotilla_proto::admin::ListAgentsRequest {});
            req.set_timeout(timeout);
            match tokio::time::timeout(timeout, client.list_agents(req)).await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {} // answering all the same
                Ok(Err(status)) => note_failure(&state, &plugin, &ejections, true, status.message()),
                Err(_) => {
                    note_failure(&state, &plugin, &ejections, true, "no answer to the first ListAgents")
                }
            }
        });
    }

    /// A balancer endpoint for `state`. Every balancer gets its own (its own
    /// load estimate); they share the connection and the ejection state.
    fn endpoint(&self, state: &Arc<EndpointState>) -> PeakEwma<Ejecting> {
        let ejecting = Ejecting {
            inner: state.endpoint.clone(),
            state: state.clone(),
            plugin: self.plugin.clone(),
            ejections: self.ejections.clone(),
            sleep: None,
        };
        PeakEwma::new(ejecting, DEFAULT_RTT, DECAY.as_nanos() as f64, CompleteOnResponse::default())
    }

    /// A new balancer fed with the current replicas and every change from now on.
    fn subscribe(&self) -> Balancer {
        self.balancers.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut subscribers = self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for state in self.states.load().iter() {
            let _ = tx.send(Ok(Change::Insert(state.addr, self.endpoint(state))));
        }
        subscribers.push(tx);
        Balance::new(UnboundedReceiverStream::new(rx))
    }

    /// Sends `req` to the one replica there is, or else through this
    /// thread's balancer (made on first use); with no replica ready, fails at
    /// once with [`NoEndpoints`].
    ///
    /// With one replica p2c has nothing to choose between, and its ready-cache
    /// bookkeeping (the endpoint moved out of the ready set and back on every
    /// call, a cancel channel and a latency-tracking wrapper per call) was
    /// about 5% of the gateway's instructions per forwarded call. The call
    /// goes through [`send_to`] all the same, so ejection behaves as through
    /// the balancer. (No peak-EWMA estimate is kept meanwhile: when a second
    /// replica joins, a new balancer starts both from the default estimate,
    /// which decays toward the measured latencies within seconds.)
    async fn balanced_call(&self, req: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        // One look at the replicas answers both questions: is any ready (if
        // not, fail at once), and is there only the one.
        let only = {
            let states = self.states.load();
            if !states.iter().any(|s| s.is_ready()) {
                return Err(NoEndpoints { discovered: states.len() }.into());
            }
            match states.as_slice() {
                [one] => Some(one.clone()),
                _ => None,
            }
        };
        if let Some(state) = only {
            // A balancer this thread made while there were more replicas is
            // dropped: unpolled, it would hold the removed replicas'
            // connections open and queue every discovery change. Should the
            // plugin grow again, a new one starts from the set as it is then.
            if self.balancers.load(Ordering::Relaxed) > 0
                && BALANCERS.with(|all| all.borrow_mut().remove(&self.id)).is_some()
            {
                self.balancers.fetch_sub(1, Ordering::Relaxed);
            }
            return send_to(&state.endpoint, &state, &self.plugin, &self.ejections, req).await;
        }
        let mut req = Some(req);
        let call = std::future::poll_fn(|cx| {
            BALANCERS.with(|all| {
                let mut all = all.borrow_mut();
                let balancer = all.entry(self.id).or_insert_with(|| self.subscribe());
                match balancer.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        Poll::Ready(Ok(balancer.call(req.take().expect("called once, when ready"))))
                    }
                    Poll::Ready(Err(e)) => {
                        // A balancer that failed (its change stream ended) is rebuilt on next use.
                        all.remove(&self.id);
                        self.balancers.fetch_sub(1, Ordering::Relaxed);
                        Poll::Ready(Err(e))
                    }
                    Poll::Pending => Poll::Pending,
                }
            })
        })
        .await?;
        call.await
    }

    /// Replicas sitting out an ejection, which only a direct probe can bring back early.
    pub fn ejected(&self) -> Vec<Arc<EndpointState>> {
        self.states.load().iter().filter(|s| !s.is_ready()).cloned().collect()
    }
}

/// A plugin service behind the gateway.
pub struct Backend {
    /// The plugin's configuration.
    pub plugin: Plugin,
    /// Its replicas.
    pub endpoints: Arc<Endpoints>,
    /// Retries may add at most 20% to the calls (and 10 a second), so a sick
    /// plugin is not hit with a storm of them.
    pub budget: TpsBudget,
}

impl Backend {
    /// Builds the backend; discovery fills its endpoints (see [`crate::discover`]).
    pub fn new(plugin: Plugin, connect_timeout: Duration, metrics: &Metrics) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        metrics.declare_plugin(&plugin.name);
        let endpoints = Arc::new(Endpoints {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            plugin: plugin.name.as_str().into(),
            target: plugin.target_text.clone(),
            connect_timeout,
            subscribers: std::sync::Mutex::default(),
            states: ArcSwap::default(),
            metrics: metrics.clone(),
            ejections: metrics.ejections.with_label_values(&[&plugin.name]),
            balancers: AtomicUsize::new(0),
        });
        Self { plugin, endpoints, budget: TpsBudget::new(Duration::from_secs(10), 10, 0.2) }
    }

    /// A metadata client over the balanced replicas (used to poll `ListAgents`).
    pub fn metadata_client(&self) -> AgentMetadataServiceClient<MetadataService> {
        AgentMetadataServiceClient::new(MetadataService { endpoints: self.endpoints.clone() })
    }

    /// Sends one call to a ready replica (other than `avoid`, the replica
    /// whose answer is being retried, when another is ready), or fails at once
    /// with [`NoEndpoints`].
    ///
    /// # Errors
    /// [`NoEndpoints`], or the connection error of the replica tried.
    pub async fn call(
        &self,
        req: http::Request<Body>,
        avoid: Option<SocketAddr>,
    ) -> Result<http::Response<Body>, BoxError> {
        match avoid.and_then(|a| self.endpoints.ready_besides(a)) {
            Some(s) => send_to(&s.endpoint, &s, &self.endpoints.plugin, &self.endpoints.ejections, req).await,
            None => self.endpoints.balanced_call(req).await,
        }
    }
}

/// The balanced replicas with errors as statuses, for the generated clients.
/// (A concrete error type: tonic's client futures are not `Send` over a boxed one.)
#[derive(Clone)]
pub struct MetadataService {
    endpoints: Arc<Endpoints>,
}

impl Service<http::Request<Body>> for MetadataService {
    type Response = http::Response<Body>;
    type Error = tonic::Status;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, tonic::Status>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), tonic::Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let endpoints = self.endpoints.clone();
        Box::pin(async move { endpoints.balanced_call(req).await.map_err(to_status) })
    }
}

fn to_status(e: BoxError) -> tonic::Status {
    tonic::Status::unavailable(flotilla_telemetry::error_chain(e.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> EndpointState {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        EndpointState::new(addr, H2Endpoint::new(addr, Duration::from_secs(1)))
    }

    /// Ends the current ejection as if its backoff had run out.
    fn sit_out(s: &EndpointState) {
        s.ejected_until.store(now_ms(), Ordering::Release);
    }

    #[test]
    fn the_calls_failing_together_eject_once_and_probes_double_the_backoff() {
        let s = state();
        // Eight calls in flight meet the replica's end: one ejection of the first backoff.
        let ejections: Vec<_> = (0..8).filter_map(|_| s.failed(true)).collect();
        assert_eq!(ejections, vec![EJECT_BASE]);
        assert!(!s.is_ready());
        // Its backoff over, the probe fails: twice as long, and so on up to the cap.
        sit_out(&s);
        assert_eq!(s.failed(true), Some(EJECT_BASE * 2));
        sit_out(&s);
        assert_eq!(s.failed(false), Some(EJECT_BASE * 4), "a failed probe re-ejects without three in a row");
        for _ in 0..10 {
            sit_out(&s);
            s.failed(true);
        }
        sit_out(&s);
        assert_eq!(s.failed(true), Some(EJECT_MAX));
        // An answer starts it over.
        sit_out(&s);
        assert!(s.succeeded());
        assert!(!s.succeeded());
        assert_eq!((s.failed(false), s.failed(false), s.failed(false)), (None, None, Some(EJECT_BASE)));
    }

    #[test]
    fn after_an_ejection_any_failure_of_the_probe_ejects_again() {
        // Ejected for one refused connection, then its probe times out (not refused):
        // that is the failure after sitting out, not the first of three.
        let s = state();
        assert_eq!(s.failed(true), Some(EJECT_BASE));
        sit_out(&s);
        assert_eq!(s.failed(false), Some(EJECT_BASE * 2));
    }

    #[test]
    fn a_direct_probe_that_answers_ends_the_ejection_and_its_streak() {
        let s = state();
        assert_eq!(s.failed(true), Some(EJECT_BASE));
        sit_out(&s);
        assert_eq!(s.failed(true), Some(EJECT_BASE * 2));
        s.recover();
        assert!(s.is_ready());
        assert_eq!(s.failed(true), Some(EJECT_BASE));
        // And off probation: a single failure that is not a refusal does not eject.
        s.recover();
        assert_eq!(s.failed(false), None);
    }
}
