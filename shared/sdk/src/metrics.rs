//! The metric families a plugin service exports, under flytekit's names so
//! existing agent dashboards keep working (`flyte_agent_*`, PROTOCOL.md §3.4).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, exponential_buckets};

/// flytekit's operation label values.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Operation {
    Create,
    Get,
    Delete,
    Do,
}

impl Operation {
    fn label(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Get => "get",
            Self::Delete => "delete",
            Self::Do => "do",
        }
    }
}

#[derive(Clone)]
pub(crate) struct AgentMetrics {
    success: IntCounterVec,
    failure: IntCounterVec,
    latency: HistogramVec,
    input_bytes: HistogramVec,
}

impl AgentMetrics {
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<Self> {
        let success = IntCounterVec::new(
            Opts::new("flyte_agent_requests_success_total", "Agent requests that succeeded"),
            &["task_type", "operation"],
        )?;
        let failure = IntCounterVec::new(
            Opts::new("flyte_agent_requests_failure_total", "Agent requests that failed"),
            &["task_type", "operation", "error_code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("flyte_agent_request_latency_seconds", "Time spent serving agent requests")
                .buckets(exponential_buckets(0.0005, 2.5, 14)?),
            &["task_type", "operation"],
        )?;
        let input_bytes = HistogramVec::new(
            HistogramOpts::new(
                "flyte_agent_input_literal_bytes",
                "Size of CreateTask and ExecuteTaskSync inputs",
            )
            .buckets(exponential_buckets(64.0, 4.0, 12)?),
            &["task_type"],
        )?;
        registry.register(Box::new(success.clone()))?;
        registry.register(Box::new(failure.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(input_bytes.clone()))?;
        Ok(Self { success, failure, latency, input_bytes })
    }

    pub(crate) fn observe(&self, task_type: &str, op: Operation, seconds: f64, error: Option<tonic::Code>) {
        let op = op.label();
        self.latency.with_label_values(&[task_type, op]).observe(seconds);
        match error {
            None => self.success.with_label_values(&[task_type, op]).inc(),
            Some(code) => {
                self.failure.with_label_values(&[task_type, op, crate::error::http_code_label(code)]).inc()
            }
        }
    }

    pub(crate) fn input_bytes(&self, task_type: &str, bytes: usize) {
        self.input_bytes.with_label_values(&[task_type]).observe(bytes as f64);
    }
}
