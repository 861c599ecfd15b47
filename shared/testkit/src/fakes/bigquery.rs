//! A fake of the BigQuery v2 REST jobs API and of Google's OAuth token endpoint and metadata
//! server, as their public documents describe them:
//!
//! - `POST /token` (the credentials file's `token_uri`): form `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`
//!   and `assertion=<RS256 JWT>`; the assertion's signature is checked against the service
//!   account's public key. Or form `grant_type=refresh_token` with `client_id`, `client_secret`
//!   and `refresh_token`, as a user's credentials (`gcloud auth application-default login`) are
//!   exchanged; they must be those of [`FakeBigQuery::user_credentials`]. Answers `{"access_token",
//!   "expires_in", "token_type": "Bearer"}` or an OAuth error (`{"error", "error_description"}`).
//! - `GET /computeMetadata/v1/instance/service-accounts/default/token` with `Metadata-Flavor: Google`.
//! - `POST /bigquery/v2/projects/{project}/jobs` (jobs.insert), `GET …/jobs/{jobId}` (jobs.get),
//!   `POST …/jobs/{jobId}/cancel` (jobs.cancel), each requiring `Authorization: Bearer <issued
//!   token>`; errors in Google's shape `{"error": {"code", "message", "errors": [...], "status"}}`.
//!
//! Each job walks through a script of states, one step per jobs.get (default PENDING, RUNNING,
//! DONE); a test sets the script of the next job with [`FakeBigQuery::script_next_job`].

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};

use crate::fake_http::{FakeHttp, Recorded, Reply};

/// One step of a job's life, as jobs.get reports it.
#[derive(Clone, Debug)]
pub enum JobStep {
    /// `status.state = PENDING`.
    Pending,
    /// `status.state = RUNNING`.
    Running,
    /// `status.state = DONE`, no error.
    Done,
    /// `status.state = DONE` with `errorResult {reason, message}`.
    Failed {
        /// The error reason, e.g. `invalidQuery`, `backendError`.
        reason: String,
        /// The error message.
        message: String,
    },
    /// Any other state string.
    Raw(String),
}

#[derive(Debug)]
struct Job {
    project: String,
    location: String,
    configuration: Value,
    script: VecDeque<JobStep>,
    current: JobStep,
    cancelled: bool,
}

/// The one user whose refresh token the fake's token endpoint honours.
const USER_CLIENT_ID: &str = "764086051850-fake.apps.googleusercontent.com";
const USER_CLIENT_SECRET: &str = "d-FL95Q19q7MQmFpd7hHD0Ty-fake";
const USER_REFRESH_TOKEN: &str = "1//0fake-refresh-token";

#[derive(Default)]
struct Model {
    /// Tokens the API accepts.
    tokens: Vec<String>,
    /// Every token handed out, revoked or not.
    issued: Vec<String>,
    jobs: HashMap<String, Job>,
    next_script: Option<Vec<JobStep>>,
}

/// The fake BigQuery (with token endpoint and metadata server) on loopback.
pub struct FakeBigQuery {
    /// The HTTP server: recorded requests, fault injection.
    pub http: FakeHttp,
    model: Arc<Mutex<Model>>,
}

impl FakeBigQuery {
    /// Starts the fake. Token assertions must verify against `public_key_der` (the service
    /// account's public key, SubjectPublicKeyInfo DER).
    pub async fn start(public_key_der: Vec<u8>) -> Self {
        Self::start_at("127.0.0.1:0".parse().expect("valid"), public_key_der).await
    }

    /// As [`FakeBigQuery::start`], on `addr`.
    pub async fn start_at(addr: std::net::SocketAddr, public_key_der: Vec<u8>) -> Self {
        let model = Arc::new(Mutex::new(Model::default()));
        let m = model.clone();
        let http = FakeHttp::start_at(addr, move |r| handle(&m, &public_key_der, r)).await;
        Self { http, model }
    }

    /// The base URL (BigQuery API root, token endpoint and metadata server alike).
    pub fn url(&self) -> String {
        self.http.url()
    }

    /// The token endpoint, for a key file's `token_uri`.
    pub fn token_uri(&self) -> String {
        format!("{}/token", self.http.url())
    }

    /// A user's credentials file as `gcloud auth application-default login` writes it, with
    /// `token_uri` pointing at this fake (gcloud's own has none: Google's endpoint is the default).
    pub fn user_credentials(&self) -> Value {
        json!({
            "account": "",
            "client_id": USER_CLIENT_ID,
            "client_secret": USER_CLIENT_SECRET,
            "quota_project_id": "fake-project",
            "refresh_token": USER_REFRESH_TOKEN,
            "type": "authorized_user",
            "universe_domain": "googleapis.com",
            "token_uri": self.token_uri(),
        })
    }

    /// The next inserted job reports these states, one per jobs.get, then stays at the last.
    pub fn script_next_job(&self, steps: Vec<JobStep>) {
        self.model.lock().expect("not poisoned").next_script = Some(steps);
    }

    /// The ids of the jobs inserted so far.
    pub fn job_ids(&self) -> Vec<String> {
        self.model.lock().expect("not poisoned").jobs.keys().cloned().collect()
    }

    /// Whether the job was cancelled.
    pub fn cancelled(&self, job_id: &str) -> bool {
        self.model.lock().expect("not poisoned").jobs.get(job_id).is_some_and(|j| j.cancelled)
    }

    /// Every access token handed out, revoked or not.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.model.lock().expect("not poisoned").issued.clone()
    }

    /// Forgets every issued token, as if they had expired or been revoked.
    pub fn revoke_tokens(&self) {
        self.model.lock().expect("not poisoned").tokens.clear();
    }
}

/// An error in Google's shape.
pub fn google_error(code: u16, status: &str, reason: &str, message: &str) -> Reply {
    Reply::json(
        code,
        json!({"error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
            "status": status,
        }}),
    )
}

fn handle(model: &Mutex<Model>, public_key_der: &[u8], r: &Recorded) -> Reply {
    let mut m = model.lock().expect("not poisoned");
    if r.path == "/token" {
        return token(&mut m, public_key_der, r);
    }
    if r.path == "/computeMetadata/v1/instance/service-accounts/default/token" {
        if r.header("metadata-flavor") != Some("Google") {
            return Reply::text(403, "Missing Metadata-Flavor:Google header.");
        }
        return issue(&mut m);
    }
    let Some(rest) = r.path.strip_prefix("/bigquery/v2/projects/") else {
        return google_error(404, "NOT_FOUND", "notFound", &format!("Not found: URL {}", r.path));
    };
    match r.bearer() {
        Some(t) if m.tokens.iter().any(|issued| issued == t) => {}
        _ => {
            return google_error(
                401,
                "UNAUTHENTICATED",
                "unauthorized",
                "Request had invalid authentication credentials. Expected OAuth 2 access token.",
            );
        }
    }
    let parts: Vec<&str> = rest.split('/').collect();
    match (r.method.as_str(), parts.as_slice()) {
        ("POST", [project, "jobs"]) => insert(&mut m, project, r),
        ("GET", [project, "jobs", job_id]) => get(&mut m, project, job_id),
        ("POST", [project, "jobs", job_id, "cancel"]) => cancel(&mut m, project, job_id),
        _ => google_error(404, "NOT_FOUND", "notFound", &format!("Not found: URL {}", r.path)),
    }
}

fn token(m: &mut Model, public_key_der: &[u8], r: &Recorded) -> Reply {
    let form = r.form();
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if field("grant_type") == Some("refresh_token") {
        if field("client_id") != Some(USER_CLIENT_ID) || field("client_secret") != Some(USER_CLIENT_SECRET) {
            return Reply::json(
                401,
                json!({"error": "invalid_client", "error_description": "The OAuth client was not found."}),
            );
        }
        if field("refresh_token") != Some(USER_REFRESH_TOKEN) {
            return Reply::json(400, json!({"error": "invalid_grant", "error_description": "Bad Request"}));
        }
        return issue(m);
    }
    if field("grant_type") != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return Reply::json(
            400,
            json!({"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}),
        );
    }
    let claims = match crate::jwt::verify_rs256(field("assertion").unwrap_or_default(), public_key_der) {
        Ok(c) => c,
        Err(e) => {
            return Reply::json(
                400,
                json!({"error": "invalid_grant", "error_description": format!("Invalid JWT Signature: {e}")}),
            );
        }
    };
    let present = |k: &str| claims[k].as_str().is_some_and(|v| !v.is_empty());
    if !(present("iss") && present("scope") && present("aud") && claims["exp"].is_u64()) {
        return Reply::json(
            400,
            json!({"error": "invalid_grant", "error_description": "Invalid JWT: iss, scope, aud and exp are required"}),
        );
    }
    issue(m)
}

fn issue(m: &mut Model) -> Reply {
    let token = format!("ya29.fake-{}", m.issued.len() + 1);
    m.tokens.push(token.clone());
    m.issued.push(token.clone());
    Reply::json(200, json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}))
}

fn insert(m: &mut Model, project: &str, r: &Recorded) -> Reply {
    let body = r.json();
    let Some(job_id) = body["jobReference"]["jobId"].as_str().map(str::to_owned) else {
        return google_error(400, "INVALID_ARGUMENT", "invalid", "Job ID must be specified.");
    };
    if body["configuration"]["query"]["query"].as_str().is_none_or(str::is_empty) {
        return google_error(400, "INVALID_ARGUMENT", "invalid", "Query text must be specified.");
    }
    let location = body["jobReference"]["location"].as_str().unwrap_or("US").to_owned();
    if let Some(existing) = m.jobs.get(&job_id) {
        // Named with the location it runs in, whatever the repeat says.
        return google_error(
            409,
            "ALREADY_EXISTS",
            "duplicate",
            &format!("Already Exists: Job {project}:{}.{job_id}", existing.location),
        );
    }
    let mut configuration = body["configuration"].clone();
    if configuration["query"]["destinationTable"].is_null() {
        // BigQuery writes query results to an anonymous table when no destination is given.
        configuration["query"]["destinationTable"] =
            json!({"projectId": project, "datasetId": "_anon_fake", "tableId": format!("anon_{job_id}")});
    }
    let script: VecDeque<JobStep> = m
        .next_script
        .take()
        .unwrap_or_else(|| vec![JobStep::Pending, JobStep::Running, JobStep::Done])
        .into();
    let job = Job {
        project: project.to_owned(),
        location,
        configuration,
        script,
        current: JobStep::Pending,
        cancelled: false,
    };
    let answer = resource(&job_id, &job);
    m.jobs.insert(job_id, job);
    Reply::json(200, answer)
}

fn get(m: &mut Model, project: &str, job_id: &str) -> Reply {
    let Some(job) = m.jobs.get_mut(job_id).filter(|j| j.project == project) else {
        return google_error(404, "NOT_FOUND", "notFound", &format!("Not found: Job {project}:{job_id}"));
    };
    if !job.cancelled
        && let Some(step) = job.script.pop_front()
    {
        job.current = step;
    }
    Reply::json(200, resource(job_id, job))
}

fn cancel(m: &mut Model, project: &str, job_id: &str) -> Reply {
    let Some(job) = m.jobs.get_mut(job_id).filter(|j| j.project == project) else {
        return google_error(404, "NOT_FOUND", "notFound", &format!("Not found: Job {project}:{job_id}"));
    };
    if !matches!(job.current, JobStep::Done | JobStep::Failed { .. }) {
        job.cancelled = true;
        job.current = JobStep::Failed {
            reason: "stopped".into(),
            message: "Job execution was cancelled: User requested cancellation".into(),
        };
    }
    Reply::json(200, json!({"kind": "bigquery#jobCancelResponse", "job": resource(job_id, job)}))
}

fn resource(job_id: &str, job: &Job) -> Value {
    let status = match &job.current {
        JobStep::Pending => json!({"state": "PENDING"}),
        JobStep::Running => json!({"state": "RUNNING"}),
        JobStep::Done => json!({"state": "DONE"}),
        JobStep::Failed { reason, message } => json!({
            "state": "DONE",
            "errorResult": {"reason": reason, "message": message},
            "errors": [{"reason": reason, "message": message}],
        }),
        JobStep::Raw(s) => json!({"state": s}),
    };
    json!({
        "kind": "bigquery#job",
        "id": format!("{}:{}.{}", job.project, job.location, job_id),
        "jobReference": {"projectId": job.project, "jobId": job_id, "location": job.location},
        "configuration": job.configuration,
        "status": status,
    })
}
