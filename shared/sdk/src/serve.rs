//! [`serve`]: one plugin, a gRPC listener and an admin listener → a complete service.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use flotilla_proto::service::async_agent_service_server::AsyncAgentServiceServer;
use flotilla_telemetry::{Admin, Readiness, Shutdown};
use prometheus::Registry;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic_health::ServingStatus;

use crate::{
    Plugin,
    calls::ServiceCalls,
    metrics::AgentMetrics,
    service::{Services, Table},
    tls::ServerTls,
};

/// Limits and timings of a plugin service.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Largest request message accepted; larger ones get `RESOURCE_EXHAUSTED`.
    pub max_request_bytes: usize,
    /// After shutdown starts, how long in-flight calls may take to finish.
    pub shutdown_grace: Duration,
    /// TLS on the gRPC listener; `None`: plaintext HTTP/2 (h2c).
    pub tls: Option<ServerTls>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self { max_request_bytes: 16 * 1024 * 1024, shutdown_grace: Duration::from_secs(30), tls: None }
    }
}

/// Why a service could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The plugin's agent declarations contradict each other.
    #[error("the plugin's agents are inconsistent: {0}")]
    Agents(String),
    /// Registering metrics failed (a duplicate name).
    #[error("registering metrics failed")]
    Metrics(#[source] prometheus::Error),
    /// The gRPC server failed.
    #[error("the gRPC server failed")]
    Serve(#[source] std::io::Error),
}

/// Serves `plugin` on `grpc` (the three agent services and `grpc.health.v1`)
/// and `admin` (`/metrics`, `/livez`, `/readyz`) until `shutdown` fires. Then it
/// stops accepting, reports NOT_SERVING, lets in-flight calls finish within
/// [`ServeOptions::shutdown_grace`], and returns.
///
/// # Errors
/// [`ServeError`] when the plugin's declarations are inconsistent or the server fails.
pub async fn serve<P: Plugin>(
    plugin: P,
    grpc: TcpListener,
    admin: TcpListener,
    options: ServeOptions,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    serve_with_registry(plugin, grpc, admin, options, shutdown, Registry::new()).await
}

pub(crate) async fn serve_with_registry<P: Plugin>(
    plugin: P,
    grpc: TcpListener,
    admin: TcpListener,
    options: ServeOptions,
    shutdown: Shutdown,
    registry: Registry,
) -> Result<(), ServeError> {
    let agents = plugin.agents();
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let metrics = AgentMetrics::register(&registry).map_err(ServeError::Metrics)?;
    metrics.declare(&agents);
    let table = Table::new(agents).map_err(ServeError::Agents)?;
    let services = Services::new(Arc::new(plugin), table, metrics);

    let (health, health_service) = health_reporter(options.max_request_bytes);
    set_health(&health, ServingStatus::Serving).await;

    let readiness = Readiness::default();
    let admin_task = Admin { registry, readiness: readiness.clone() }.spawn(admin);

    let limit = options.max_request_bytes;
    let grpc_addr: Option<SocketAddr> = grpc.local_addr().ok();
    // Every agent method but GetTaskLogs, and health checks, are answered
    // straight from the HTTP/2 stream (crate::calls); GetTaskLogs and health
    // watches go to tonic's router, our size limit first (as bytes arrive;
    // tonic's own would answer OUT_OF_RANGE).
    let routes = tonic::service::Routes::new(health_service).add_service(
        AsyncAgentServiceServer::new(services.clone())
            .max_decoding_message_size(limit)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Deflate),
    );
    let routes = crate::h2serve::limited_routes(routes, limit);
    let check = Arc::new(tonic_health::server::HealthService::from_health_reporter(health.clone()));
    let calls = Arc::new(ServiceCalls { services, routes, limit, health: check });

    let stopping = stopping(&shutdown, readiness.clone(), health, grpc_addr);
    readiness.set(true);
    tracing::info!(addr = ?grpc_addr, agents = ?names, "Serving");
    let served = crate::h2serve::serve(grpc, options.tls, calls, stopping);
    let result = with_grace(served, &shutdown, options.shutdown_grace).await;
    shutdown.trigger();
    // Only now: through the drain, /readyz said 503 and /metrics still answered.
    admin_task.stop().await;
    result.map_err(ServeError::Serve)
}

/// Runs a server future that stops by itself on `shutdown`, but gives up on
/// it `grace` after shutdown starts (in-flight calls that outlive the grace are cut).
///
/// # Errors
/// The server's own error.
pub async fn with_grace<E>(
    served: impl std::future::Future<Output = Result<(), E>>,
    shutdown: &Shutdown,
    grace: Duration,
) -> Result<(), E> {
    tokio::pin!(served);
    tokio::select! {
        r = &mut served => r,
        () = async {
            shutdown.wait().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "In-flight calls outlived the shutdown grace; closing them");
            Ok(())
        }
    }
}

/// The gRPC health names every Flotilla server reports, as upstream's agent
/// server does: the server as a whole, each agent service and the health
/// service itself.
const HEALTH_NAMES: [&str; 5] = [
    "",
    "flyteidl.service.AsyncAgentService",
    "flyteidl.service.SyncAgentService",
    "flyteidl.service.AgentMetadataService",
    "grpc.health.v1.Health",
];

/// A health reporter and the `grpc.health.v1.Health` service over it, for
/// tonic's router. `Check` is tonic-health's. `Watch` follows the
/// health-checking protocol where tonic-health does not: a name the server
/// does not report gets one `SERVICE_UNKNOWN` answer and the stream stays
/// open (tonic-health answers an error). And every watch ends once the
/// server stops (its last answer, for a name it reports, `NOT_SERVING`), so
/// that a watching client never holds a graceful shutdown for its grace.
///
/// Requests to it are held to `max_request_bytes`, and may come compressed
/// (gzip or deflate), as every request to a Flotilla server may.
pub fn health_reporter(
    max_request_bytes: usize,
) -> (tonic_health::server::HealthReporter, tonic_health::pb::health_server::HealthServer<HealthWatch>) {
    let (reporter, _) = tonic_health::server::health_reporter();
    let inner = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
    let server = tonic_health::pb::health_server::HealthServer::new(HealthWatch(inner))
        .max_decoding_message_size(max_request_bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate);
    (reporter, server)
}

/// See [`health_reporter`].
pub struct HealthWatch(tonic_health::server::HealthService);

type HealthAnswer = Result<tonic_health::pb::HealthCheckResponse, tonic::Status>;
type WatchStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = HealthAnswer> + Send>>;

#[tonic::codegen::async_trait]
impl tonic_health::pb::health_server::Health for HealthWatch {
    async fn check(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
        self.0.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<WatchStream>, tonic::Status> {
        use futures_util::StreamExt as _;
        use tonic_health::pb::{
            HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
        };
        let unknown = !HEALTH_NAMES.contains(&request.get_ref().service.as_str());
        // A name the server does not report follows the server's own status (""), shown as unknown.
        let request = if unknown { tonic::Request::new(HealthCheckRequest::default()) } else { request };
        let updates = self.0.watch(request).await?.into_inner();
        // NOT_SERVING is only ever reported when the server stops: the watch ends after it. `None` marks the end.
        let steps = updates.flat_map(move |answer: HealthAnswer| {
            let stopping = matches!(&answer, Ok(r) if r.status == ServingStatus::NotServing as i32);
            let shown = match (unknown, stopping) {
                (false, _) => Some(answer),
                (true, false) => {
                    Some(Ok(HealthCheckResponse { status: ServingStatus::ServiceUnknown as i32 }))
                }
                (true, true) => None,
            };
            futures_util::stream::iter(shown.map(Some).into_iter().chain(stopping.then_some(None)))
        });
        let answers =
            steps.take_while(|step| std::future::ready(step.is_some())).filter_map(std::future::ready);
        Ok(tonic::Response::new(answers.boxed()))
    }
}

/// Reports `status` for the server and each agent service.
pub async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for name in HEALTH_NAMES {
        health.set_service_status(name, status).await;
    }
}

/// A listener's address for a log line: `-` when the socket could not say.
pub fn shown(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "-".to_owned(), |a| a.to_string())
}

/// The signal a server stops on: when `shutdown` fires it reports not
/// ready and NOT_SERVING first, so probes and balancers move away while
/// in-flight calls finish.
pub fn stopping(
    shutdown: &Shutdown,
    readiness: Readiness,
    health: tonic_health::server::HealthReporter,
    addr: Option<SocketAddr>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let wait = shutdown.wait();
    async move {
        wait.await;
        readiness.set(false);
        set_health(&health, ServingStatus::NotServing).await;
        tracing::info!(addr = %shown(addr), "Shutting down: refusing new calls, finishing in-flight ones");
    }
}
