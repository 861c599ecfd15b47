//! One external REST API, called within a budget.
//!
//! Each gRPC call a plugin serves has a deadline (the caller's `grpc-timeout`, capped by the
//! operation's budget: [`deadline`]). [`Api::send`] makes the HTTP request, and while the answer
//! is transient (HTTP 429, 500, 502, 503, 504, a refused or reset connection, an attempt that
//! timed out) and time is left, waits with jittered exponential backoff (or the server's
//! `Retry-After`) and tries again. A request that could start a second job when repeated is marked
//! [`Request::non_idempotent`] and is retried only when the server cannot have acted on it
//! (connection refused, 429); the plugins avoid that by sending the API's own idempotency key.
//!
//! Errors name the API, the operation and the server's own message; never a header, so never a
//! credential.

use std::{
    hash::{BuildHasher as _, RandomState},
    time::{Duration, Instant},
};

use flotilla_sdk::{Call, PluginError, telemetry::config::HumanDuration};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use reqwest::Url;
use serde::Deserialize;
use serde_json::Value;
use tonic::Status;

use crate::secret::Secret;

/// The longest any timeout or backoff setting may be: a call waits at most this.
const MAX_SETTING: Duration = Duration::from_secs(24 * 3600);
/// The longest an access token is trusted, whatever lifetime its issuer claims.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long before the caller's deadline the plugin stops retrying, to leave time to answer.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);
/// The longest excerpt of an unexpected body quoted in an error.
const EXCERPT: usize = 300;

/// When the work for a call must be done: `budget` from now, or a little before the caller's
/// own deadline if that comes first.
pub fn deadline(call: &Call, budget: Duration) -> Instant {
    let own = Instant::now() + budget;
    match call.deadline {
        Some(theirs) => own.min(theirs.checked_sub(DEADLINE_MARGIN).unwrap_or(theirs)),
        None => own,
    }
}

/// HTTP client settings and per-operation budgets, from a service's `[plugin]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Longest a single HTTP attempt may take.
    pub attempt_timeout: HumanDuration,
    /// Longest a TCP/TLS connect may take.
    pub connect_timeout: HumanDuration,
    /// First backoff between attempts; doubles up to `backoff_max`, with jitter.
    pub backoff_initial: HumanDuration,
    /// Longest wait between attempts.
    pub backoff_max: HumanDuration,
    /// Budget of a CreateTask (within the caller's deadline).
    pub create_timeout: HumanDuration,
    /// Budget of a GetTask; propeller's default deadline is 3 s.
    pub get_timeout: HumanDuration,
    /// Budget of a DeleteTask.
    pub delete_timeout: HumanDuration,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            attempt_timeout: HumanDuration(Duration::from_secs(10)),
            connect_timeout: HumanDuration(Duration::from_secs(3)),
            backoff_initial: HumanDuration(Duration::from_millis(100)),
            backoff_max: HumanDuration(Duration::from_secs(2)),
            create_timeout: HumanDuration(Duration::from_secs(8)),
            get_timeout: HumanDuration(Duration::from_millis(2500)),
            delete_timeout: HumanDuration(Duration::from_secs(5)),
        }
    }
}

impl ApiSettings {
    /// Applies `<prefix>GET_TIMEOUT`, `<prefix>CREATE_TIMEOUT`, … from `env`
    /// (e.g. prefix `FLOTILLA_DATABRICKS_`), adding a problem per bad value.
    pub fn override_from_env(
        &mut self,
        env: flotilla_sdk::telemetry::config::Env<'_>,
        prefix: &str,
        problems: &mut Vec<String>,
    ) {
        use flotilla_sdk::telemetry::config::override_from_env as over;
        over(env, &format!("{prefix}ATTEMPT_TIMEOUT"), &mut self.attempt_timeout, problems);
        over(env, &format!("{prefix}CONNECT_TIMEOUT"), &mut self.connect_timeout, problems);
        over(env, &format!("{prefix}CREATE_TIMEOUT"), &mut self.create_timeout, problems);
        over(env, &format!("{prefix}GET_TIMEOUT"), &mut self.get_timeout, problems);
        over(env, &format!("{prefix}DELETE_TIMEOUT"), &mut self.delete_timeout, problems);
    }

    /// Every setting by its key, in the order `--check-config` prints them.
    fn by_key(&self) -> [(&'static str, HumanDuration); 7] {
        [
            ("create_timeout", self.create_timeout),
            ("get_timeout", self.get_timeout),
            ("delete_timeout", self.delete_timeout),
            ("attempt_timeout", self.attempt_timeout),
            ("connect_timeout", self.connect_timeout),
            ("backoff_initial", self.backoff_initial),
            ("backoff_max", self.backoff_max),
        ]
    }

    /// The settings as `--check-config` prints them.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        self.by_key().into_iter().map(|(k, v)| (k, v.to_string())).collect()
    }

    /// Every problem with these values.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (name, d) in self.by_key() {
            if d.0.is_zero() && !name.starts_with("backoff") {
                p.push(format!("{name}: must be more than zero"));
            }
            if d.0 > MAX_SETTING {
                p.push(format!("{name}: {d} is longer than the most a call can wait, 1 day"));
            }
        }
        if self.backoff_initial > self.backoff_max {
            p.push("backoff_initial: must not exceed backoff_max".to_owned());
        }
        p
    }
}

/// Parses a base URL setting: absolute http(s), no query; a trailing `/` is implied.
///
/// # Errors
/// What is wrong with it.
pub fn parse_base_url(raw: &str) -> Result<Url, String> {
    let mut with_slash = raw.trim().to_owned();
    if !with_slash.ends_with('/') {
        with_slash.push('/');
    }
    let url = Url::parse(&with_slash).map_err(|e| format!("`{raw}` is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("`{raw}` must be an http:// or https:// URL with a host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{raw}` must not have a query or fragment"));
    }
    Ok(url)
}

/// Why a call to an external API failed. Display names the API and the operation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The API answered with an error status.
    #[error("{api} {op} failed: HTTP {status}: {message}")]
    Status {
        /// The API, e.g. "Databricks".
        api: &'static str,
        /// The operation, e.g. "runs/get".
        op: &'static str,
        /// The HTTP status.
        status: u16,
        /// The API's own message, from its error body.
        message: String,
        /// The body names a rate limit ([`rate_limited`]) whatever the
        /// status: Google APIs answer some with 403.
        rate_limited: bool,
    },
    /// No answer: the connection failed or broke.
    #[error("{api} {op} failed: could not reach {host}: {detail}")]
    Unreachable {
        /// The API.
        api: &'static str,
        /// The operation.
        op: &'static str,
        /// The host that was tried.
        host: String,
        /// What went wrong.
        detail: String,
    },
    /// The call's budget ran out before an answer.
    #[error("{api} {op} {}", waited(*.after))]
    Timeout {
        /// The API.
        api: &'static str,
        /// The operation.
        op: &'static str,
        /// How long it had.
        after: Duration,
    },
    /// The request cannot be sent as built: a credential that no HTTP header
    /// can carry (a line break in a secret file, say). Not sent, not retried.
    #[error("{api} {op} was not sent: {detail}")]
    Unsendable {
        /// The API.
        api: &'static str,
        /// The operation.
        op: &'static str,
        /// What is wrong, never the credential itself.
        detail: String,
    },
    /// The API answered, but not with what its documents describe.
    #[error("{api} {op} answered with an unexpected body: {detail}")]
    Malformed {
        /// The API.
        api: &'static str,
        /// The operation.
        op: &'static str,
        /// What was wrong, with a short excerpt.
        detail: String,
    },
}

impl ApiError {
    /// The HTTP status, when the API answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// A transient failure: worth trying again later (rate limits, server errors, no answer).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Status { status, rate_limited, .. } => *rate_limited || is_transient_status(*status),
            Self::Unreachable { .. } | Self::Timeout { .. } => true,
            Self::Malformed { .. } | Self::Unsendable { .. } => false,
        }
    }

    /// The error an answer is when its status, accepted to be looked at
    /// ([`Request::accept_status`]), turns out to be a refusal after all.
    pub fn refusal(api: &'static str, op: &'static str, answer: &Response) -> Self {
        Self::Status { api, op, status: answer.status, message: answer.error_message(), rate_limited: false }
    }

    /// Builds a [`ApiError::Malformed`] for this API call.
    pub fn malformed(api: &'static str, op: &'static str, detail: impl Into<String>) -> Self {
        Self::Malformed { api, op, detail: detail.into() }
    }
}

impl From<ApiError> for PluginError {
    fn from(e: ApiError) -> Self {
        let text = e.to_string();
        match e {
            ApiError::Status { rate_limited: true, .. } => PluginError::Unavailable(text),
            ApiError::Status { status: 401, .. } => PluginError::Status(Status::unauthenticated(format!(
                "{text} (the service's own credentials for the API were refused)"
            ))),
            ApiError::Status { status: 403, .. } => PluginError::Status(Status::permission_denied(text)),
            ApiError::Status { status: 400 | 409 | 422, .. } => PluginError::InvalidArgument(text),
            ApiError::Status { status: 404, .. } => PluginError::NotFound(text),
            ApiError::Status { status, .. } if is_transient_status(status) => PluginError::Unavailable(text),
            ApiError::Unreachable { .. } => PluginError::Unavailable(text),
            ApiError::Timeout { .. } => PluginError::Status(Status::deadline_exceeded(text)),
            ApiError::Unsendable { .. } => PluginError::Unconfigured(text),
            ApiError::Status { .. } | ApiError::Malformed { .. } => PluginError::Internal(text),
        }
    }
}

/// The end of a timeout's message: how long the API had, or that it had no time at all.
fn waited(after: Duration) -> String {
    if after.is_zero() {
        "was not called: the caller's deadline left no time for it".to_owned()
    } else {
        format!("did not answer within {after:?}")
    }
}

fn is_transient_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// A request body.
#[derive(Clone)]
enum Body {
    Empty,
    Json(Value),
    Form(Vec<(String, String)>),
}

/// Form bodies carry credentials (OAuth client secrets, signed JWT
/// assertions): printed with their field names only.
impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => f.write_str("Empty"),
            Self::Json(v) => f.debug_tuple("Json").field(v).finish(),
            Self::Form(fields) => {
                f.debug_map().entries(fields.iter().map(|(k, _)| (k, "<redacted>"))).finish()
            }
        }
    }
}

/// One HTTP request to an API, built once and sent as many times as retries need.
#[derive(Clone, Debug)]
pub struct Request {
    op: &'static str,
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Body,
    idempotent: bool,
    accept: Vec<u16>,
    /// Statuses whose body is not read: the status says all that is needed.
    bodiless: Vec<u16>,
    /// The answer may hold a credential (a token endpoint's): never quoted in errors.
    secret_answer: bool,
    /// Why the request cannot be sent, when a credential could not be put in it.
    unsendable: Option<String>,
}

impl Request {
    fn new(op: &'static str, method: Method, url: Url, body: Body) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::ACCEPT, HeaderValue::from_static("application/json"));
        Self {
            op,
            method,
            url,
            headers,
            body,
            idempotent: true,
            accept: Vec::new(),
            bodiless: Vec::new(),
            secret_answer: false,
            unsendable: None,
        }
    }

    /// `GET url`, named `op` in errors and logs.
    pub fn get(op: &'static str, url: Url) -> Self {
        Self::new(op, Method::GET, url, Body::Empty)
    }

    /// `POST url` with a JSON body.
    pub fn post_json(op: &'static str, url: Url, body: Value) -> Self {
        Self::new(op, Method::POST, url, Body::Json(body))
    }

    /// `POST url` with a form body (`application/x-www-form-urlencoded`).
    pub fn post_form(op: &'static str, url: Url, form: Vec<(String, String)>) -> Self {
        Self::new(op, Method::POST, url, Body::Form(form))
    }

    /// `POST url` without a body.
    pub fn post_empty(op: &'static str, url: Url) -> Self {
        Self::new(op, Method::POST, url, Body::Empty)
    }

    /// Adds `Authorization: Bearer <token>`, marked sensitive.
    #[must_use]
    pub fn bearer(self, token: &Secret) -> Self {
        self.sensitive_header(http::header::AUTHORIZATION, &format!("Bearer {}", token.expose()))
    }

    /// Adds a header that carries a credential: marked sensitive, never printed.
    /// A value no header can carry makes the request fail unsent, naming the
    /// header (not the value): sent without it, the API would only say that
    /// the credential is missing.
    #[must_use]
    pub fn sensitive_header(mut self, name: HeaderName, value: &str) -> Self {
        match HeaderValue::from_str(value) {
            Ok(mut v) => {
                v.set_sensitive(true);
                self.headers.insert(name, v);
            }
            Err(_) => {
                self.unsendable = Some(format!(
                    "the credential for its {name} header holds characters no HTTP header can carry (a line \
                     break or a control character in the secret?)"
                ));
            }
        }
        self
    }

    /// The answer may carry a credential (a token endpoint's): an answer that
    /// is not what was expected is described, never quoted, in errors.
    #[must_use]
    pub fn secret_answer(mut self) -> Self {
        self.secret_answer = true;
        self
    }

    /// Adds a header. Values that are not valid header text are dropped.
    #[must_use]
    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.insert(HeaderName::from_static(name), v);
        }
        self
    }

    /// Retried only when the server cannot have acted on it (refused connection, HTTP 429).
    #[must_use]
    pub fn non_idempotent(mut self) -> Self {
        self.idempotent = false;
        self
    }

    /// Treats `status` as an answer to return rather than an error (e.g. 404 on a cancel).
    #[must_use]
    pub fn accept_status(mut self, status: u16) -> Self {
        self.accept.push(status);
        self
    }

    /// Answers `status` without reading its body (the answer's body is then
    /// `null`) when the body is JSON: for a status that says all the caller
    /// needs while its body may be large, as a finished statement's first page
    /// of results. Any other body is read and checked as usual.
    #[must_use]
    pub fn ignore_body_of(mut self, status: u16) -> Self {
        self.bodiless.push(status);
        self
    }

    /// The operation's name.
    pub fn op(&self) -> &'static str {
        self.op
    }
}

/// An answer: a 2xx status, or one the request accepted.
#[derive(Clone, Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The response headers.
    pub headers: HeaderMap,
    /// The JSON body; `Null` when the body was empty.
    pub body: Value,
}

impl Response {
    /// The API's message in this answer's body ([`error_message_of`]).
    pub fn error_message(&self) -> String {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        error_message_of(status, &self.body)
    }
}

/// A client for one external API.
#[derive(Clone, Debug)]
pub struct Api {
    name: &'static str,
    /// Built on first use: loading the system's TLS roots takes tens of milliseconds, which a
    /// service that may never call its API (no credentials yet, `flotilla up`) should not pay at start.
    http: std::sync::Arc<std::sync::OnceLock<Result<reqwest::Client, String>>>,
    settings: ApiSettings,
}

/// What one attempt came to.
enum Attempt {
    Answer(Response),
    Failed { error: ApiError, retry: bool, retry_after: Option<Duration> },
}

impl Api {
    /// A client for the API called `name` in messages (e.g. "BigQuery").
    ///
    /// # Errors
    /// When the HTTP client cannot be built (for example no TLS roots).
    pub fn new(name: &'static str, settings: &ApiSettings) -> Result<Self, String> {
        crate::install_crypto_provider();
        Ok(Self { name, http: Default::default(), settings: settings.clone() })
    }

    fn client(&self) -> Result<&reqwest::Client, String> {
        self.http
            .get_or_init(|| {
                reqwest::Client::builder()
                    .connect_timeout(self.settings.connect_timeout.0)
                    .pool_idle_timeout(Duration::from_secs(60))
                    .user_agent(concat!("flotilla/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| format!("building the {} HTTP client: {}", self.name, error_chain(&e)))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The API's name, as errors say it.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The settings this client was built with.
    pub fn settings(&self) -> &ApiSettings {
        &self.settings
    }

    /// Sends `request`, retrying transient failures until `deadline`.
    ///
    /// # Errors
    /// The last failure when no answer came in time, or the first that is not transient.
    pub async fn send(&self, request: Request, deadline: Instant) -> Result<Response, ApiError> {
        if let Some(detail) = &request.unsendable {
            return Err(ApiError::Unsendable { api: self.name, op: request.op, detail: detail.clone() });
        }
        let mut backoff = self.settings.backoff_initial.0;
        let mut last: Option<ApiError> = None;
        for attempt in 1u32.. {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let limit = left.min(self.settings.attempt_timeout.0);
            let (error, retry_after) = match self.attempt(&request, limit).await {
                Attempt::Answer(r) => return Ok(r),
                Attempt::Failed { error, retry: false, .. } => return Err(error),
                Attempt::Failed { error, retry: true, retry_after } => (error, retry_after),
            };
            // The server's Retry-After wins over our backoff, even when it is longer: retrying sooner is refused.
            let wait =
                retry_after.unwrap_or_else(|| jitter(backoff, attempt).min(self.settings.backoff_max.0));
            if Instant::now() + wait >= deadline {
                tracing::debug!(api = self.name, op = request.op, attempt, error = %error, "No time left to retry");
                return Err(error);
            }
            tracing::debug!(api = self.name, op = request.op, attempt, wait_ms = wait.as_millis() as u64, error = %error, "Retrying");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(self.settings.backoff_max.0);
            last = Some(error);
        }
        Err(last.unwrap_or(ApiError::Timeout { api: self.name, op: request.op, after: Duration::ZERO }))
    }

    async fn attempt(&self, request: &Request, limit: Duration) -> Attempt {
        let (api, op) = (self.name, request.op);
        let client = match self.client() {
            Ok(c) => c,
            Err(detail) => {
                let host = request.url.host_str().unwrap_or_default().to_owned();
                let error = ApiError::Unreachable { api, op, host, detail };
                return Attempt::Failed { error, retry: false, retry_after: None };
            }
        };
        let mut builder = client
            .request(request.method.clone(), request.url.clone())
            .headers(request.headers.clone())
            .timeout(limit);
        builder = match &request.body {
            Body::Empty => builder,
            Body::Json(v) => builder.json(v),
            Body::Form(f) => builder.form(f),
        };
        let response = match builder.send().await {
            Ok(r) => r,
            Err(e) => {
                let host = request.url.host_str().unwrap_or_default().to_owned();
                if e.is_timeout() {
                    return Attempt::Failed {
                        error: ApiError::Timeout { api, op, after: limit },
                        retry: request.idempotent,
                        retry_after: None,
                    };
                }
                // A refused connect never reached the server; anything else may have.
                let refused = e.is_connect();
                return Attempt::Failed {
                    error: ApiError::Unreachable { api, op, host, detail: error_chain(&e.without_url()) },
                    retry: request.idempotent || refused,
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        let json = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
        // Only an answer that is the API's own (JSON; not a proxy's page) is taken unread.
        if json && request.bodiless.contains(&status.as_u16()) {
            // Dropped unread: the connection closes rather than drain it.
            return Attempt::Answer(Response { status: status.as_u16(), headers, body: Value::Null });
        }
        let bytes = match response.bytes().await {
            Ok(b) => b,
            Err(e) => {
                let host = request.url.host_str().unwrap_or_default().to_owned();
                return Attempt::Failed {
                    error: ApiError::Unreachable { api, op, host, detail: error_chain(&e.without_url()) },
                    retry: request.idempotent,
                    retry_after: None,
                };
            }
        };
        let code = status.as_u16();
        if status.is_success() || request.accept.contains(&code) {
            let body = if bytes.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                match serde_json::from_slice(&bytes) {
                    Ok(v) => v,
                    Err(e) => {
                        return Attempt::Failed {
                            error: ApiError::malformed(
                                api,
                                op,
                                if request.secret_answer {
                                    format!("not JSON ({e}; not quoted here: it may hold a credential)")
                                } else {
                                    format!("not JSON ({e}): {}", excerpt(&bytes))
                                },
                            ),
                            retry: false,
                            retry_after: None,
                        };
                    }
                }
            };
            return Attempt::Answer(Response { status: code, headers, body });
        }
        let rate_limited = code == 429 || rate_limited(&bytes);
        let message = match serde_json::from_slice::<Value>(&bytes) {
            // A token endpoint's error is quoted only in the shapes the APIs document.
            Ok(v) if request.secret_answer => json_message(status, &v),
            _ if request.secret_answer => None,
            _ => Some(error_message(status, &bytes)),
        };
        let message = message.unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
        let error = ApiError::Status { api, op, status: code, message, rate_limited };
        // A rate limit refused the request before doing anything: safe to send again.
        let retry = rate_limited || (is_transient_status(code) && request.idempotent);
        Attempt::Failed { error, retry, retry_after: retry_after(&headers) }
    }
}

/// The server's message from an error body, in the shapes the APIs we call use:
/// Google (`{"error": {"message", "status"}}`), OAuth (`{"error", "error_description"}`),
/// Databricks (`{"error_code", "message"}`), Snowflake (`{"code", "message"}`).
pub fn error_message(status: StatusCode, body: &[u8]) -> String {
    let reason = status.canonical_reason().unwrap_or("error");
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => json_message(status, &v).unwrap_or_else(|| excerpt(body)),
        Err(_) if body.iter().all(u8::is_ascii_whitespace) => reason.to_owned(),
        Err(_) => excerpt(body),
    }
}

/// [`error_message`] of a body already parsed.
fn error_message_of(status: StatusCode, v: &Value) -> String {
    json_message(status, v).unwrap_or_else(|| excerpt(v.to_string().as_bytes()))
}

/// The message of a JSON error body in one of the shapes [`error_message`] knows.
fn json_message(status: StatusCode, v: &Value) -> Option<String> {
    let reason = status.canonical_reason().unwrap_or("error");
    let text = |v: &Value| v.as_str().map(str::to_owned).or_else(|| v.as_i64().map(|n| n.to_string()));
    if let Some(e) = v.get("error").filter(|e| e.is_object()) {
        let message = e.get("message").and_then(text).unwrap_or_else(|| reason.to_owned());
        return Some(match e.get("status").and_then(text) {
            Some(s) => format!("{s}: {message}"),
            None => message,
        });
    }
    if let Some(e) = v.get("error").and_then(text) {
        return Some(match v.get("error_description").and_then(text) {
            Some(d) => format!("{e}: {d}"),
            None => e,
        });
    }
    let code = v.get("error_code").or_else(|| v.get("code")).and_then(text);
    match (code, v.get("message").and_then(text)) {
        (Some(c), Some(m)) => Some(format!("{c}: {m}")),
        (None, Some(m)) => Some(m),
        _ => None,
    }
}

/// Whether a Google error body (`{"error": {"errors": [{"reason"}]}}`) names a
/// rate limit: BigQuery answers `rateLimitExceeded` with HTTP 403, and Google's
/// own clients retry it as they retry a 429.
pub fn rate_limited(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(body) else { return false };
    google_reason_is(&v, "rateLimitExceeded") || google_reason_is(&v, "userRateLimitExceeded")
}

/// Whether a Google error body (`{"error": {"errors": [{"reason"}]}}`) gives `reason`.
pub fn google_reason_is(body: &Value, reason: &str) -> bool {
    body.pointer("/error/errors")
        .and_then(Value::as_array)
        .is_some_and(|errors| errors.iter().any(|e| e.get("reason").and_then(Value::as_str) == Some(reason)))
}

/// What is wrong with a JSON document that may hold secrets, without its
/// values: serde's own message for a missing field or bad syntax, else the
/// position only (its "invalid type: string \"...\"" quotes the value).
pub fn describe_json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let text = e.to_string();
    match e.classify() {
        Category::Data if text.starts_with("missing field") => text,
        Category::Data => {
            format!("a value has the wrong type or shape at line {} column {}", e.line(), e.column())
        }
        Category::Syntax | Category::Eof => {
            format!("not JSON: syntax error at line {} column {}", e.line(), e.column())
        }
        Category::Io => text,
    }
}

/// The first few hundred characters of a body, for an error message.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(EXCERPT) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// `Retry-After` in seconds, if the server sent one.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: f64 = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

/// Full jitter between half and all of `base`, so replicas that failed together do not retry together.
fn jitter(base: Duration, attempt: u32) -> Duration {
    let random = RandomState::new().hash_one(attempt);
    let fraction = 0.5 + (random % 1000) as f64 / 2000.0;
    base.mul_f64(fraction)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
