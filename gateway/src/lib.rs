//! The Flotilla routing gateway: one agent endpoint for propeller in front of
//! independently deployed plugin services.
//!
//! Request path, outermost first:
//! 1. an HTTP/2 server on the `h2` crate ([`flotilla_sdk::h2serve`], one task per
//!    connection, calls polled on it), which answers health checks and the
//!    gateway's own `AgentMetadataService` ([`fleet::FleetMetadata`], the union
//!    of the fleet) from the stream, and hands health watches and unknown paths
//!    to tonic's router;
//! 2. [`proxy`] for `AsyncAgentService` and `SyncAgentService`
//!    ([`proxy::GatewayCalls`]): read the first
//!    message within `max_request_bytes`, take the routing key from its bytes
//!    ([`route`]), look the category up in the route table that [`fleet`] learns
//!    from each service's `ListAgents`, cap the deadline with the plugin's timeout;
//! 3. [`backend`]: a p2c balancer per worker thread over peak-EWMA endpoints, each one
//!    HTTP/2 connection of the gateway's own client ([`crate::h2`]), fed by [`discover`];
//! 4. the plugin service, which gets the original bytes untouched.

#![warn(missing_docs)]

pub mod auth;
pub mod backend;
pub mod config;
pub mod discover;
pub mod fleet;
pub mod h2;
pub mod metrics;
pub mod proxy;
pub mod route;

use std::{collections::HashSet, net::SocketAddr, sync::Arc};

use flotilla_telemetry::{Admin, Readiness, Shutdown};
use prometheus::Registry;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

pub use config::Config;

use crate::{
    backend::Backend,
    fleet::{Fleet, FleetMetadata, poll_timeout},
    metrics::Metrics,
    proxy::{GatewayCalls, Proxy},
};

/// Why the gateway stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Registering metrics failed.
    #[error("registering metrics failed")]
    Metrics(#[from] prometheus::Error),
    /// The gRPC server failed.
    #[error("the gRPC server failed")]
    Serve(#[from] std::io::Error),
    /// A discovery target cannot be looked up at all (no resolver).
    #[error("discovery: {0}")]
    Discovery(String),
}

/// A gateway that has learned its first routes and is ready to serve.
pub struct Gateway {
    config: Config,
    fleet: Arc<Fleet>,
    metrics: Metrics,
    registry: Registry,
    last: Vec<Option<Vec<flotilla_proto::admin::Agent>>>,
    reported: HashSet<String>,
    /// Stops the discovery tasks when dropped: after serving, or if never served.
    discovery: StopOnDrop,
}

/// Triggers a shutdown when dropped.
struct StopOnDrop(Shutdown);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

impl Gateway {
    /// Builds the backends and polls every plugin's `ListAgents` once
    /// (bounded by a few seconds), so the first calls already route.
    ///
    /// # Errors
    /// When metrics cannot be registered.
    pub async fn start(config: Config) -> Result<Self, Error> {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry)?;
        let backends: Vec<Backend> = config
            .plugins
            .iter()
            .map(|p| Backend::new(p.clone(), config.connect_timeout, &metrics))
            .collect();
        // Discovery runs from the start: static targets fill at once, DNS ones
        // after their first lookup, which the first route poll waits for (bounded).
        // The first lookups run together: with DNS unreachable each waits out
        // its resolver's timeout, and one after another they would add up.
        let discovery = Shutdown::new();
        let lookups = (backends.iter())
            .map(|b| discover::Lookup::new(&b.plugin).map_err(Error::Discovery))
            .collect::<Result<Vec<_>, _>>()?;
        let firsts = futures_util::future::join_all(lookups.iter().map(discover::Lookup::resolve)).await;
        for ((b, lookup), first) in backends.iter().zip(lookups).zip(firsts) {
            if let Ok(first) = first
                && !first.addrs.is_empty()
            {
                b.endpoints.update(&first.addrs);
            }
            tokio::spawn(discover::run(
                lookup,
                b.endpoints.clone(),
                config.dns_ttl_floor,
                config.dns_ttl_ceiling,
                discovery.clone(),
            ));
        }
        let fleet = Arc::new(Fleet::new(backends, metrics.clone()));
        let mut last = vec![None; config.plugins.len()];
        let mut reported = HashSet::new();
        fleet.refresh(&mut last, &mut reported, poll_timeout(config.refresh_interval)).await;
        Ok(Self { config, fleet, metrics, registry, last, reported, discovery: StopOnDrop(discovery) })
    }

    /// The fleet (backends and learned routes).
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Serves on `grpc` and `admin` until `shutdown`, then drains in-flight
    /// calls within the configured grace.
    ///
    /// # Errors
    /// When the gRPC server fails.
    pub async fn serve(self, grpc: TcpListener, admin: TcpListener, shutdown: Shutdown) -> Result<(), Error> {
        let Self { config, fleet, metrics, registry, last, reported, discovery: _discovery } = self;
        let readiness = Readiness::default();
        let admin_task = Admin { registry, readiness: readiness.clone() }.spawn(admin);
        let refresher = tokio::spawn(fleet.clone().keep_refreshing(
            last,
            reported,
            config.refresh_interval,
            shutdown.clone(),
        ));

        let (health, health_service) = flotilla_sdk::health_reporter(config.max_request_bytes);
        flotilla_sdk::set_health(&health, ServingStatus::Serving).await;
        let proxy = Proxy::new(fleet.clone(), metrics.clone(), config.max_request_bytes);
        let addr: Option<SocketAddr> = grpc.local_addr().ok();
        // The request size limit holds here too (RESOURCE_EXHAUSTED naming it, not tonic's 4 MiB).
        let routes = tonic::service::Routes::new(health_service);
        let routes = flotilla_sdk::h2serve::limited_routes(routes, config.max_request_bytes);
        let calls = Arc::new(GatewayCalls {
            proxy,
            metadata: FleetMetadata(fleet),
            health: Arc::new(tonic_health::server::HealthService::from_health_reporter(health.clone())),
            limit: config.max_request_bytes,
            routes,
            auth: config.auth.clone(),
            metrics,
        });
        let stopping = flotilla_sdk::stopping(&shutdown, readiness.clone(), health, addr);
        readiness.set(true);
        tracing::info!(
            addr = %flotilla_sdk::shown(addr),
            plugins = config.plugins.len(),
            auth = if config.auth.is_some() { "bearer" } else { "off" },
            tls = config.tls.is_some(),
            "Gateway serving"
        );
        let result = flotilla_sdk::with_grace(
            flotilla_sdk::h2serve::serve(grpc, config.tls.clone(), calls, stopping),
            &shutdown,
            config.shutdown_grace,
        )
        .await;
        shutdown.trigger();
        let _ = refresher.await;
        // Only now: through the drain, /readyz said 503 and /metrics still answered.
        admin_task.stop().await;
        result.map_err(Error::from)
    }
}

/// Starts and serves a gateway until `shutdown`.
///
/// # Errors
/// See [`Gateway::start`] and [`Gateway::serve`].
pub async fn run(
    config: Config,
    grpc: TcpListener,
    admin: TcpListener,
    shutdown: Shutdown,
) -> Result<(), Error> {
    Gateway::start(config).await?.serve(grpc, admin, shutdown).await
}
