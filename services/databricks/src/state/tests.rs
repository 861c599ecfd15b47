use serde_json::json;

use super::*;

fn legacy(life_cycle: &str, result: Option<&str>, message: &str) -> Value {
    let mut state = json!({ "life_cycle_state": life_cycle, "state_message": message });
    if let Some(r) = result {
        state["result_state"] = json!(r);
    }
    json!({ "job_id": 1, "run_id": 2, "state": state })
}

fn phase(run: &Value) -> Phase {
    phase_of(run).expect("a phase").phase
}

#[test]
fn every_documented_life_cycle_state_maps() {
    let cases = [
        ("QUEUED", Phase::Queued),
        ("BLOCKED", Phase::Queued),
        ("PENDING", Phase::Initializing),
        ("RUNNING", Phase::Running),
        ("TERMINATING", Phase::Running),
        ("WAITING_FOR_RETRY", Phase::Running),
        ("SKIPPED", Phase::Failed),
        ("INTERNAL_ERROR", Phase::RetryableFailed),
    ];
    for (state, want) in cases {
        assert_eq!(phase(&legacy(state, None, "")), want, "{state}");
    }
}

#[test]
fn every_documented_result_state_maps() {
    let cases = [
        ("SUCCESS", Phase::Succeeded),
        ("SUCCESS_WITH_FAILURES", Phase::Succeeded),
        ("FAILED", Phase::Failed),
        ("TIMEDOUT", Phase::Failed),
        ("CANCELED", Phase::Failed),
        ("EXCLUDED", Phase::Failed),
        ("UPSTREAM_FAILED", Phase::Failed),
        ("UPSTREAM_CANCELED", Phase::Failed),
        ("DISABLED", Phase::Failed),
        ("MAXIMUM_CONCURRENT_RUNS_REACHED", Phase::RetryableFailed),
    ];
    for (result, want) in cases {
        assert_eq!(phase(&legacy("TERMINATED", Some(result), "")), want, "{result}");
    }
}

#[test]
fn failures_carry_the_state_and_message() {
    let p = phase_of(&legacy("TERMINATED", Some("FAILED"), "Task x failed: boom")).unwrap();
    assert_eq!(p, RunPhase { phase: Phase::Failed, message: "FAILED: Task x failed: boom".to_owned() });
    let p = phase_of(&legacy("RUNNING", None, "In run")).unwrap();
    assert_eq!(p.message, "In run");
    let p = phase_of(&legacy("PENDING", None, "")).unwrap();
    assert_eq!(p.message, "PENDING");
}

#[test]
fn platform_failures_are_retryable() {
    for (code, kind) in [
        ("CLOUD_FAILURE", "CLOUD_FAILURE"),
        ("DRIVER_ERROR", "INTERNAL_ERROR"),
        ("WORKSPACE_RUN_LIMIT_EXCEEDED", "CLIENT_ERROR"),
    ] {
        let mut run = legacy("TERMINATED", Some("FAILED"), "");
        run["status"] = json!({ "state": "TERMINATED",
            "termination_details": { "code": code, "type": kind, "message": "spot instances lost" } });
        let p = phase_of(&run).unwrap();
        assert_eq!(p.phase, Phase::RetryableFailed, "{code}/{kind}");
        assert_eq!(p.message, "FAILED: spot instances lost");
    }
    let mut user = legacy("TERMINATED", Some("FAILED"), "bad code");
    user["status"] =
        json!({ "termination_details": { "code": "RUN_EXECUTION_ERROR", "type": "CLIENT_ERROR" } });
    assert_eq!(phase(&user), Phase::Failed);
    let mut cancelled = legacy("TERMINATED", Some("CANCELED"), "");
    cancelled["status"] =
        json!({ "termination_details": { "code": "INTERNAL_ERROR", "type": "INTERNAL_ERROR" } });
    assert_eq!(phase(&cancelled), Phase::Failed);
}

#[test]
fn unknown_states_keep_polling_with_the_raw_state() {
    let p = phase_of(&legacy("HIBERNATING", None, "zzz")).unwrap();
    assert_eq!(p.phase, Phase::Running);
    assert!(p.message.contains("HIBERNATING") && p.message.contains("zzz"), "{}", p.message);
    let p = phase_of(&legacy("TERMINATED", Some("PARTIALLY_DONE"), "")).unwrap();
    assert_eq!(p.phase, Phase::Running);
    assert!(p.message.contains("PARTIALLY_DONE"), "{}", p.message);
    assert_eq!(phase(&legacy("TERMINATED", None, "")), Phase::Running);
}

#[test]
fn the_newer_status_alone_is_enough() {
    let cases = [
        (json!({ "state": "QUEUED" }), Phase::Queued),
        (json!({ "state": "BLOCKED" }), Phase::Queued),
        (json!({ "state": "WAITING" }), Phase::Queued),
        (json!({ "state": "PENDING" }), Phase::Initializing),
        (json!({ "state": "RUNNING" }), Phase::Running),
        (json!({ "state": "TERMINATING" }), Phase::Running),
        (
            json!({ "state": "TERMINATED", "termination_details": { "code": "SUCCESS", "type": "SUCCESS" } }),
            Phase::Succeeded,
        ),
        (
            json!({ "state": "TERMINATED", "termination_details": { "code": "DRIVER_ERROR", "type": "CLIENT_ERROR" } }),
            Phase::Failed,
        ),
        (
            json!({ "state": "TERMINATED", "termination_details": { "code": "CLUSTER_ERROR", "type": "CLOUD_FAILURE" } }),
            Phase::RetryableFailed,
        ),
        (
            json!({ "state": "TERMINATED", "termination_details": { "code": "SUCCESS_WITH_FAILURES", "type": "SUCCESS" } }),
            Phase::Succeeded,
        ),
        // Canceled or skipped runs terminate "without any issues" too: not a success for the task.
        (
            json!({ "state": "TERMINATED", "termination_details": { "code": "USER_CANCELED", "type": "SUCCESS" } }),
            Phase::Failed,
        ),
        (
            json!({ "state": "TERMINATED", "termination_details": { "code": "CANCELED", "type": "SUCCESS" } }),
            Phase::Failed,
        ),
        (
            json!({ "state": "TERMINATED", "termination_details": { "code": "SKIPPED", "type": "SUCCESS" } }),
            Phase::Failed,
        ),
        (json!({ "state": "TERMINATED" }), Phase::Running),
        (json!({ "state": "NEW_THING" }), Phase::Running),
        (json!({ "state": "TERMINATED", "termination_details": { "type": "NEW_TYPE" } }), Phase::Running),
    ];
    for (status, want) in cases {
        assert_eq!(phase(&json!({ "run_id": 1, "status": status })), want, "{status}");
    }
}

#[test]
fn no_state_at_all_is_none() {
    assert_eq!(phase_of(&json!({ "run_id": 1 })), None);
    assert_eq!(phase_of(&json!({ "state": {} })), None);
    assert_eq!(phase_of(&json!([])), None);
}
