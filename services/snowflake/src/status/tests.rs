use serde_json::json;

use super::*;

#[test]
fn every_documented_query_status_has_its_phase() {
    let expected = [
        ("RUNNING", Phase::Running),
        ("RESTARTED", Phase::Running),
        ("ABORTING", Phase::Running),
        ("DISCONNECTED", Phase::Running),
        ("NO_DATA", Phase::Queued),
        ("QUEUED", Phase::WaitingForResources),
        ("QUEUED_REPAIRING_WAREHOUSE", Phase::WaitingForResources),
        ("QUEUED_REPARING_WAREHOUSE", Phase::WaitingForResources),
        ("BLOCKED", Phase::WaitingForResources),
        ("RESUMING_WAREHOUSE", Phase::Initializing),
        ("SUCCESS", Phase::Succeeded),
        ("FAILED_WITH_ERROR", Phase::Failed),
        ("FAILED_WITH_INCIDENT", Phase::RetryableFailed),
        ("ABORTED", Phase::Failed),
    ];
    assert_eq!(expected.len(), QUERY_STATUSES.len());
    for (name, phase) in expected {
        assert!(QUERY_STATUSES.contains(&name), "{name}");
        assert_eq!(query_status(name).phase, phase, "{name}");
        assert_eq!(query_status(&name.to_ascii_lowercase()).phase, phase, "{name} lower-case");
        assert!(!query_status(name).message.contains("unknown"), "{name}");
    }
}

#[test]
fn an_unknown_status_is_running_with_the_raw_name() {
    let s = query_status("WARP_SPEED");
    assert_eq!(s.phase, Phase::Running);
    assert!(s.message.contains("\"WARP_SPEED\""), "{}", s.message);
}

#[test]
fn http_answers_map_to_phases() {
    let done = json!({"code": "090001", "sqlState": "00000", "message": "Statement executed successfully."});
    assert_eq!(from_answer(200, &done).unwrap().phase, Phase::Succeeded);

    let progress = json!({"code": "333334", "message": "Asynchronous execution in progress. Use provided query id to perform query monitoring and management."});
    let s = from_answer(202, &progress).unwrap();
    assert_eq!(s.phase, Phase::Running);
    assert!(
        s.message.contains("Asynchronous execution in progress") && s.message.contains("333334"),
        "{}",
        s.message
    );

    let timeout = json!({"code": "000630", "sqlState": "57014", "message": "Statement reached its statement or warehouse timeout of 10 second(s) and was canceled."});
    let s = from_answer(408, &timeout).unwrap();
    assert_eq!(s.phase, Phase::Failed);
    assert!(s.message.contains("timeout") && s.message.contains("000630"), "{}", s.message);

    let compile = json!({"code": "001003", "sqlState": "42000", "message": "SQL compilation error: syntax error line 1 at position 0 unexpected 'SELEC'."});
    let s = from_answer(422, &compile).unwrap();
    assert_eq!(s.phase, Phase::Failed);
    assert_eq!(
        s.message,
        "SQL compilation error: syntax error line 1 at position 0 unexpected 'SELEC'. (code 001003, SQL state 42000)"
    );

    let canceled = json!({"code": "000604", "sqlState": "57014", "message": "SQL execution canceled"});
    assert_eq!(from_answer(422, &canceled).unwrap().phase, Phase::Failed);
    let incident = json!({"code": "000603", "sqlState": "XX000", "message": "SQL execution internal error: Processing aborted due to error 300002:2523161652; incident 4457542."});
    assert_eq!(from_answer(422, &incident).unwrap().phase, Phase::RetryableFailed);
    let statement_timeout =
        json!({"code": "000630", "message": "Statement reached its statement or warehouse timeout"});
    assert_eq!(from_answer(422, &statement_timeout).unwrap().phase, Phase::Failed);

    assert_eq!(from_answer(422, &json!({})).unwrap().message, "no message");
    // A finished statement whose results were not read.
    assert_eq!(from_answer(200, &serde_json::Value::Null).unwrap().phase, Phase::Succeeded);
    for other in [201, 204, 400, 401, 403, 404, 429, 500, 503] {
        assert!(from_answer(other, &done).is_none(), "{other}");
    }
}

#[test]
fn a_202_naming_a_waiting_state_refines_the_phase() {
    let cases = [
        (json!({"code": "333334", "status": "QUEUED"}), Phase::WaitingForResources),
        (
            json!({"code": "333334", "message": "Warehouse is resuming: RESUMING_WAREHOUSE"}),
            Phase::Initializing,
        ),
        (json!({"code": "333334", "message": "Query is in state resuming warehouse."}), Phase::Initializing),
        (json!({"code": "333334", "message": "Statement is queued."}), Phase::WaitingForResources),
        (json!({"code": "333334", "message": "queued repairing warehouse"}), Phase::WaitingForResources),
        (json!({"code": "333334", "message": "BLOCKED on a lock"}), Phase::WaitingForResources),
        (json!({"code": "333334", "status": "NO_DATA"}), Phase::Queued),
        // A 202 is never terminal, whatever its text says.
        (json!({"code": "333334", "status": "SUCCESS"}), Phase::Running),
        (json!({"code": "333334", "status": "FAILED_WITH_ERROR"}), Phase::Running),
        // Words inside other words do not count.
        (json!({"code": "333334", "message": "UNQUEUEDNESS"}), Phase::Running),
    ];
    for (body, phase) in cases {
        let s = from_answer(202, &body).unwrap();
        assert_eq!(s.phase, phase, "{body}");
        assert!(s.message.contains("333334"), "{}", s.message);
    }
}
