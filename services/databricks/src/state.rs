//! A `runs/get` answer → the Flyte phase and message of the task.
//!
//! Databricks reports a run's `state` (`life_cycle_state`, then `result_state`
//! once `TERMINATED`, plus `state_message`) and, in newer workspaces, `status`
//! (`state` and `termination_details {code, type, message}`). Every documented
//! value maps to a phase, including those upstream's connector rejects
//! (QUEUED, BLOCKED, WAITING_FOR_RETRY, SUCCESS_WITH_FAILURES, ...). Failures
//! the platform causes (termination type INTERNAL_ERROR or CLOUD_FAILURE, run
//! and cluster limits, the INTERNAL_ERROR life-cycle state) are retryable; the
//! rest are permanent. A value nobody knows yet reads as RUNNING with the raw
//! state in the message, so the task keeps being polled rather than failing.

use flotilla_sdk::proto::core::task_execution::Phase;
use serde_json::Value;

/// Termination codes for limits and capacity on the Databricks side: worth another attempt.
const TRANSIENT_CODES: &[&str] = &[
    "CLUSTER_REQUEST_LIMIT_EXCEEDED",
    "WORKSPACE_RUN_LIMIT_EXCEEDED",
    "MAX_CONCURRENT_RUNS_EXCEEDED",
    "MAX_JOB_QUEUE_SIZE_EXCEEDED",
    "MAX_SPARK_CONTEXTS_EXCEEDED",
    "INTERNAL_ERROR",
    "CLOUD_FAILURE",
];
/// Termination codes of a run that did not do its work, though its termination
/// type may be SUCCESS (Databricks: "successfully canceled").
const CANCELED_CODES: &[&str] = &["CANCELED", "USER_CANCELED", "SKIPPED"];
/// Termination types that blame the platform rather than the job.
const TRANSIENT_TYPES: &[&str] = &["INTERNAL_ERROR", "CLOUD_FAILURE"];

/// A run's phase and the message to show with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunPhase {
    /// The Flyte phase.
    pub phase: Phase,
    /// What Databricks said, or the raw state when it said nothing.
    pub message: String,
}

fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// What a terminated run's `status.termination_details` says, if anything.
struct Termination<'a> {
    code: Option<&'a str>,
    kind: Option<&'a str>,
    message: Option<&'a str>,
}

impl<'a> Termination<'a> {
    fn of(run: &'a Value) -> Self {
        let details = run.get("status").and_then(|s| s.get("termination_details")).unwrap_or(&Value::Null);
        Self { code: text(details, "code"), kind: text(details, "type"), message: text(details, "message") }
    }

    fn transient(&self) -> bool {
        self.kind.is_some_and(|t| TRANSIENT_TYPES.contains(&t))
            || self.code.is_some_and(|c| TRANSIENT_CODES.contains(&c))
    }
}

/// The phase of the run `runs/get` described, or `None` when the answer
/// carries neither `state.life_cycle_state` nor `status.state`.
pub fn phase_of(run: &Value) -> Option<RunPhase> {
    let termination = Termination::of(run);
    let state = run.get("state").unwrap_or(&Value::Null);
    let message = text(state, "state_message").or(termination.message);
    if let Some(life_cycle) = text(state, "life_cycle_state") {
        return Some(from_life_cycle(life_cycle, text(state, "result_state"), message, &termination));
    }
    let status = text(run.get("status").unwrap_or(&Value::Null), "state")?;
    Some(from_status(status, message, &termination))
}

fn said(message: Option<&str>, fallback: &str) -> String {
    message.map_or_else(|| fallback.to_owned(), str::to_owned)
}

/// A terminal failure's message: the state, then what Databricks said.
fn failure(state: &str, message: Option<&str>) -> String {
    match message {
        Some(m) => format!("{state}: {m}"),
        None => state.to_owned(),
    }
}

fn unknown(what: &str, value: &str, message: Option<&str>) -> RunPhase {
    let mut m =
        format!("Databricks reports {what} {value}, which flotilla-databricks does not know; still polling");
    if let Some(said) = message {
        m.push_str(": ");
        m.push_str(said);
    }
    RunPhase { phase: Phase::Running, message: m }
}

fn from_life_cycle(
    life_cycle: &str,
    result: Option<&str>,
    message: Option<&str>,
    termination: &Termination<'_>,
) -> RunPhase {
    let (phase, message) = match life_cycle {
        "QUEUED" | "BLOCKED" => (Phase::Queued, said(message, life_cycle)),
        "PENDING" => (Phase::Initializing, said(message, life_cycle)),
        "RUNNING" | "TERMINATING" => (Phase::Running, said(message, life_cycle)),
        "WAITING_FOR_RETRY" => (Phase::Running, failure(life_cycle, message)),
        "SKIPPED" => (Phase::Failed, failure(life_cycle, message)),
        "INTERNAL_ERROR" => (Phase::RetryableFailed, failure(life_cycle, message)),
        "TERMINATED" => return terminated(result, message, termination),
        other => return unknown("the life-cycle state", other, message),
    };
    RunPhase { phase, message }
}

fn terminated(result: Option<&str>, message: Option<&str>, termination: &Termination<'_>) -> RunPhase {
    let Some(result) = result else {
        // A run can show TERMINATED a moment before its result; the termination details may already say.
        return match termination.kind {
            Some(kind) => from_termination("TERMINATED", message, termination, kind),
            None => RunPhase { phase: Phase::Running, message: said(message, "TERMINATED (no result yet)") },
        };
    };
    let phase = match result {
        "SUCCESS" | "SUCCESS_WITH_FAILURES" => {
            return RunPhase { phase: Phase::Succeeded, message: said(message, result) };
        }
        "MAXIMUM_CONCURRENT_RUNS_REACHED" => Phase::RetryableFailed,
        // Cancelled by a user (or by DeleteTask): never retried.
        "CANCELED" | "UPSTREAM_CANCELED" => Phase::Failed,
        "FAILED" | "TIMEDOUT" | "EXCLUDED" | "UPSTREAM_FAILED" | "DISABLED" if termination.transient() => {
            Phase::RetryableFailed
        }
        "FAILED" | "TIMEDOUT" | "EXCLUDED" | "UPSTREAM_FAILED" | "DISABLED" => Phase::Failed,
        other => {
            return match termination.kind {
                Some(kind) => from_termination(other, message, termination, kind),
                None => unknown("the result state", other, message),
            };
        }
    };
    RunPhase { phase, message: failure(result, message) }
}

/// A terminated run judged by `status.termination_details.type` alone.
fn from_termination(
    state: &str,
    message: Option<&str>,
    termination: &Termination<'_>,
    kind: &str,
) -> RunPhase {
    let label = termination.code.unwrap_or(state);
    match kind {
        // Type SUCCESS means the platform had no trouble, which a run
        // canceled or skipped on purpose shares with one that succeeded.
        "SUCCESS" if termination.code.is_some_and(|c| CANCELED_CODES.contains(&c)) => {
            RunPhase { phase: Phase::Failed, message: failure(label, message) }
        }
        "SUCCESS" => RunPhase { phase: Phase::Succeeded, message: said(message, label) },
        _ if termination.transient() => {
            RunPhase { phase: Phase::RetryableFailed, message: failure(label, message) }
        }
        "CLIENT_ERROR" => RunPhase { phase: Phase::Failed, message: failure(label, message) },
        other => unknown("the termination type", other, message),
    }
}

/// The newer `status.state` (no `state` object in the answer).
fn from_status(status: &str, message: Option<&str>, termination: &Termination<'_>) -> RunPhase {
    let (phase, message) = match status {
        "QUEUED" | "BLOCKED" | "WAITING" => (Phase::Queued, said(message, status)),
        "PENDING" => (Phase::Initializing, said(message, status)),
        "RUNNING" | "TERMINATING" => (Phase::Running, said(message, status)),
        "TERMINATED" => {
            return match termination.kind {
                Some(kind) => from_termination(status, message, termination, kind),
                None => {
                    RunPhase { phase: Phase::Running, message: said(message, "TERMINATED (no result yet)") }
                }
            };
        }
        other => return unknown("the status", other, message),
    };
    RunPhase { phase, message }
}

#[cfg(test)]
mod tests;
