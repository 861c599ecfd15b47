//! Helpers to build the [`Resource`] a `get` or `execute` answers with.
//! Each sets `phase`, which propeller needs (an unset phase reads as a retryable failure).

use flotilla_proto::{admin::Resource, core::LiteralMap, core::task_execution::Phase};

/// A resource in `phase` with a human message.
pub fn with_phase(phase: Phase, message: impl Into<String>) -> Resource {
    Resource { phase: phase as i32, message: message.into(), ..Default::default() }
}

/// A task that is still running.
pub fn running(message: impl Into<String>) -> Resource {
    with_phase(Phase::Running, message)
}

/// A task that finished, with its outputs inline.
pub fn succeeded(outputs: Option<LiteralMap>) -> Resource {
    Resource { phase: Phase::Succeeded as i32, outputs, ..Default::default() }
}

/// A task that failed for good; `message` says why.
pub fn failed(message: impl Into<String>) -> Resource {
    with_phase(Phase::Failed, message)
}

/// A task that failed for a transient reason; propeller retries it.
pub fn retryable_failed(message: impl Into<String>) -> Resource {
    with_phase(Phase::RetryableFailed, message)
}
