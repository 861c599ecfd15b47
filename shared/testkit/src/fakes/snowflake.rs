//! A fake of the Snowflake SQL API v2 (`/api/v2/statements`), modelled on Snowflake's public
//! reference: submit (`POST /api/v2/statements?requestId=…&async=true[&retry=true]`), status
//! (`GET /api/v2/statements/{handle}`), cancel (`POST /api/v2/statements/{handle}/cancel`),
//! with key-pair JWT authentication checked for real.
//!
//! - Auth: every request must carry `Authorization: Bearer <JWT>` whose RS256 signature
//!   verifies with the configured public key, with `iss = ACCOUNT.USER.SHA256:<fingerprint of
//!   that key>`, `sub = ACCOUNT.USER`, `iat` not in the future, `exp` in the future and at most
//!   an hour after `iat`; `X-Snowflake-Authorization-Token-Type`, when present, must be
//!   `KEYPAIR_JWT`. Otherwise 401 with Snowflake's error body (`code` 390144).
//! - Submit: `requestId` must be a UUID; the body must be JSON with a `statement`
//!   (`Content-Type: application/json`, else 415). A `requestId` seen before with `retry=true`
//!   answers the statement it created instead of running a second one.
//! - Each statement follows a script of [`Step`]s, one per status request (the last repeats):
//!   by default in progress once, then success. [`SnowflakeFake::script_next`] sets the script
//!   of the next submitted statement. A script starting with [`Step::Failed`] fails at
//!   submission (422 with the handle), as a compilation error does.
//! - Answers: 202 `QueryStatus` (code `333334`), 200 `ResultSet` (code `090001`, with
//!   `resultSetMetaData` and `data`), 422 `QueryFailureStatus`, 408 `QueryStatus` on a
//!   statement timeout, 404 for an unknown handle. Cancel answers 200, or 422 (code `000605`)
//!   when the statement is no longer running; a canceled statement then reports 422 code
//!   `000604` ("SQL execution canceled").
//! - Not from the documents: the SQL API's 202 does not say *why* a statement is unfinished.
//!   [`Step::InProgress`] with a state name puts Snowflake's query state name (`QUEUED`,
//!   `RESUMING_WAREHOUSE`, …) in the 202's message, which the service maps when present.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use ring::digest;
use serde_json::{Value, json};

use crate::fake_http::{FakeHttp, Recorded, Reply};

/// The documented message of a 202 for an asynchronous statement.
pub const IN_PROGRESS_MESSAGE: &str =
    "Asynchronous execution in progress. Use provided query id to perform query monitoring and management.";

/// What a statement reports at one status request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Still running (HTTP 202), optionally naming Snowflake's query state (e.g. `QUEUED`).
    InProgress(Option<String>),
    /// Finished (HTTP 200 with a one-row result set).
    Succeeded,
    /// Failed (HTTP 422) with this error code, SQL state and message.
    Failed {
        /// Snowflake error code, e.g. `002003`.
        code: String,
        /// SQL state, e.g. `42S02`.
        sql_state: String,
        /// Snowflake's message.
        message: String,
    },
    /// Canceled by its statement timeout (HTTP 408).
    TimedOut,
}

impl Step {
    /// Running, with Snowflake's query state name in the answer.
    pub fn state(name: &str) -> Self {
        Self::InProgress(Some(name.to_owned()))
    }

    /// A failure with `code`, `sql_state` and `message`.
    pub fn failed(code: &str, sql_state: &str, message: &str) -> Self {
        Self::Failed { code: code.to_owned(), sql_state: sql_state.to_owned(), message: message.to_owned() }
    }
}

/// Who the fake accepts: the public key the JWT must verify with, and the `ACCOUNT.USER` it
/// must name (or any, for `flotilla-fakes`, whose callers pick their own accounts).
#[derive(Clone, Debug)]
pub struct Identity {
    /// `ACCOUNT.USER` (upper case) the JWT's `sub` must be; `None` accepts any upper-case
    /// `ACCOUNT.USER`.
    pub subject: Option<String>,
    /// The user's public key, SubjectPublicKeyInfo DER (what `openssl pkey -pubout -outform DER` writes).
    pub public_key: Vec<u8>,
}

impl Identity {
    /// `user` of `account` holding the key whose public half is `public_key` (SPKI DER).
    pub fn new(account: &str, user: &str, public_key: Vec<u8>) -> Self {
        let subject = format!("{account}.{user}").to_ascii_uppercase();
        Self { subject: Some(subject), public_key }
    }

    /// `user` of `account` holding the test key pair ([`crate::jwt::TEST_KEY_PKCS8_PEM`]).
    pub fn test_key(account: &str, user: &str) -> Self {
        Self::new(account, user, crate::jwt::TEST_PUBLIC_KEY_DER.to_vec())
    }

    /// Any user of any account holding the test key pair.
    pub fn any_user_of_test_key() -> Self {
        Self { subject: None, public_key: crate::jwt::TEST_PUBLIC_KEY_DER.to_vec() }
    }

    /// `SHA256:<base64 of the SHA-256 of the public key's DER>`, as Snowflake's
    /// `RSA_PUBLIC_KEY_FP`.
    pub fn fingerprint(&self) -> String {
        let digest = digest::digest(&digest::SHA256, &self.public_key);
        format!("SHA256:{}", STANDARD.encode(digest.as_ref()))
    }
}

/// One submitted statement.
#[derive(Clone, Debug)]
pub struct Statement {
    /// Its handle (query id).
    pub handle: String,
    /// The `requestId` it was submitted with.
    pub request_id: String,
    /// The submitted body.
    pub body: Value,
    /// How many status requests it has answered.
    pub polls: usize,
    /// Whether a cancel reached it while running.
    pub canceled: bool,
    script: Vec<Step>,
}

impl Statement {
    fn step(&self) -> &Step {
        &self.script[self.polls.min(self.script.len() - 1)]
    }
}

#[derive(Default)]
struct State {
    statements: Vec<Statement>,
    next_scripts: VecDeque<Vec<Step>>,
    auth_failures: Vec<String>,
}

/// The fake Snowflake SQL API. Stops when dropped.
pub struct SnowflakeFake {
    /// The HTTP server (requests, fault injection).
    pub http: FakeHttp,
    state: Arc<Mutex<State>>,
}

impl SnowflakeFake {
    /// Starts the fake on a free 127.0.0.1 port, accepting JWTs of `identity`.
    pub async fn start(identity: Identity) -> Self {
        Self::start_at("127.0.0.1:0".parse().expect("valid address"), identity).await
    }

    /// Starts the fake on `addr` (for `flotilla-fakes`), accepting JWTs of `identity`.
    pub async fn start_at(addr: std::net::SocketAddr, identity: Identity) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let model = Arc::clone(&state);
        let http = FakeHttp::start_at(addr, move |r| handle(&identity, &model, r)).await;
        Self { http, state }
    }

    /// The base URL to configure the service with.
    pub fn url(&self) -> String {
        self.http.url()
    }

    /// Sets the script of the next submitted statement (one step per status request).
    ///
    /// # Panics
    /// If `steps` is empty.
    pub fn script_next(&self, steps: Vec<Step>) {
        assert!(!steps.is_empty(), "a script needs at least one step");
        self.lock().next_scripts.push_back(steps);
    }

    /// Every statement submitted so far, in order.
    pub fn statements(&self) -> Vec<Statement> {
        self.lock().statements.clone()
    }

    /// Why each rejected request was rejected (the fake's own words, for test failures).
    pub fn auth_failures(&self) -> Vec<String> {
        self.lock().auth_failures.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake state lock poisoned")
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    Reply::json(status, json!({"code": code, "message": message}))
}

fn handle(identity: &Identity, state: &Mutex<State>, r: &Recorded) -> Reply {
    let mut state = state.lock().expect("fake state lock poisoned");
    if let Err(why) = check_auth(identity, r) {
        state.auth_failures.push(why);
        return error(401, "390144", "JWT token is invalid.");
    }
    let path = r.path.split('?').next().unwrap_or("");
    let rest = path.strip_prefix("/api/v2/statements").unwrap_or("-");
    match (r.method.as_str(), rest) {
        ("POST", "" | "/") => submit(&mut state, r),
        ("GET", handle) if handle.len() > 1 && !handle[1..].contains('/') => status(&mut state, &handle[1..]),
        ("POST", tail) if tail.ends_with("/cancel") && tail.len() > "/cancel".len() + 1 => {
            cancel(&mut state, &tail[1..tail.len() - "/cancel".len()])
        }
        _ => error(404, "390404", "Not found."),
    }
}

fn check_auth(identity: &Identity, r: &Recorded) -> Result<(), String> {
    let token = r.bearer().ok_or("no bearer token")?;
    match r.header("x-snowflake-authorization-token-type") {
        None | Some("KEYPAIR_JWT") => {}
        Some(other) => return Err(format!("token type {other:?} is not KEYPAIR_JWT")),
    }
    let claims = crate::jwt::verify_rs256(token, &identity.public_key)
        .map_err(|e| format!("the JWT does not verify with the user's public key: {e}"))?;
    let subject = claims["sub"].as_str().unwrap_or_default().to_owned();
    match &identity.subject {
        Some(expected) if *expected != subject => {
            return Err(format!("sub is {subject:?}, expected {expected}"));
        }
        None if subject.split('.').count() != 2 || subject != subject.to_ascii_uppercase() => {
            return Err(format!("sub is {subject:?}, not ACCOUNT.USER in upper case"));
        }
        _ => {}
    }
    let issuer = format!("{subject}.{}", identity.fingerprint());
    if claims["iss"] != issuer.as_str() {
        return Err(format!("iss is {}, expected {issuer}", claims["iss"]));
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_i64(), claims["exp"].as_i64()) else {
        return Err("iat and exp must be integers".to_owned());
    };
    let now = now_secs();
    if iat > now + 60 || exp <= now || exp - iat > 3600 {
        return Err(format!(
            "iat {iat} / exp {exp} do not hold the token valid now ({now}) for at most an hour"
        ));
    }
    Ok(())
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn handle_for(n: usize) -> String {
    format!("01b{n:05x}-0000-4000-8000-{:012x}", n * 7919)
}

fn status_url(handle: &str) -> String {
    format!("/api/v2/statements/{handle}")
}

fn submit(state: &mut State, r: &Recorded) -> Reply {
    if !r.header("content-type").is_some_and(|c| c.starts_with("application/json")) {
        return error(415, "391901", "Unsupported media type: the body must be application/json.");
    }
    let request_id = r.query_param("requestId").unwrap_or("").to_owned();
    if !request_id.is_empty() && !is_uuid(&request_id) {
        return error(400, "391902", "requestId must be a UUID.");
    }
    let body = r.json();
    if body["statement"].as_str().is_none_or(|s| s.trim().is_empty()) {
        return error(400, "391903", "The request body must have a statement.");
    }
    if !request_id.is_empty()
        && r.query_param("retry") == Some("true")
        && let Some(s) = state.statements.iter().find(|s| s.request_id == request_id)
    {
        return submitted(s);
    }
    let script =
        state.next_scripts.pop_front().unwrap_or_else(|| vec![Step::InProgress(None), Step::Succeeded]);
    let handle = handle_for(state.statements.len() + 1);
    let statement = Statement { handle, request_id, body, polls: 0, canceled: false, script };
    let reply = submitted(&statement);
    state.statements.push(statement);
    reply
}

/// The answer to a submission: 202, or 422 when the script fails at once.
fn submitted(s: &Statement) -> Reply {
    match &s.script[0] {
        Step::Failed { .. } => answer(s, &s.script[0]),
        _ => answer(s, &Step::InProgress(None)),
    }
}

fn answer(s: &Statement, step: &Step) -> Reply {
    let common = |code: &str, sql_state: &str, message: &str| {
        json!({
            "code": code,
            "sqlState": sql_state,
            "message": message,
            "statementHandle": s.handle,
            "createdOn": now_ms(),
            "statementStatusUrl": status_url(&s.handle),
        })
    };
    if s.canceled {
        return Reply::json(422, common("000604", "57014", "SQL execution canceled"));
    }
    match step {
        Step::InProgress(None) => Reply::json(202, common("333334", "", IN_PROGRESS_MESSAGE)),
        Step::InProgress(Some(name)) => {
            Reply::json(202, common("333334", "", &format!("{IN_PROGRESS_MESSAGE} Query status: {name}.")))
        }
        Step::Succeeded => {
            let mut body = common("090001", "00000", "Statement executed successfully.");
            body["resultSetMetaData"] = json!({
                "numRows": 1,
                "format": "jsonv2",
                "partitionInfo": [{"rowCount": 1, "uncompressedSize": 6}],
                "rowType": [{"name": "RESULT", "database": "", "schema": "", "table": "", "type": "fixed",
                             "nullable": false, "precision": 1, "scale": 0, "byteLength": null, "length": null}],
            });
            body["data"] = json!([["1"]]);
            Reply::json(200, body)
        }
        Step::Failed { code, sql_state, message } => Reply::json(422, common(code, sql_state, message)),
        Step::TimedOut => Reply::json(
            408,
            common(
                "000630",
                "57014",
                "Statement reached its statement or warehouse timeout of 1 second(s) and was canceled.",
            ),
        ),
    }
}

fn find<'a>(state: &'a mut State, handle: &str) -> Option<&'a mut Statement> {
    state.statements.iter_mut().find(|s| s.handle == handle)
}

fn status(state: &mut State, handle: &str) -> Reply {
    let Some(s) = find(state, handle) else {
        return error(404, "333335", &format!("Statement {handle} not found."));
    };
    let step = s.step().clone();
    s.polls += 1;
    answer(s, &step)
}

fn cancel(state: &mut State, handle: &str) -> Reply {
    let Some(s) = find(state, handle) else {
        return error(404, "333335", &format!("Statement {handle} not found."));
    };
    let running = !s.canceled && matches!(s.step(), Step::InProgress(_));
    if !running {
        return Reply::json(
            422,
            json!({"code": "000605", "sqlState": "01000", "message": "Identified SQL statement is not currently executing.",
                   "statementHandle": s.handle, "statementStatusUrl": status_url(&s.handle)}),
        );
    }
    s.canceled = true;
    Reply::json(
        200,
        json!({"code": "000604", "sqlState": "57014", "message": "successfully canceled",
               "statementHandle": s.handle, "statementStatusUrl": status_url(&s.handle)}),
    )
}
