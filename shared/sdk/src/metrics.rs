//! The metric families a plugin service exports, under flytekit's names so
//! existing agent dashboards keep working (`flyte_agent_*`, PROTOCOL.md §3.4).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use prometheus::{
    IntCounterVec, IntGauge, Opts, Registry,
    core::{Collector, Desc},
    proto::{LabelPair, Metric, MetricFamily, MetricType, Summary},
};

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
    latency: SummaryVec,
    input_bytes: SummaryVec,
    /// Calls in the plugin: from their request read and decoded to their
    /// answer ready to send (or their end unanswered). Flotilla's own, as the
    /// gateway's; a request refused before that is not counted.
    pub(crate) in_flight: IntGauge,
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
        // Summaries without quantiles (a count and a sum), as flytekit's
        // prometheus_client `Summary` exports them.
        let latency = SummaryVec::new(
            "flyte_agent_request_latency_seconds",
            "Time spent serving agent requests",
            &["task_type", "operation"],
        )?;
        let input_bytes =
            SummaryVec::new("flyte_agent_input_literal_bytes", "Size of CreateTask inputs", &["task_type"])?;
        registry.register(Box::new(success.clone()))?;
        registry.register(Box::new(failure.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        let in_flight = IntGauge::new(
            "flotilla_service_in_flight_requests",
            "Task calls (create, get, delete, sync execute, metrics, logs) being served",
        )?;
        registry.register(Box::new(input_bytes.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        Ok(Self { success, failure, latency, input_bytes, in_flight })
    }

    /// Starts the success and latency series of every task type the agents
    /// serve (and input sizes of the async ones), at zero: a dashboard sees
    /// each task type before its first call.
    pub(crate) fn declare(&self, agents: &[crate::AgentSpec]) {
        for agent in agents {
            let ops: &[Operation] = if agent.is_sync {
                &[Operation::Do]
            } else {
                &[Operation::Create, Operation::Get, Operation::Delete]
            };
            for category in &agent.categories {
                let task_type = category.name.as_str();
                for op in ops {
                    let _ = self.success.with_label_values(&[task_type, op.label()]);
                    self.latency.declare(&[task_type, op.label()]);
                }
                // flytekit observes input sizes at CreateTask only.
                if !agent.is_sync {
                    self.input_bytes.declare(&[task_type]);
                }
            }
        }
    }

    pub(crate) fn observe(&self, task_type: &str, op: Operation, seconds: f64, error: Option<tonic::Code>) {
        let op = op.label();
        self.latency.observe(&[task_type, op], seconds);
        match error {
            None => self.success.with_label_values(&[task_type, op]).inc(),
            Some(code) => {
                self.failure.with_label_values(&[task_type, op, crate::error::http_code_label(code)]).inc()
            }
        }
    }

    pub(crate) fn input_bytes(&self, task_type: &str, bytes: usize) {
        self.input_bytes.observe(&[task_type], bytes as f64);
    }
}

/// A Prometheus summary with no quantiles, by label values: each series'
/// count and sum of observations (the `_count` and `_sum` samples). The
/// prometheus crate has no summary type; this is the part flytekit exports.
/// Cloned with every call's services: one shared allocation, not a copy.
#[derive(Clone)]
struct SummaryVec(Arc<SummaryInner>);

struct SummaryInner {
    desc: Desc,
    label_names: Vec<String>,
    /// By a hash of the label values (callers name task types, so there may
    /// be many), each hash's series in a short list: found without allocating.
    series: Mutex<HashMap<u64, Vec<Series>>>,
}

/// One series of a [`SummaryVec`]: its label values, count and sum.
type Series = (Vec<String>, u64, f64);

impl SummaryVec {
    fn new(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<Self> {
        let label_names: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        let desc = Desc::new(name.to_owned(), help.to_owned(), label_names.clone(), HashMap::new())?;
        Ok(Self(Arc::new(SummaryInner { desc, label_names, series: Mutex::default() })))
    }

    /// Adds one observation to the series of `values` (one per label name).
    fn observe(&self, values: &[&str], value: f64) {
        let mut series = self.0.series.lock().unwrap_or_else(PoisonError::into_inner);
        let (_, count, sum) = series_of(&mut series, values);
        *count += 1;
        *sum += value;
    }

    /// Starts the series of `values` at zero, when it has not started.
    fn declare(&self, values: &[&str]) {
        let mut series = self.0.series.lock().unwrap_or_else(PoisonError::into_inner);
        series_of(&mut series, values);
    }
}

/// The series of `values` in `series`, added at zero when missing.
fn series_of<'a>(series: &'a mut HashMap<u64, Vec<Series>>, values: &[&str]) -> &'a mut Series {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::hash::DefaultHasher::new();
    values.hash(&mut hasher);
    let same_hash = series.entry(hasher.finish()).or_default();
    let same = |k: &[String]| k.iter().map(String::as_str).eq(values.iter().copied());
    let index = match same_hash.iter().position(|(k, _, _)| same(k)) {
        Some(i) => i,
        None => {
            same_hash.push((values.iter().map(|v| (*v).to_owned()).collect(), 0, 0.0));
            same_hash.len() - 1
        }
    };
    &mut same_hash[index]
}

impl Collector for SummaryVec {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let series = self.0.series.lock().unwrap_or_else(PoisonError::into_inner);
        if series.is_empty() {
            return Vec::new();
        }
        let mut family = MetricFamily::default();
        family.set_name(self.0.desc.fq_name.clone());
        family.set_help(self.0.desc.help.clone());
        family.set_field_type(MetricType::SUMMARY);
        for (values, count, sum) in series.values().flatten() {
            let mut metric = Metric::default();
            let mut labels: Vec<LabelPair> = self
                .0
                .label_names
                .iter()
                .zip(values)
                .map(|(name, value)| {
                    let mut pair = LabelPair::default();
                    pair.set_name(name.clone());
                    pair.set_value(value.clone());
                    pair
                })
                .collect();
            // By name, as the prometheus crate orders its own series' labels.
            labels.sort_by(|a, b| a.name().cmp(b.name()));
            metric.set_label(labels);
            let mut summary = Summary::default();
            summary.set_sample_count(*count);
            summary.set_sample_sum(*sum);
            metric.set_summary(summary);
            family.mut_metric().push(metric);
        }
        vec![family]
    }
}

/// One call counted in [`AgentMetrics::in_flight`] while it lives: dropped
/// when the call ends, answered or not.
pub(crate) struct InFlight<'a>(&'a IntGauge);

impl<'a> InFlight<'a> {
    pub(crate) fn enter(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
