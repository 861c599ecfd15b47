//! A fake of the Databricks Jobs API 2.1, as far as one-time runs go:
//! `POST /api/2.1/jobs/runs/submit`, `GET /api/2.1/jobs/runs/get?run_id=`,
//! `POST /api/2.1/jobs/runs/cancel`, with bearer-token authentication.
//!
//! The model follows the public API documents: a submit answers `{"run_id"}`
//! and honours `idempotency_token` (the same token answers the same run);
//! `runs/get` answers the run with `job_id`, `run_page_url`, the legacy
//! `state` object (`life_cycle_state`, `result_state`, `state_message`) and
//! the newer `status` object; a cancelled run ends `TERMINATED`/`CANCELED`.
//! Errors use Databricks' body `{"error_code", "message"}`. Each run walks a
//! script of states, one step per `runs/get`, the last step repeating.
//!
//! ```no_run
//! # async fn demo() {
//! use flotilla_testkit::fakes::databricks::{FakeDatabricks, Step};
//! let model = FakeDatabricks::new("dapi-test-token");
//! model.script(vec![Step::life_cycle("PENDING"), Step::terminated("SUCCESS", "")]);
//! let server = model.start().await;   // point the service's base_url at server.url()
//! # }
//! ```

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use http::Method;
use serde_json::{Value, json};

use crate::fake_http::{FakeHttp, Recorded, Reply};

/// Path of runs/submit.
pub const SUBMIT: &str = "/api/2.1/jobs/runs/submit";
/// Path of runs/get.
pub const GET: &str = "/api/2.1/jobs/runs/get";
/// Path of runs/cancel.
pub const CANCEL: &str = "/api/2.1/jobs/runs/cancel";
/// Path of the workspace's OAuth token endpoint (machine-to-machine client credentials).
pub const TOKEN: &str = "/oidc/v1/token";
/// The longest `idempotency_token` the API accepts.
pub const MAX_IDEMPOTENCY_TOKEN: usize = 64;

/// One state a run reports: the `state` object and, optionally, the `status` object.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The legacy `state` object (`Null` to leave it out).
    pub state: Value,
    /// The newer `status` object (`Null` to leave it out).
    pub status: Value,
}

impl Step {
    /// A non-terminal life-cycle state (QUEUED, PENDING, RUNNING, ...).
    pub fn life_cycle(life_cycle_state: &str) -> Self {
        Self::with_message(life_cycle_state, "")
    }

    /// A life-cycle state with a message.
    pub fn with_message(life_cycle_state: &str, message: &str) -> Self {
        Self {
            state: json!({ "life_cycle_state": life_cycle_state, "state_message": message }),
            status: Value::Null,
        }
    }

    /// `TERMINATED` with this result state and message.
    pub fn terminated(result_state: &str, message: &str) -> Self {
        Self {
            state: json!({ "life_cycle_state": "TERMINATED", "result_state": result_state,
                           "state_message": message, "user_cancelled_or_timedout": false }),
            status: Value::Null,
        }
    }

    /// Adds `status.termination_details`, as newer workspaces send.
    #[must_use]
    pub fn termination(mut self, code: &str, kind: &str, message: &str) -> Self {
        self.status = json!({ "state": "TERMINATED",
                              "termination_details": { "code": code, "type": kind, "message": message } });
        self
    }

    /// Only the newer `status` object, no `state`.
    pub fn status_only(status: Value) -> Self {
        Self { state: Value::Null, status }
    }
}

/// One run the fake holds.
#[derive(Clone, Debug)]
pub struct Run {
    /// Its id.
    pub run_id: u64,
    /// The job the one-time run belongs to.
    pub job_id: u64,
    /// The submitted body.
    pub spec: Value,
    /// The states it walks through.
    pub script: Vec<Step>,
    /// How many times `runs/get` asked about it.
    pub polls: usize,
    /// Whether `runs/cancel` was called for it.
    pub cancelled: bool,
}

#[derive(Debug)]
struct State {
    token: String,
    next_run_id: u64,
    script: Vec<Step>,
    runs: BTreeMap<u64, Run>,
    tokens: BTreeMap<String, u64>,
    /// The service principal's (client_id, client_secret), when OAuth is on.
    oauth_client: Option<(String, String)>,
    /// Access tokens issued by the token endpoint.
    issued: Vec<String>,
}

/// The model: runs by id, the accepted token, and the script new runs follow.
#[derive(Clone, Debug)]
pub struct FakeDatabricks {
    state: Arc<Mutex<State>>,
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    Reply::json(status, json!({ "error_code": code, "message": message }))
}

impl FakeDatabricks {
    /// A workspace that accepts `Authorization: Bearer <token>`. New runs
    /// succeed at once unless [`FakeDatabricks::script`] says otherwise.
    pub fn new(token: &str) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                token: token.to_owned(),
                next_run_id: 1001,
                script: vec![Step::life_cycle("RUNNING"), Step::terminated("SUCCESS", "")],
                runs: BTreeMap::new(),
                tokens: BTreeMap::new(),
                oauth_client: None,
                issued: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }

    /// Lets a service principal get access tokens from [`TOKEN`] with the
    /// client-credentials grant (scope `all-apis`); those tokens are accepted beside the PAT.
    pub fn oauth_client(&self, client_id: &str, client_secret: &str) {
        self.lock().oauth_client = Some((client_id.to_owned(), client_secret.to_owned()));
    }

    /// The access tokens the token endpoint issued, in order.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.lock().issued.clone()
    }

    /// Revokes every issued access token (they answer 401 from now on).
    pub fn revoke_issued_tokens(&self) {
        let mut state = self.lock();
        let n = state.issued.len();
        state.issued = (0..n).map(|i| format!("revoked-{i}")).collect();
    }

    /// The states runs submitted from now on walk through (one per `runs/get`; the last repeats).
    pub fn script(&self, steps: Vec<Step>) {
        assert!(!steps.is_empty(), "a script needs at least one step");
        self.lock().script = steps;
    }

    /// Every run, by id.
    pub fn runs(&self) -> BTreeMap<u64, Run> {
        self.lock().runs.clone()
    }

    /// One run.
    pub fn run(&self, run_id: u64) -> Option<Run> {
        self.lock().runs.get(&run_id).cloned()
    }

    /// Serves the model on a loopback port.
    pub async fn start(&self) -> FakeHttp {
        let model = self.clone();
        FakeHttp::start(move |r| model.answer(r)).await
    }

    /// Answers one request (the [`FakeHttp`] handler).
    pub fn answer(&self, r: &Recorded) -> Reply {
        if r.method == Method::POST && r.path == TOKEN {
            return self.token(r);
        }
        let route = (r.method.clone(), r.path.as_str());
        let known = matches!(route, (Method::POST, SUBMIT) | (Method::GET, GET) | (Method::POST, CANCEL));
        if !known {
            return error(404, "ENDPOINT_NOT_FOUND", &format!("No API found for '{} {}'", r.method, r.path));
        }
        let accepted = {
            let state = self.lock();
            r.bearer().map(|t| t == state.token || state.issued.iter().any(|i| i == t))
        };
        match accepted {
            None => return error(401, "UNAUTHENTICATED", "Missing Authorization header"),
            Some(false) => return error(401, "UNAUTHENTICATED", "Invalid access token."),
            Some(true) => {}
        }
        match route.0 {
            Method::GET => self.get(r),
            _ if r.path == SUBMIT => self.submit(r),
            _ => self.cancel(r),
        }
    }

    fn token(&self, r: &Recorded) -> Reply {
        let oauth = |status: u16, code: &str, description: &str| {
            Reply::json(status, json!({ "error": code, "error_description": description }))
        };
        let form: BTreeMap<String, String> = r.form().into_iter().collect();
        let field = |k: &str| form.get(k).map(String::as_str);
        if field("grant_type") != Some("client_credentials") {
            return oauth(400, "unsupported_grant_type", "grant_type must be client_credentials");
        }
        if field("scope") != Some("all-apis") {
            return oauth(400, "invalid_scope", "scope must be all-apis");
        }
        let mut state = self.lock();
        let valid = state.oauth_client.as_ref().is_some_and(|(id, secret)| {
            field("client_id") == Some(id) && field("client_secret") == Some(secret)
        });
        if !valid {
            return oauth(401, "invalid_client", "Client authentication failed");
        }
        let access_token = format!("oauth-access-{}", state.issued.len() + 1);
        state.issued.push(access_token.clone());
        Reply::json(
            200,
            json!({ "access_token": access_token, "token_type": "Bearer", "expires_in": 3600, "scope": "all-apis" }),
        )
    }

    fn submit(&self, r: &Recorded) -> Reply {
        let Value::Object(body) = r.json() else {
            return error(400, "MALFORMED_REQUEST", "Could not parse request object: expected a JSON object");
        };
        let has_task = ["spark_python_task", "notebook_task", "spark_jar_task", "spark_submit_task", "tasks"]
            .iter()
            .any(|k| body.contains_key(*k));
        if !has_task {
            return error(
                400,
                "INVALID_PARAMETER_VALUE",
                "A task definition is required (e.g. spark_python_task or tasks)",
            );
        }
        let has_compute = body.contains_key("existing_cluster_id")
            || body.contains_key("new_cluster")
            || body.contains_key("environments")
            || body.contains_key("tasks");
        if !has_compute {
            return error(
                400,
                "INVALID_PARAMETER_VALUE",
                "One of existing_cluster_id, new_cluster or environments is required",
            );
        }
        let idempotency = match body.get("idempotency_token") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) if t.len() <= MAX_IDEMPOTENCY_TOKEN => Some(t.clone()),
            Some(_) => {
                return error(
                    400,
                    "INVALID_PARAMETER_VALUE",
                    "idempotency_token must be a string of at most 64 characters",
                );
            }
        };
        let mut state = self.lock();
        if let Some(run_id) = idempotency.as_ref().and_then(|t| state.tokens.get(t)) {
            return Reply::json(200, json!({ "run_id": run_id }));
        }
        let run_id = state.next_run_id;
        state.next_run_id += 1;
        let run = Run {
            run_id,
            job_id: run_id + 500_000,
            spec: Value::Object(body),
            script: state.script.clone(),
            polls: 0,
            cancelled: false,
        };
        state.runs.insert(run_id, run);
        if let Some(t) = idempotency {
            state.tokens.insert(t, run_id);
        }
        Reply::json(200, json!({ "run_id": run_id }))
    }

    fn get(&self, r: &Recorded) -> Reply {
        let Some(run_id) = r.query_param("run_id").and_then(|v| v.parse::<u64>().ok()) else {
            return error(400, "INVALID_PARAMETER_VALUE", "run_id is required and must be an integer");
        };
        let mut state = self.lock();
        let Some(run) = state.runs.get_mut(&run_id) else {
            return error(404, "RESOURCE_DOES_NOT_EXIST", &format!("Run {run_id} does not exist."));
        };
        let step = if run.cancelled {
            Step::terminated("CANCELED", "Run cancelled.").termination(
                "CANCELED",
                "SUCCESS",
                "Run cancelled.",
            )
        } else {
            let i = run.polls.min(run.script.len() - 1);
            run.script[i].clone()
        };
        run.polls += 1;
        let mut answer = json!({
            "job_id": run.job_id,
            "run_id": run.run_id,
            "number_in_job": run.run_id,
            "run_name": run.spec.get("run_name").cloned().unwrap_or(json!("Untitled")),
            "run_type": "SUBMIT_RUN",
            "run_page_url": format!("https://fake.cloud.databricks.com/?o=1#job/{}/run/{}", run.job_id, run.run_id),
        });
        if !step.state.is_null() {
            answer["state"] = step.state;
        }
        if !step.status.is_null() {
            answer["status"] = step.status;
        }
        Reply::json(200, answer)
    }

    fn cancel(&self, r: &Recorded) -> Reply {
        let run_id = match r.json().get("run_id") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        };
        let Some(run_id) = run_id else {
            return error(400, "INVALID_PARAMETER_VALUE", "run_id is required and must be an integer");
        };
        let mut state = self.lock();
        let Some(run) = state.runs.get_mut(&run_id) else {
            return error(404, "RESOURCE_DOES_NOT_EXIST", &format!("Run {run_id} does not exist."));
        };
        run.cancelled = true;
        Reply::json(200, json!({}))
    }
}
