//! What a Snowflake answer about a statement means for the Flyte task: the SQL API's HTTP
//! outcomes (200 done, 202 in progress, 408 timed out, 422 failed) and Snowflake's documented
//! query status names (RUNNING, QUEUED, RESUMING_WAREHOUSE, BLOCKED, ...: the
//! `SYSTEM$GET_RESULTSET_STATUS` / connector `QueryStatus` set) each map to a phase. Nothing
//! here is an RPC error: a state nobody knows yet is RUNNING with the raw state in the message.

use flotilla_sdk::proto::core::task_execution::Phase;
use serde_json::Value;

/// A phase and the message that goes with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The Flyte phase.
    pub phase: Phase,
    /// Human text for `Resource.message`.
    pub message: String,
}

impl Status {
    fn new(phase: Phase, message: impl Into<String>) -> Self {
        Self { phase, message: message.into() }
    }
}

/// Snowflake's documented query status names, longest first so that a scan of free text
/// finds `QUEUED_REPAIRING_WAREHOUSE` before `QUEUED`. `QUEUED_REPARING_WAREHOUSE` is the
/// spelling Snowflake's own drivers use.
pub const QUERY_STATUSES: [&str; 14] = [
    "QUEUED_REPAIRING_WAREHOUSE",
    "QUEUED_REPARING_WAREHOUSE",
    "FAILED_WITH_INCIDENT",
    "RESUMING_WAREHOUSE",
    "FAILED_WITH_ERROR",
    "DISCONNECTED",
    "RESTARTED",
    "ABORTING",
    "NO_DATA",
    "BLOCKED",
    "RUNNING",
    "SUCCESS",
    "ABORTED",
    "QUEUED",
];

/// The phase of a query status name (case-insensitive).
pub fn query_status(name: &str) -> Status {
    let upper = name.trim().to_ascii_uppercase();
    match upper.as_str() {
        "RUNNING" => Status::new(Phase::Running, "the query is running"),
        "RESTARTED" => Status::new(Phase::Running, "the query was restarted and is running again"),
        "ABORTING" => Status::new(Phase::Running, "the query is being aborted"),
        "DISCONNECTED" => {
            Status::new(Phase::Running, "the query's session is disconnected; Snowflake will fail it soon")
        }
        "NO_DATA" => Status::new(Phase::Queued, "Snowflake has no data about the query yet"),
        "QUEUED" => {
            Status::new(Phase::WaitingForResources, "the query is queued, waiting for warehouse resources")
        }
        "QUEUED_REPAIRING_WAREHOUSE" | "QUEUED_REPARING_WAREHOUSE" => {
            Status::new(Phase::WaitingForResources, "the query is queued while the warehouse is repaired")
        }
        "BLOCKED" => Status::new(
            Phase::WaitingForResources,
            "the query is waiting on a lock held by another statement",
        ),
        "RESUMING_WAREHOUSE" => {
            Status::new(Phase::Initializing, "the warehouse is resuming; the query has not started")
        }
        "SUCCESS" => Status::new(Phase::Succeeded, "the query succeeded"),
        "FAILED_WITH_ERROR" => Status::new(Phase::Failed, "the query failed with an error"),
        "FAILED_WITH_INCIDENT" => {
            Status::new(Phase::RetryableFailed, "the query failed because of an incident on Snowflake's side")
        }
        "ABORTED" => Status::new(Phase::Failed, "the query was aborted"),
        _ => Status::new(
            Phase::Running,
            format!("Snowflake reports the query in state {name:?}, unknown to Flotilla"),
        ),
    }
}

/// A Snowflake error code meaning the statement was canceled (`SQL execution canceled`).
const CANCELED: &str = "000604";
/// `SQL execution internal error`: an incident on Snowflake's side; the same query may work.
const INTERNAL_ERROR: &str = "000603";
/// The statement (or warehouse) timeout canceled the statement.
const STATEMENT_TIMEOUT: &str = "000630";

/// Reads a string field of a Snowflake answer.
fn field<'a>(body: &'a Value, name: &str) -> &'a str {
    body.get(name).and_then(Value::as_str).unwrap_or("")
}

/// `<message> (code <code>, SQL state <state>)`, leaving out what is absent.
fn describe(body: &Value) -> String {
    let message = field(body, "message");
    let mut details = Vec::new();
    if !field(body, "code").is_empty() {
        details.push(format!("code {}", field(body, "code")));
    }
    if !field(body, "sqlState").is_empty() {
        details.push(format!("SQL state {}", field(body, "sqlState")));
    }
    let message = if message.is_empty() { "no message" } else { message };
    if details.is_empty() { message.to_owned() } else { format!("{message} ({})", details.join(", ")) }
}

/// The status of a statement from the SQL API's answer to `GET /api/v2/statements/{handle}`
/// (or to the submission itself), or `None` when the HTTP status is not one the API answers
/// about a statement (the caller turns those into errors).
pub fn from_answer(http_status: u16, body: &Value) -> Option<Status> {
    Some(match http_status {
        200 if body.is_null() => Status::new(Phase::Succeeded, "the statement succeeded"),
        200 => Status::new(Phase::Succeeded, describe(body)),
        202 => in_progress(body),
        408 => Status::new(
            Phase::Failed,
            format!("the statement ran past its timeout and Snowflake canceled it: {}", describe(body)),
        ),
        422 => match field(body, "code") {
            // FAILED, not ABORTED: propeller drops the message of an ABORTED
            // task, and upstream's connector answers FAILED here too.
            CANCELED => Status::new(Phase::Failed, format!("the statement was canceled: {}", describe(body))),
            INTERNAL_ERROR => Status::new(Phase::RetryableFailed, describe(body)),
            STATEMENT_TIMEOUT => Status::new(Phase::Failed, describe(body)),
            _ => Status::new(Phase::Failed, describe(body)),
        },
        _ => return None,
    })
}

/// A statement still in progress (HTTP 202). The SQL API's own answer says only that; when
/// it names one of Snowflake's query states (in a `status` field or in its message, as words
/// or as the upper-case name) the finer phase is used.
fn in_progress(body: &Value) -> Status {
    let named = [field(body, "status"), field(body, "message")].into_iter().find_map(|text| {
        let upper = text.to_ascii_uppercase();
        QUERY_STATUSES
            .into_iter()
            .find(|s| contains_word(&upper, s) || contains_word(&upper, &s.replace('_', " ")))
    });
    match named {
        // A 202 means not finished, whatever the text says; only the waiting states refine it.
        Some(name)
            if !matches!(
                query_status(name).phase,
                Phase::Succeeded | Phase::Failed | Phase::Aborted | Phase::RetryableFailed
            ) =>
        {
            let mut s = query_status(name);
            s.message = format!("{}: {}", s.message, describe(body));
            s
        }
        _ => Status::new(Phase::Running, describe(body)),
    }
}

fn contains_word(haystack: &str, word: &str) -> bool {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    haystack.match_indices(word).any(|(at, _)| {
        let before = haystack[..at].chars().next_back();
        let after = haystack[at + word.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

#[cfg(test)]
mod tests;
