//! The gateway's metric families, registered on the registry it is given.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, exponential_buckets,
};

/// Every gateway metric.
#[derive(Clone)]
pub struct Metrics {
    /// Calls by plugin, method and gRPC status code name.
    pub requests: IntCounterVec,
    /// Call latency (to the end of the response) by plugin and method.
    pub duration: HistogramVec,
    /// Calls in flight.
    pub in_flight: IntGauge,
    /// Known endpoints by plugin and state.
    pub endpoints: IntGaugeVec,
    /// Discovery refreshes by plugin.
    pub discovery_refreshes: IntCounterVec,
    /// Discovery errors by plugin.
    pub discovery_errors: IntCounterVec,
    /// Replicas added to or removed from a plugin by discovery.
    pub discovery_changes: IntCounterVec,
    /// Replicas ejected after failing, by plugin.
    pub ejections: IntCounterVec,
    /// Route-table refreshes (ListAgents polls) by plugin and result.
    pub route_refreshes: IntCounterVec,
    /// Categories claimed by more than one plugin, right now.
    pub route_conflicts: IntGauge,
    /// Retries by plugin, method and reason (`connect`: never reached a replica; `error`, `unavailable`).
    pub retries: IntCounterVec,
}

impl Metrics {
    /// Registers every family on `registry`.
    ///
    /// # Errors
    /// When a name is already registered there.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "flotilla_gateway_requests_total",
                    "Calls answered, by plugin, method and gRPC code",
                ),
                &["plugin", "method", "code"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "flotilla_gateway_request_duration_seconds",
                    "Call latency through the gateway",
                )
                .buckets(exponential_buckets(0.0001, 2.5, 15)?),
                &["plugin", "method"],
            )?,
            in_flight: IntGauge::new("flotilla_gateway_in_flight_requests", "Calls being served")?,
            endpoints: IntGaugeVec::new(
                Opts::new(
                    "flotilla_gateway_endpoints",
                    "Plugin replicas by state: discovered; ready and ejected (as of the last change or ListAgents poll)",
                ),
                &["plugin", "state"],
            )?,
            discovery_refreshes: IntCounterVec::new(
                Opts::new("flotilla_gateway_discovery_refreshes_total", "Discovery lookups"),
                &["plugin"],
            )?,
            discovery_errors: IntCounterVec::new(
                Opts::new("flotilla_gateway_discovery_errors_total", "Discovery lookups that failed"),
                &["plugin"],
            )?,
            discovery_changes: IntCounterVec::new(
                Opts::new("flotilla_gateway_discovery_changes_total", "Replicas discovery added or removed"),
                &["plugin", "change"],
            )?,
            ejections: IntCounterVec::new(
                Opts::new("flotilla_gateway_ejections_total", "Replicas ejected after failing"),
                &["plugin"],
            )?,
            route_refreshes: IntCounterVec::new(
                Opts::new(
                    "flotilla_gateway_route_refreshes_total",
                    "ListAgents polls of plugin services, by result",
                ),
                &["plugin", "result"],
            )?,
            route_conflicts: IntGauge::new(
                "flotilla_gateway_route_conflicts",
                "Task categories claimed by more than one plugin service",
            )?,
            retries: IntCounterVec::new(
                Opts::new("flotilla_gateway_retries_total", "Calls retried on another replica"),
                &["plugin", "method", "reason"],
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(m.endpoints.clone()))?;
        registry.register(Box::new(m.discovery_refreshes.clone()))?;
        registry.register(Box::new(m.discovery_errors.clone()))?;
        registry.register(Box::new(m.discovery_changes.clone()))?;
        registry.register(Box::new(m.ejections.clone()))?;
        registry.register(Box::new(m.route_refreshes.clone()))?;
        registry.register(Box::new(m.route_conflicts.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        Ok(m)
    }

    /// Starts `plugin`'s counters at zero, so every family is on `/metrics`
    /// from the start (a rate over a series that appears at its first event
    /// misses that event, and a dashboard or alert sees nothing until then).
    /// The request counters are started where the proxy resolves them.
    pub fn declare_plugin(&self, plugin: &str) {
        let _ = self.discovery_refreshes.with_label_values(&[plugin]);
        let _ = self.discovery_errors.with_label_values(&[plugin]);
        for change in ["added", "removed"] {
            let _ = self.discovery_changes.with_label_values(&[plugin, change]);
        }
        let _ = self.ejections.with_label_values(&[plugin]);
        for result in ["ok", "unimplemented", "error", "timeout"] {
            let _ = self.route_refreshes.with_label_values(&[plugin, result]);
        }
        // Every method may be retried when it never reached a replica; the idempotent ones after
        // an error or an UNAVAILABLE answer too.
        for method in ["CreateTask", "ExecuteTaskSync"] {
            let _ = self.retries.with_label_values(&[plugin, method, "connect"]);
        }
        for method in ["GetTask", "DeleteTask", "GetTaskMetrics", "GetTaskLogs"] {
            for reason in ["connect", "error", "unavailable"] {
                let _ = self.retries.with_label_values(&[plugin, method, reason]);
            }
        }
    }
}
