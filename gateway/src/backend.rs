//! One plugin service as the gateway sees it: a bounded `Buffer` in front of
//! a p2c `Balance` over peak-EWMA endpoints, each an h2 client (tonic
//! `Channel`) to one replica, fed by [`Discovery`].

use std::{net::SocketAddr, time::Duration};

use flotilla_proto::service::agent_metadata_service_client::AgentMetadataServiceClient;
use tonic::{
    body::Body,
    transport::{Channel, Endpoint},
};
use tower::{
    BoxError, ServiceExt,
    balance::p2c::Balance,
    buffer::Buffer,
    load::{CompleteOnResponse, PeakEwma},
    util::BoxCloneSyncService,
};

use crate::{config::Plugin, discover::Discovery, metrics::Metrics};

/// How many calls may wait for a ready endpoint before callers are refused.
const BUFFER: usize = 1024;
/// The latency an endpoint is assumed to have before it has answered anything.
const DEFAULT_RTT: Duration = Duration::from_millis(20);
/// How fast peak-EWMA forgets a latency peak.
const DECAY: Duration = Duration::from_secs(10);

/// The balanced service calls go through.
pub type BackendService = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError>;

/// The balanced service with errors as statuses, for the generated clients.
#[derive(Clone)]
pub struct MetadataService(BackendService);

impl tower::Service<http::Request<Body>> for MetadataService {
    type Response = http::Response<Body>;
    type Error = tonic::Status;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<http::Response<Body>, tonic::Status>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), tonic::Status>> {
        self.0.poll_ready(cx).map_err(to_status)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let call = self.0.call(req);
        Box::pin(async move { call.await.map_err(to_status) })
    }
}

fn to_status(e: BoxError) -> tonic::Status {
    tonic::Status::unavailable(flotilla_telemetry::error_chain(e.as_ref()))
}

/// A plugin service behind the gateway.
pub struct Backend {
    /// The plugin's configuration.
    pub plugin: Plugin,
    /// Calls go here.
    pub service: BackendService,
    _discovery: Discovery<PeakEwma<Channel>>,
}

impl Backend {
    /// Builds the backend and starts its discovery. Connections are made lazily.
    pub fn new(plugin: Plugin, connect_timeout: Duration, metrics: &Metrics) -> Self {
        let (discovery, stream) = Discovery::new();
        let n = discovery.start(&plugin.target, |addr| endpoint(addr, connect_timeout));
        metrics.discovery_refreshes.with_label_values(&[&plugin.name]).inc();
        metrics.endpoints.with_label_values(&[&plugin.name, "discovered"]).set(n as i64);
        let balance = Balance::new(stream);
        let buffered = Buffer::new(balance, BUFFER);
        Self { plugin, service: BoxCloneSyncService::new(buffered), _discovery: discovery }
    }

    /// A metadata client over the balanced service (used to poll `ListAgents`).
    /// (The error is made a concrete type: tonic's client futures are not
    /// `Send` over a boxed error, because of how its bounds are written.)
    pub fn metadata_client(&self) -> AgentMetadataServiceClient<MetadataService> {
        AgentMetadataServiceClient::new(MetadataService(self.service.clone()))
    }

    /// Sends one call.
    ///
    /// # Errors
    /// Connection and balancing errors, unchanged.
    pub async fn call(&self, req: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        self.service.clone().oneshot(req).await
    }
}

fn endpoint(addr: SocketAddr, connect_timeout: Duration) -> PeakEwma<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("an http:// URI with a socket address is valid")
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_lazy();
    PeakEwma::new(channel, DEFAULT_RTT, DECAY.as_nanos() as f64, CompleteOnResponse::default())
}
