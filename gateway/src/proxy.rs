//! The forwarding path for `AsyncAgentService` and `SyncAgentService`: read
//! the request's first message (within the size limit), take the routing key
//! from its bytes, pick the plugin, and forward the original bytes untouched.
//! Responses stream back as they come; the gateway never re-encodes a body.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use flotilla_proto::{paths, service::agent_metadata_service_server::AgentMetadataService as _};
use flotilla_sdk::{
    h2serve::{self, CallFuture, Handler, RecvBody},
    wire::{self, Encoding, FRAME_HEADER_LEN, Quoted, format_grpc_timeout, header, parse_grpc_timeout},
};
use h2::{RecvStream, server::SendResponse};
use http::{HeaderValue, Request, Response};
use http_body::Frame;
use tonic::{Status, body::Body};
use tonic_health::pb::health_server::Health as _;
use tower::{BoxError, retry::budget::Budget as _};

use crate::{
    backend::{AnsweredBy, never_reached},
    fleet::Fleet,
    metrics::Metrics,
    route::{self, Key, KeyError},
};

/// Attempts per call, the first included.
const MAX_ATTEMPTS: u32 = 3;

/// Which method a path names, with how its routing key is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
enum Method {
    CreateTask,
    GetTask,
    DeleteTask,
    GetTaskMetrics,
    GetTaskLogs,
    ExecuteTaskSync,
}

impl Method {
    const ALL: [Method; 6] = [
        Self::CreateTask,
        Self::GetTask,
        Self::DeleteTask,
        Self::GetTaskMetrics,
        Self::GetTaskLogs,
        Self::ExecuteTaskSync,
    ];

    fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            paths::CREATE_TASK => Self::CreateTask,
            paths::GET_TASK => Self::GetTask,
            paths::DELETE_TASK => Self::DeleteTask,
            paths::GET_TASK_METRICS => Self::GetTaskMetrics,
            paths::GET_TASK_LOGS => Self::GetTaskLogs,
            paths::EXECUTE_TASK_SYNC => Self::ExecuteTaskSync,
            _ => return None,
        })
    }

    /// Whether a second call cannot start a second job.
    fn idempotent(self) -> bool {
        matches!(self, Self::GetTask | Self::DeleteTask | Self::GetTaskMetrics | Self::GetTaskLogs)
    }

    fn name(self) -> &'static str {
        match self {
            Self::CreateTask => "CreateTask",
            Self::GetTask => "GetTask",
            Self::DeleteTask => "DeleteTask",
            Self::GetTaskMetrics => "GetTaskMetrics",
            Self::GetTaskLogs => "GetTaskLogs",
            Self::ExecuteTaskSync => "ExecuteTaskSync",
        }
    }

    fn key(self, message: &[u8]) -> Result<Key<'_>, KeyError> {
        match self {
            Self::CreateTask => route::create_key(message),
            Self::GetTask => route::category_key(message, "GetTaskRequest", 3),
            Self::DeleteTask => route::category_key(message, "DeleteTaskRequest", 3),
            Self::GetTaskMetrics => route::category_key(message, "GetTaskMetricsRequest", 7),
            Self::GetTaskLogs => route::category_key(message, "GetTaskLogsRequest", 5),
            Self::ExecuteTaskSync => route::execute_sync_key(message),
        }
    }
}

/// One plugin's call metrics, resolved once so the request path never looks labels up.
struct PluginMetrics {
    /// The plugin's name (`none` for calls answered before routing), for logs.
    plugin: Arc<str>,
    /// By method, then by gRPC code (0..=16).
    calls: Vec<Vec<prometheus::IntCounter>>,
    /// By method.
    durations: Vec<prometheus::Histogram>,
}

impl PluginMetrics {
    fn new(metrics: &Metrics, plugin: &str) -> Arc<Self> {
        let calls = Method::ALL
            .iter()
            .map(|m| {
                (0..=16)
                    .map(|code| {
                        let code = code_name(tonic::Code::from_i32(code));
                        metrics.requests.with_label_values(&[plugin, m.name(), code])
                    })
                    .collect()
            })
            .collect();
        let durations =
            Method::ALL.iter().map(|m| metrics.duration.with_label_values(&[plugin, m.name()])).collect();
        Arc::new(Self { plugin: plugin.into(), calls, durations })
    }

    /// Counts a finished call and logs it (see [`log_call`]).
    fn record(&self, method: Method, code: i32, call: &CallLog, message: &str) {
        let code = usize::try_from(code).ok().filter(|c| *c <= 16).unwrap_or(tonic::Code::Unknown as usize);
        let elapsed = call.started.elapsed();
        self.calls[method as usize][code].inc();
        self.durations[method as usize].observe(elapsed.as_secs_f64());
        log_call(call, method, &self.plugin, code, elapsed, message);
    }
}

/// Whose limit a call's deadline is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Whose {
    /// The caller's `grpc-timeout`.
    Caller,
    /// A timeout in the gateway's configuration.
    Gateway,
}

/// The earlier of the caller's deadline and the gateway's timeout, and whose
/// it is (the caller's when they are equal).
fn earliest(caller: Option<Duration>, gateway: Option<Duration>) -> Option<(Duration, Whose)> {
    match (caller, gateway) {
        (Some(c), Some(t)) if t < c => Some((t, Whose::Gateway)),
        (Some(c), _) => Some((c, Whose::Caller)),
        (None, Some(t)) => Some((t, Whose::Gateway)),
        (None, None) => None,
    }
}

/// Shared by both proxied services.
pub struct Proxy {
    fleet: Arc<Fleet>,
    metrics: Metrics,
    /// Per backend, in the fleet's order.
    by_plugin: Vec<Arc<PluginMetrics>>,
    /// Calls the gateway answered before choosing a plugin.
    unrouted: Arc<PluginMetrics>,
    max_request_bytes: usize,
    /// Each method's path as a URI, parsed once (by `Method as usize`).
    uris: Vec<http::Uri>,
    /// How long each method's request may take to arrive when the caller
    /// sets no shorter deadline: the longest timeout the gateway sets for it
    /// over the plugins, or none when a plugin has none (by `Method as usize`).
    /// Which plugin is called, and so its own timeout, is known only once
    /// the request is in.
    arrival_caps: Vec<Option<Duration>>,
}

impl Proxy {
    /// A proxy over `fleet`.
    pub fn new(fleet: Arc<Fleet>, metrics: Metrics, max_request_bytes: usize) -> Arc<Self> {
        let by_plugin = fleet.backends.iter().map(|b| PluginMetrics::new(&metrics, &b.plugin.name)).collect();
        let unrouted = PluginMetrics::new(&metrics, "none");
        let uris = Method::ALL.iter().map(|m| method_uri(*m)).collect();
        let arrival_caps = Method::ALL
            .iter()
            .map(|m| {
                let mut caps = fleet.backends.iter().map(|b| b.plugin.timeout_for(m.name()));
                caps.try_fold(Duration::ZERO, |longest, t| t.map(|t| longest.max(t))).filter(|t| !t.is_zero())
            })
            .collect();
        Arc::new(Self { fleet, metrics, by_plugin, unrouted, max_request_bytes, uris, arrival_caps })
    }

    /// Answers one forwarded call on its stream. A client that resets the
    /// stream cancels the call to the plugin too.
    async fn serve(self: Arc<Self>, request: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
        let request = request.map(RecvBody::new);
        if let Some(response) = h2serve::until_reset(&mut respond, self.handle(request)).await {
            h2serve::respond_with(respond, response).await;
        }
    }

    async fn handle(&self, req: Request<RecvBody>) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        // The caller's request id when it sent a usable one, else a new one;
        // the plugin service gets it too, and both log it.
        let request_id = match parts.headers.get_mut(&header::REQUEST_ID) {
            Some(v) if valid_request_id(v.as_bytes()) => {
                v.set_sensitive(true); // unique per call: see `never_indexed`
                v.clone()
            }
            _ => {
                let id = never_indexed(new_request_id());
                parts.headers.insert(header::REQUEST_ID.clone(), id.clone());
                id
            }
        };
        let call = CallLog { request_id, task_type: Bytes::new(), started: Instant::now() };
        let Some(method) = Method::from_path(parts.uri.path()) else {
            let status = Status::unimplemented(format!("unknown method {}", Quoted(parts.uri.path())));
            self.metrics.requests.with_label_values(&["none", "unknown", code_name(status.code())]).inc();
            tracing::info!(
                request_id = call.request_id(),
                method = parts.uri.path(),
                code = code_name(status.code()),
                "Unknown method"
            );
            return status.into_http();
        };
        // Counted down when the call ends, however it ends (a client reset drops this future).
        let _in_flight = InFlight::enter(&self.metrics.in_flight);
        // The caller's deadline, until routing caps it with the plugin's timeout.
        let deadline =
            parts.headers.get(&header::GRPC_TIMEOUT).and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let mut pending = Pending { proxy: self, method, call, backend: None, deadline, settled: false };
        let result = self.forward(method, parts, body, &mut pending).await;
        pending.settled = true;
        match result {
            Ok(r) => r,
            Err((backend, status)) => {
                let metrics = backend.map_or(&self.unrouted, |i| &self.by_plugin[i]);
                metrics.record(method, status.code() as i32, &pending.call, status.message());
                status.into_http()
            }
        }
    }

    async fn forward(
        &self,
        method: Method,
        parts: http::request::Parts,
        body: RecvBody,
        pending: &mut Pending<'_>,
    ) -> Result<Response<Body>, (Option<usize>, Status)> {
        let none = |s: Status| (None, s);
        let call = &mut pending.call;
        let started = call.started;
        let request = self.arrive(method, body, started, pending.deadline).await.map_err(none)?;
        let arrived = started.elapsed();
        // A compressed message is read from a decompressed copy (the routing
        // key is inside) and forwarded as it came, `grpc-encoding` and all.
        let payload = &request[FRAME_HEADER_LEN..h2serve::message_end(&request)];
        let inflated = match request[0] {
            0 => None,
            flag => wire::decompressed(flag, payload, Encoding::of(&parts.headers), self.max_request_bytes)
                .map_err(none)?
                .map(Bytes::from),
        };
        let (source, message) = match &inflated {
            None => (&request, payload),
            Some(inflated) => (inflated, &inflated[..]),
        };
        let key = method.key(message).map_err(|e| {
            none(match e {
                KeyError::Malformed { .. } => Status::invalid_argument(e.to_string()),
                KeyError::Missing(m) => Status::invalid_argument(m),
            })
        })?;
        // No copy: a view into the request's bytes, kept for the log line.
        call.task_type = source.slice_ref(key.name.as_bytes());
        let state = self.fleet.state();
        let Some(index) = state.routes.lookup(key) else {
            let known = state.routes.known();
            let known = if known.is_empty() { "nothing yet".to_owned() } else { known.join(", ") };
            // With a plugin not heard from yet, the task type may be its: the
            // caller should come back, not give up.
            return Err(none(if state.unheard.is_empty() {
                Status::not_found(format!(
                    "no plugin serves task type {} version {}; the fleet knows: {known}",
                    Quoted(key.name),
                    key.version,
                ))
            } else {
                let unheard = match state.unheard.as_slice() {
                    [one] => format!("plugin {one} has"),
                    many => format!("plugins {} have", many.join(", ")),
                };
                Status::unavailable(format!(
                    "no plugin is known to serve task type {} version {} yet: {unheard} not answered \
                     ListAgents since the gateway started; the fleet knows: {known}",
                    Quoted(key.name),
                    key.version,
                ))
            }));
        };
        drop(state);
        pending.backend = Some(index);
        let call = &mut pending.call;
        let backend = &self.fleet.backends[index];
        let plugin = &backend.plugin.name;

        // The deadline: the caller's, capped by the plugin's timeout for this method.
        let limit = earliest(pending.deadline, backend.plugin.timeout_for(method.name()));
        let which = match limit {
            Some((_, Whose::Caller)) => "the caller's deadline",
            Some((_, Whose::Gateway)) => "the timeout the gateway sets for this plugin",
            None => "",
        };
        let deadline = limit.map(|(d, _)| d);
        pending.deadline = deadline;
        let expired = |d: Duration| {
            let when = if arrived >= d {
                "while the request was still arriving".to_owned()
            } else {
                format!("before plugin {:?} answered", backend.plugin.name)
            };
            Status::deadline_exceeded(format!(
                "{which} of {} passed {when}",
                flotilla_telemetry::config::HumanDuration(d)
            ))
        };
        let mut headers = parts.headers;
        // What is forwarded may be shorter than what the caller sent (ExecuteTaskSync
        // forwards the header and inputs messages only): its length is the body's own.
        headers.remove(http::header::CONTENT_LENGTH);
        backend.budget.deposit();
        let mut attempt = 1;
        // The replica whose UNAVAILABLE answer is being retried, and whether one has been.
        let mut avoid = None;
        let mut retried_unavailable = false;
        loop {
            // Each attempt carries what is left of the deadline downstream.
            let remaining = match deadline {
                Some(d) => match d.checked_sub(started.elapsed()) {
                    Some(r) if !r.is_zero() => Some(r),
                    _ => return Err((Some(index), expired(d))),
                },
                None => None,
            };
            let mut req = Request::new(Body::new(http_body_util::Full::new(request.clone())));
            // gRPC is always POST; servers that check (grpcio does) reset anything else.
            *req.method_mut() = http::Method::POST;
            *req.uri_mut() = self.uris[method as usize].clone();
            *req.headers_mut() = headers.clone();
            if let Some(r) = remaining {
                // The formatted digits become the value's bytes as they are (no second copy).
                let value = HeaderValue::from_maybe_shared(Bytes::from(format_grpc_timeout(r)))
                    .expect("digits and a unit letter");
                let value = never_indexed(value);
                req.headers_mut().insert(header::GRPC_TIMEOUT.clone(), value);
            }
            // The call's future is made where it is awaited: a `let` first
            // would keep a second copy of it in this future's state.
            let result = match (remaining, deadline) {
                (Some(r), Some(d)) => match tokio::time::timeout(r, backend.call(req, avoid)).await {
                    Ok(result) => result,
                    Err(_) => return Err((Some(index), expired(d))),
                },
                _ => backend.call(req, avoid).await,
            };
            // Retry only what cannot start a second job: idempotent methods after a
            // failure, anything when the request provably never reached a replica.
            // A replica that answered UNAVAILABLE is retried elsewhere, never on
            // itself alone: its plugin has already retried the external system
            // within the deadline, and the answer carries the plugin's own message.
            avoid = match &result {
                Ok(resp) => resp.extensions().get::<AnsweredBy>().map(|a| a.0),
                Err(_) => None,
            };
            let retry = match (&result, avoid) {
                (Err(e), _) if never_reached(e.as_ref()) => Some("connect"),
                (Err(_), _) if method.idempotent() => Some("error"),
                // Once: the plugin has retried its API already.
                (Ok(_), Some(addr)) if method.idempotent() && !retried_unavailable => {
                    retried_unavailable = true;
                    backend.endpoints.ready_besides(addr).map(|_| "unavailable")
                }
                _ => None,
            };
            if let Some(addr) = avoid {
                backend.endpoints.answered_unavailable(addr);
            }
            if let Some(reason) = retry
                && attempt < MAX_ATTEMPTS
                && backend.endpoints.any_ready().is_ok()
                && backend.budget.withdraw()
            {
                self.metrics.retries.with_label_values(&[plugin, method.name(), reason]).inc();
                tracing::debug!(request_id = call.request_id(), plugin = %plugin, method = method.name(), attempt, reason, "Retrying on another replica");
                attempt += 1;
                continue;
            }
            let response = result.map_err(|e| (Some(index), unreachable_status(&backend.plugin, &e)))?;
            return Ok(self.observe(response, index, method, call, deadline));
        }
    }

    /// Reads a call's request: its one message, or ExecuteTaskSync's header
    /// and inputs (anything the caller sends after those is read behind the
    /// call, like propeller sends it). A request still arriving when the
    /// caller's deadline passes, or with none the longest timeout the gateway
    /// sets for the method, ends then, not when the caller gets round to
    /// sending the rest. One already in, as almost every unary one is, is
    /// read on the first poll, with no timer.
    async fn arrive(
        &self,
        method: Method,
        body: RecvBody,
        started: Instant,
        caller: Option<Duration>,
    ) -> Result<Bytes, Status> {
        let read = async {
            if method == Method::ExecuteTaskSync {
                h2serve::read_sync_request(body, self.max_request_bytes).await
            } else {
                h2serve::read_request(body, self.max_request_bytes).await
            }
        };
        let mut read = std::pin::pin!(read);
        if let std::task::Poll::Ready(read) = futures_util::poll!(read.as_mut()) {
            return read;
        }
        // (A limit too far off to be an instant is none.)
        let limit = earliest(caller, self.arrival_caps[method as usize]);
        let Some((limit, whose, at)) = limit.and_then(|(d, whose)| Some((d, whose, started.checked_add(d)?)))
        else {
            return read.await;
        };
        match tokio::time::timeout_at(at.into(), read).await {
            Ok(read) => read,
            Err(_) => {
                let which = match whose {
                    Whose::Caller => "the caller's deadline".to_owned(),
                    Whose::Gateway => format!("the timeout the gateway sets for {} calls", method.name()),
                };
                Err(Status::deadline_exceeded(format!(
                    "{which} of {} passed while the request was still arriving",
                    flotilla_telemetry::config::HumanDuration(limit)
                )))
            }
        }
    }

    /// Counts the call when its status is known: in the headers of a
    /// trailers-only answer, else in the trailers at the end of the body.
    fn observe(
        &self,
        response: Response<Body>,
        index: usize,
        method: Method,
        call: &mut CallLog,
        deadline: Option<Duration>,
    ) -> Response<Body> {
        let call = CallLog {
            request_id: call.request_id.clone(),
            task_type: std::mem::take(&mut call.task_type),
            started: call.started,
        };
        let observation = Observation { metrics: self.by_plugin[index].clone(), method, call, deadline };
        if let Some(code) = response.headers().get(&header::GRPC_STATUS) {
            observation.record(code.as_bytes(), response.headers().get(&header::GRPC_MESSAGE));
            return response;
        }
        response.map(|body| Body::new(Observed { inner: body, observation: Some(observation) }))
    }
}

/// A call on its way: if its future is dropped before [`Proxy::handle`] has
/// an outcome (the caller reset the stream, or its connection closed), the
/// call is counted and logged as [`flotilla_sdk::wire::unanswered`] says, under the plugin it was
/// routed to (`none` before routing). Calls that got an answer are counted
/// where the answer's status passes (see [`Observed`]).
struct Pending<'a> {
    proxy: &'a Proxy,
    method: Method,
    call: CallLog,
    /// The plugin's index once the call is routed.
    backend: Option<usize>,
    /// The call's deadline (the caller's, or the route's when shorter), once known.
    deadline: Option<Duration>,
    /// Set once the call has an outcome, which is counted elsewhere.
    settled: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        // A panic is reported by the panic hook (and its stream reset), not here.
        if !self.settled && !std::thread::panicking() {
            let metrics = self.backend.map_or(&self.proxy.unrouted, |i| &self.proxy.by_plugin[i]);
            let status = flotilla_sdk::wire::unanswered(self.deadline, self.call.started);
            metrics.record(self.method, status.code() as i32, &self.call, status.message());
        }
    }
}

/// One call in the in-flight gauge, for as long as it lives.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn method_uri(method: Method) -> http::Uri {
    let path = match method {
        Method::CreateTask => paths::CREATE_TASK,
        Method::GetTask => paths::GET_TASK,
        Method::DeleteTask => paths::DELETE_TASK,
        Method::GetTaskMetrics => paths::GET_TASK_METRICS,
        Method::GetTaskLogs => paths::GET_TASK_LOGS,
        Method::ExecuteTaskSync => paths::EXECUTE_TASK_SYNC,
    };
    http::Uri::from_static(path)
}

/// Marks a header value that differs on every call (request id, remaining
/// deadline) as one HPACK must not index: entering it in the connection's
/// header table costs the encoder a table search and an insert (with
/// evictions) per call, and the replica's decoder the same, for an entry that
/// is never used again.
fn never_indexed(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

/// Longest caller-sent request id the gateway passes on; a longer one is replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether a caller's `x-request-id` can be passed on and logged as it is:
/// 1 to [`MAX_REQUEST_ID_LEN`] bytes of visible ASCII (no spaces or controls).
pub fn valid_request_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && id.iter().all(|b| b.is_ascii_graphic())
}

/// A new request id, `gw-<process tag>-<sequence>` in hex: unique across
/// gateway replicas (the tag is random per process; pids repeat in containers).
fn new_request_id() -> HeaderValue {
    use std::sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    };
    static PREFIX: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        format!("gw-{:012x}-", h.finish() & 0xffff_ffff_ffff)
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // The sequence in hex by hand: this runs on every call that came without an id.
    let mut buf = [0u8; 40]; // 16-byte prefix + at most 16 hex digits
    buf[..prefix.len()].copy_from_slice(prefix.as_bytes());
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    let end = prefix.len() + digits;
    for (i, slot) in buf[prefix.len()..end].iter_mut().enumerate() {
        let nibble = (n >> (4 * (digits - 1 - i))) & 0xf;
        *slot = b"0123456789abcdef"[nibble as usize];
    }
    HeaderValue::from_bytes(&buf[..end]).expect("hex digits and dashes")
}

/// What the log line of a call says about it, gathered as the call goes.
struct CallLog {
    request_id: HeaderValue,
    /// The routing key's task type: a view into the request's bytes (no copy).
    task_type: Bytes,
    started: Instant,
}

impl CallLog {
    fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }

    fn task_type(&self) -> &str {
        std::str::from_utf8(&self.task_type).unwrap_or("")
    }
}

/// A `grpc-message` as text: the protocol percent-encodes it (`%20` and the like).
fn percent_decoded(raw: &[u8]) -> String {
    percent_encoding::percent_decode(raw).decode_utf8_lossy().into_owned()
}

/// One line per finished call: `debug` when it succeeded, `info` when not.
/// The plugin service logs the same `request_id` for the same call.
fn log_call(call: &CallLog, method: Method, plugin: &str, code: usize, elapsed: Duration, message: &str) {
    let code_text = code_name(tonic::Code::from_i32(code as i32));
    if code == 0 {
        tracing::debug!(
            request_id = call.request_id(),
            method = method.name(),
            plugin,
            task_type = call.task_type(),
            code = code_text,
            duration_us = elapsed.as_micros() as u64,
            "Call forwarded"
        );
    } else {
        tracing::info!(
            request_id = call.request_id(),
            method = method.name(),
            plugin,
            task_type = call.task_type(),
            code = code_text,
            duration_us = elapsed.as_micros() as u64,
            error = message,
            "Call failed"
        );
    }
}

/// A status for a call that could not reach the plugin.
fn unreachable_status(plugin: &crate::config::Plugin, e: &BoxError) -> Status {
    let detail = flotilla_telemetry::error_chain(e.as_ref());
    Status::unavailable(format!("plugin {:?} ({}) is unreachable: {detail}", plugin.name, plugin.target_text))
}

struct Observation {
    metrics: Arc<PluginMetrics>,
    method: Method,
    call: CallLog,
    deadline: Option<Duration>,
}

impl Observation {
    /// Records the call with its `grpc-status` (and `grpc-message`, when there is one).
    fn record(&self, grpc_status: &[u8], message: Option<&HeaderValue>) {
        // Only failures are logged with their message: decoding it can wait until one is.
        let message = match message {
            Some(m) if grpc_status != b"0" => percent_decoded(m.as_bytes()),
            _ => String::new(),
        };
        self.metrics.record(self.method, tonic::Code::from_bytes(grpc_status) as i32, &self.call, &message);
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts the call when its trailers pass (or it is dropped early).
    struct Observed {
        #[pin]
        inner: Body,
        observation: Option<Observation>,
    }

    impl PinnedDrop for Observed {
        fn drop(this: Pin<&mut Self>) {
            // The caller went away before the end of the answer.
            if let Some(o) = this.project().observation.take() {
                let status = flotilla_sdk::wire::unanswered(o.deadline, o.call.started);
                o.metrics.record(o.method, status.code() as i32, &o.call, status.message());
            }
        }
    }
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(o) = this.observation.take()
                {
                    let code = trailers.get(&header::GRPC_STATUS).map_or(&b"2"[..], |v| v.as_bytes());
                    o.record(code, trailers.get(&header::GRPC_MESSAGE));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(o) = this.observation.take() {
                    o.record(b"14", None);
                }
            }
            Poll::Ready(None) => {
                if let Some(o) = this.observation.take() {
                    o.record(b"2", None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// The gRPC code's canonical name, for metric labels and logs.
pub fn code_name(code: tonic::Code) -> &'static str {
    flotilla_sdk::wire::code_name(code)
}

/// The gateway's calls, served by [`flotilla_sdk::h2serve`]: calls to
/// `AsyncAgentService` and `SyncAgentService` go straight to [`Proxy`] and are
/// polled on the connection's task; the gateway's own `AgentMetadataService`
/// and health checks are answered from the stream as the plugin services
/// answer theirs ([`flotilla_sdk::unary`]); the rest (health watches, unknown
/// services) goes to tonic's router.
pub struct GatewayCalls {
    /// The forwarding path.
    pub proxy: Arc<Proxy>,
    /// The union of the fleet's agents.
    pub metadata: crate::fleet::FleetMetadata,
    /// Answers `grpc.health.v1.Health/Check`.
    pub health: Arc<tonic_health::server::HealthService>,
    /// Largest request message accepted by `metadata` and `health`.
    pub limit: usize,
    /// Health watches and unknown services, behind the request size limit.
    pub routes: h2serve::Routes,
    /// Who may call, when authentication is on (health checks always may).
    pub auth: Option<crate::auth::Auth>,
    /// Where refused calls are counted.
    pub metrics: Metrics,
}

impl Handler for GatewayCalls {
    fn handle(&self, mut request: Request<RecvStream>, respond: SendResponse<Bytes>) -> CallFuture {
        if let Some(auth) = &self.auth
            && !request.uri().path().starts_with("/grpc.health.v1.Health/")
        {
            if !auth.allows(request.headers().get(http::header::AUTHORIZATION)) {
                return self.refuse(request.uri().path(), respond);
            }
            // The gateway's credentials are not the plugin services' business.
            request.headers_mut().remove(http::header::AUTHORIZATION);
        }
        let limit = self.limit;
        match request.uri().path() {
            path if proxied(path) => {
                let proxy = self.proxy.clone();
                Box::pin(async move { proxy.serve(request, respond).await })
            }
            paths::LIST_AGENTS => {
                let m = self.metadata.clone();
                Box::pin(flotilla_sdk::unary(request, respond, limit, move |r| async move {
                    m.list_agents(r).await
                }))
            }
            paths::GET_AGENT => {
                let m = self.metadata.clone();
                Box::pin(flotilla_sdk::unary(request, respond, limit, move |r| async move {
                    m.get_agent(r).await
                }))
            }
            paths::HEALTH_CHECK => {
                let health = self.health.clone();
                Box::pin(flotilla_sdk::unary(request, respond, limit, move |r| async move {
                    health.check(r).await
                }))
            }
            _ => Box::pin(h2serve::serve_tower(self.routes.clone(), request, respond)),
        }
    }
}

impl GatewayCalls {
    /// Answers a call without an accepted token: UNAUTHENTICATED, counted and logged.
    fn refuse(&self, path: &str, respond: SendResponse<Bytes>) -> CallFuture {
        let method =
            path.rsplit('/').next().filter(|m| crate::config::METHODS.contains(m)).unwrap_or("unknown");
        self.metrics
            .requests
            .with_label_values(&["none", method, code_name(tonic::Code::Unauthenticated)])
            .inc();
        tracing::debug!(method = path, "Refused a call without an accepted bearer token");
        h2serve::respond_status(respond, &crate::auth::refusal());
        Box::pin(std::future::ready(()))
    }
}

/// Whether `path` names a method of a service the gateway forwards.
fn proxied(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/flyteidl.service.") else { return false };
    rest.starts_with("AsyncAgentService/") || rest.starts_with("SyncAgentService/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_logged_decoded() {
        assert_eq!(
            percent_decoded(b"resource_meta%20is%20not%20an%20echo%20task%25"),
            "resource_meta is not an echo task%"
        );
        // A stray or short escape stays as it came; bytes that are not UTF-8 are replaced, not dropped.
        assert_eq!(percent_decoded(b"50% off %4"), "50% off %4");
        assert_eq!(percent_decoded(b"caf%C3%A9 %FF"), "caf\u{e9} \u{fffd}");
    }

    #[test]
    fn only_the_forwarded_services_bypass_the_router() {
        assert!(proxied("/flyteidl.service.AsyncAgentService/GetTask"));
        assert!(proxied("/flyteidl.service.SyncAgentService/ExecuteTaskSync"));
        assert!(proxied("/flyteidl.service.AsyncAgentService/NoSuchMethod")); // UNIMPLEMENTED by the proxy
        assert!(!proxied("/flyteidl.service.AgentMetadataService/ListAgents"));
        assert!(!proxied("/grpc.health.v1.Health/Check"));
        assert!(!proxied("/flyteidl.service.AsyncAgentServiceX/GetTask"));
    }

    #[test]
    fn caller_request_ids_must_be_short_visible_ascii() {
        assert!(valid_request_id(b"abc-123_X.Y:z/=+"));
        assert!(valid_request_id("x".repeat(MAX_REQUEST_ID_LEN).as_bytes()));
        assert!(!valid_request_id("x".repeat(MAX_REQUEST_ID_LEN + 1).as_bytes()));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"has space"));
        assert!(!valid_request_id(b"tab\there"));
        assert!(!valid_request_id("caf\u{e9}".as_bytes()));
    }

    #[test]
    fn generated_request_ids_are_valid_and_distinct() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert!(valid_request_id(id.as_bytes()), "{id:?}");
            assert!(id.to_str().unwrap().starts_with("gw-"), "{id:?}");
        }
        // `gw-<12 hex digits of the process tag>-<sequence in hex>`, one after the other.
        let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
        let (prefix, seq_a) = a.rsplit_once('-').unwrap();
        let (prefix_b, seq_b) = b.rsplit_once('-').unwrap();
        assert_eq!(prefix, prefix_b);
        assert_eq!(prefix.len(), 3 + 12, "{a}");
        let (seq_a, seq_b) =
            (u64::from_str_radix(seq_a, 16).unwrap(), u64::from_str_radix(seq_b, 16).unwrap());
        assert!(seq_b > seq_a, "{a} {b}");
    }
}
