//! The Databricks plugin: Flyte Spark tasks (`spark`, and `databricks` for
//! workflows that also run Spark on Kubernetes) submitted as one-time runs of
//! the Databricks Jobs API 2.1, a drop-in replacement for flytekit's
//! Databricks connector.
//!
//! - CreateTask: `POST {api}/api/2.1/jobs/runs/submit` with the body built
//!   from `custom.databricksConf` and the container ([`spec`]), plus an
//!   `idempotency_token`, so a retried create never starts a second run.
//! - GetTask: `GET {api}/api/2.1/jobs/runs/get?run_id=…`, mapped by [`state`];
//!   the log link is the run's page in the workspace console.
//! - DeleteTask: `POST {api}/api/2.1/jobs/runs/cancel` with `{"run_id": …}`.
//!
//! Authentication as upstream's connector: a personal access token read on
//! every call from the secret upstream operators mount
//! (`FLYTE_DATABRICKS_ACCESS_TOKEN`), or, opted into with
//! `databricksAuthType`/`FLYTE_DATABRICKS_AUTH_TYPE = oauth_m2m`, a service
//! principal's OAuth token from the workspace's `/oidc/v1/token` endpoint
//! (client-credentials grant, cached until a minute before it expires). No
//! token is ever stored in `resource_meta`.

pub mod config;
pub mod meta;
pub mod spec;
pub mod state;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use flotilla_cloud::{
    api::{self, Api, ApiError, Request},
    secret::{Secret, SecretStore},
    template,
};
use flotilla_sdk::{
    AgentSpec, Call, Category, Plugin, PluginError, ServiceConfig,
    proto::{admin, core},
    resource,
};
use prost::Message as _;
use serde_json::{Value, json};

pub use config::Settings;
use meta::Meta;

/// The `spark` task type (upstream's `DatabricksAgent`).
pub const SPARK: &str = "spark";
/// The `databricks` task type (upstream's `DatabricksAgentV2`).
pub const DATABRICKS: &str = "databricks";
/// The agent's name in ListAgents, as flytekitplugins-spark 1.16 names it.
pub const AGENT_NAME: &str = "Databricks Connector";
/// The secret holding the personal access token, where upstream reads it.
pub const TOKEN_KEY: &str = "FLYTE_DATABRICKS_ACCESS_TOKEN";
/// The log link's name, as upstream's.
pub const LOG_LINK_NAME: &str = "Databricks Console";
/// The secret holding an OAuth service principal's secret, where upstream reads it.
pub const CLIENT_SECRET_KEY: &str = "DATABRICKS_CLIENT_SECRET";
/// The API's name in errors.
const API: &str = "Databricks";
/// An OAuth token is renewed this long before it expires.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// How a task's calls are authorized.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Auth {
    /// The service's personal access token.
    Pat,
    /// A service principal's OAuth token (client-credentials grant).
    OAuth { client_id: String },
}

/// OAuth access tokens by (workspace, client id), with when to renew them.
type TokenCache = Arc<Mutex<HashMap<(String, String), (Secret, Instant)>>>;

/// The Databricks plugin.
#[derive(Clone, Debug)]
pub struct Databricks {
    settings: Settings,
    api: Api,
    secrets: SecretStore,
    oauth_tokens: TokenCache,
}

impl Databricks {
    /// A plugin with these settings, reading its token from `secrets`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(settings: Settings, secrets: SecretStore) -> Result<Self, String> {
        let api = Api::new(API, &settings.api)?;
        Ok(Self { settings, api, secrets, oauth_tokens: TokenCache::default() })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Builds the plugin from the `[plugin]` table and the process environment.
    ///
    /// # Errors
    /// Names every invalid setting.
    pub fn from_config(config: &ServiceConfig) -> Result<Self, String> {
        let settings = Settings::load(&config.plugin, &flotilla_sdk::telemetry::config::process_env)?;
        Self::new(settings, SecretStore::from_process())
    }

    fn token(&self) -> Result<Secret, PluginError> {
        self.secrets.get(TOKEN_KEY).map_err(|e| e.for_purpose("the Databricks access token").into())
    }

    /// The task's authentication: `custom.databricksAuthType`, else the service's, else PAT.
    fn auth_for_task(&self, custom: &serde_json::Map<String, Value>) -> Result<Auth, PluginError> {
        let text = |key: &str| custom.get(key).and_then(Value::as_str).filter(|s| !s.is_empty());
        let kind = text("databricksAuthType").or(self.settings.auth_type.as_deref()).unwrap_or("pat");
        match kind {
            "pat" => Ok(Auth::Pat),
            "oauth_m2m" => {
                let client_id =
                    text("databricksClientId").or(self.settings.client_id.as_deref()).ok_or_else(|| {
                        PluginError::Unconfigured(format!(
                            "OAuth M2M needs a service principal: set custom.databricksClientId (the task's \
                         databricks_client_id) or {} / [plugin] client_id on the service",
                            config::ENV_CLIENT_ID
                        ))
                    })?;
                Ok(Auth::OAuth { client_id: client_id.to_owned() })
            }
            "oidc_federation" => Err(PluginError::Unconfigured(
                "Databricks auth type oidc_federation is not supported by flotilla-databricks; use pat or \
                 oauth_m2m"
                    .to_owned(),
            )),
            other => Err(PluginError::InvalidArgument(format!(
                "custom.databricksAuthType {other:?} is not one of {}",
                config::AUTH_TYPES.join(", ")
            ))),
        }
    }

    /// A stored task's authentication.
    fn auth_of(meta: &Meta) -> Result<Auth, PluginError> {
        match (meta.auth_type.as_deref(), &meta.client_id) {
            (None | Some("pat"), _) => Ok(Auth::Pat),
            (Some("oauth_m2m"), Some(id)) if !id.is_empty() => Ok(Auth::OAuth { client_id: id.clone() }),
            (Some(other), _) => Err(PluginError::InvalidArgument(format!(
                "resource_meta.auth_type {other:?} needs what this service does not have (a client_id, or \
                 support for it)"
            ))),
        }
    }

    /// The bearer token for a call to `instance`.
    async fn bearer(&self, instance: &str, auth: &Auth, deadline: Instant) -> Result<Secret, PluginError> {
        let Auth::OAuth { client_id } = auth else { return self.token() };
        let key = (instance.to_owned(), client_id.clone());
        if let Some((token, renew_at)) = self.oauth_tokens.lock().expect("not poisoned").get(&key)
            && Instant::now() < *renew_at
        {
            return Ok(token.clone());
        }
        let secret = self
            .secrets
            .get(CLIENT_SECRET_KEY)
            .map_err(|e| e.for_purpose("the Databricks OAuth service principal's secret"))?;
        let form = vec![
            ("grant_type".to_owned(), "client_credentials".to_owned()),
            ("scope".to_owned(), "all-apis".to_owned()),
            ("client_id".to_owned(), client_id.clone()),
            ("client_secret".to_owned(), secret.expose().to_owned()),
        ];
        let url = self.url(instance, "oidc/v1/token")?;
        let answer =
            self.api.send(Request::post_form("oidc/v1/token", url, form).secret_answer(), deadline).await?;
        let token = answer.body.get("access_token").and_then(Value::as_str).filter(|t| !t.is_empty());
        let token = Secret::new(
            token
                .ok_or_else(|| ApiError::malformed(API, "oidc/v1/token", "no access_token in the answer"))?,
        );
        let lifetime =
            Duration::from_secs(answer.body.get("expires_in").and_then(Value::as_u64).unwrap_or(3600))
                .min(api::MAX_TOKEN_LIFETIME);
        let renew_at = Instant::now() + lifetime.saturating_sub(REFRESH_MARGIN);
        self.oauth_tokens.lock().expect("not poisoned").insert(key, (token.clone(), renew_at));
        tracing::debug!(instance = %instance, client_id = %client_id, "Got a Databricks OAuth token");
        Ok(token)
    }

    /// Sends a request built around the bearer token. An OAuth token the API
    /// refuses is dropped from the cache and replaced once, within the deadline.
    async fn send(
        &self,
        instance: &str,
        auth: &Auth,
        deadline: Instant,
        request: impl Fn(&Secret) -> Request,
    ) -> Result<api::Response, PluginError> {
        let token = self.bearer(instance, auth, deadline).await?;
        match self.api.send(request(&token), deadline).await {
            Err(e) if e.status() == Some(401) && matches!(auth, Auth::OAuth { .. }) => {
                if let Auth::OAuth { client_id } = auth {
                    self.oauth_tokens
                        .lock()
                        .expect("not poisoned")
                        .remove(&(instance.to_owned(), client_id.clone()));
                }
                let token = self.bearer(instance, auth, deadline).await?;
                Ok(self.api.send(request(&token), deadline).await?)
            }
            other => Ok(other?),
        }
    }

    /// The workspace a task runs in: `custom.databricksInstance`, else the service's.
    fn instance(&self, custom: &serde_json::Map<String, Value>) -> Result<String, PluginError> {
        let from_task = match custom.get("databricksInstance") {
            Some(Value::String(s)) => config::normalize_instance(s)
                .map_err(|e| PluginError::InvalidArgument(format!("custom.databricksInstance: {e}")))?,
            None | Some(Value::Null) => String::new(),
            Some(_) => {
                return Err(PluginError::InvalidArgument(
                    "custom.databricksInstance must be a string (the workspace host)".to_owned(),
                ));
            }
        };
        let instance = if from_task.is_empty() { self.settings.instance.clone() } else { Some(from_task) };
        let instance = instance.ok_or_else(|| {
            PluginError::Unconfigured(format!(
                "no Databricks instance: the task sets none (custom.databricksInstance, from the task's \
                 databricks_instance) and the service has none ({} or [plugin] instance)",
                config::ENV_INSTANCE
            ))
        })?;
        self.settings.check_allowed(&instance).map_err(PluginError::InvalidArgument)?;
        Ok(instance)
    }

    fn url(&self, instance: &str, path: &str) -> Result<reqwest::Url, PluginError> {
        let root = self.settings.api_root(instance).map_err(PluginError::InvalidArgument)?;
        root.join(path).map_err(|e| PluginError::Internal(format!("building the {path} URL: {e}")))
    }
}

/// What the spec needs from the template's container (empty when there is none).
fn container_of(template: &core::TaskTemplate) -> spec::Container {
    let Some(core::task_template::Target::Container(c)) = &template.target else {
        return spec::Container::default();
    };
    spec::Container {
        image: c.image.clone(),
        args: c.args.clone(),
        env: c.env.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect(),
    }
}

/// The `idempotency_token` of a submit: a digest of the task execution (one
/// per attempt), its output prefix and the run spec, so the same create
/// repeated (by the gateway, or by propeller after a lost answer) finds the
/// run it started, while anything different starts its own; random when the
/// request carries no execution id.
fn idempotency_token(request: &admin::CreateTaskRequest, body: &serde_json::Map<String, Value>) -> String {
    let id = request.task_execution_metadata.as_ref().and_then(|m| m.task_execution_id.as_ref());
    match id {
        Some(id) => {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(b"flotilla-databricks/1\n");
            ctx.update(&id.encode_to_vec());
            ctx.update(b"\n");
            ctx.update(request.output_prefix.as_bytes());
            ctx.update(b"\n");
            ctx.update(Value::Object(body.clone()).to_string().as_bytes());
            // 64 hex characters: the API's longest token.
            ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect()
        }
        None => template::random_id(),
    }
}

/// A run id from an answer: Databricks sends a number; a string of digits is taken too.
fn run_id_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Number(n) => n.as_u64().map(|n| n.to_string()),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => Some(s.clone()),
        _ => None,
    }
}

/// What Databricks said when it answered a 400 or 404 about a run it does not
/// know (`RESOURCE_DOES_NOT_EXIST`, or `INVALID_PARAMETER_VALUE` "Run N does
/// not exist."), or `None` for any other refusal (a 404 without that, as a
/// wrong host or path answers, stays an error).
fn run_unknown(answer: &api::Response) -> Option<String> {
    let code = answer.body.get("error_code").and_then(Value::as_str).unwrap_or("");
    let message = answer.body.get("message").and_then(Value::as_str).unwrap_or("");
    let unknown =
        code == "RESOURCE_DOES_NOT_EXIST" || message.to_ascii_lowercase().contains("does not exist");
    unknown.then(|| answer.error_message())
}

/// A refusal that is not about an unknown run: the error it would have been.
fn refused(answer: &api::Response, op: &'static str) -> PluginError {
    ApiError::refusal(API, op, answer).into()
}

/// The run's page in the workspace console, as upstream links it.
pub fn console_url(instance: &str, job_id: &str, run_id: &str) -> String {
    format!("https://{instance}/#job/{job_id}/run/{run_id}")
}

impl Plugin for Databricks {
    fn agents(&self) -> Vec<AgentSpec> {
        // Upstream registers two agents of the same name, one per task type; one agent serving
        // both says the same to propeller and keeps GetAgent by name unambiguous.
        let mut agent = AgentSpec::asynchronous(AGENT_NAME, SPARK);
        agent.categories.push(Category::new(DATABRICKS, 0));
        vec![agent]
    }

    fn settings(&self) -> Vec<(&'static str, String)> {
        let set = &self.settings;
        let or = |v: &Option<String>, unset: &str| v.clone().unwrap_or_else(|| unset.to_owned());
        let mut s = vec![
            ("base_url", or(&set.base_url, "https://{instance}")),
            ("instance", or(&set.instance, "(none: each task names its workspace)")),
            (
                "allowed_instances",
                if set.allowed_instances.is_empty() {
                    "(any)".to_owned()
                } else {
                    set.allowed_instances.join(", ")
                },
            ),
            ("auth_type", or(&set.auth_type, "pat")),
            ("client_id", or(&set.client_id, "(none)")),
            ("service_credential_provider", or(&set.service_credential_provider, "(none)")),
            ("secrets_dir", self.secrets.dir().display().to_string()),
        ];
        s.extend(set.api.describe());
        s
    }

    async fn create(
        &self,
        call: &Call,
        request: admin::CreateTaskRequest,
    ) -> Result<admin::CreateTaskResponse, PluginError> {
        let deadline = api::deadline(call, self.settings.api.create_timeout.0);
        let template = request
            .template
            .as_ref()
            .ok_or_else(|| PluginError::InvalidArgument("CreateTask without a template".to_owned()))?;
        let custom = template::custom_json(template);
        let auth = self.auth_for_task(&custom)?;
        if auth == Auth::Pat {
            // Checked first: without credentials, this is the error to give.
            self.token()?;
        }
        let instance = self.instance(&custom)?;
        let mut body = spec::build(
            &custom,
            &container_of(template),
            self.settings.service_credential_provider.as_deref(),
        )
        .map_err(PluginError::InvalidArgument)?;
        let token = idempotency_token(&request, &body);
        body.insert("idempotency_token".to_owned(), Value::String(token));
        let url = self.url(&instance, "api/2.1/jobs/runs/submit")?;
        let body = Value::Object(body);
        let submit = |t: &Secret| Request::post_json("runs/submit", url.clone(), body.clone()).bearer(t);
        let answer = self.send(&instance, &auth, deadline, submit).await?;
        let run_id = run_id_of(answer.body.get("run_id")).ok_or_else(|| {
            ApiError::malformed(
                API,
                "runs/submit",
                format!("no run_id in {}", api::excerpt(answer.body.to_string().as_bytes())),
            )
        })?;
        tracing::info!(request_id = call.request_id.as_deref().unwrap_or("-"), instance = %instance, run_id = %run_id, task = %call.category, "Submitted a Databricks run");
        let (auth_type, client_id) = match auth {
            Auth::Pat => (None, None),
            Auth::OAuth { client_id } => (Some("oauth_m2m".to_owned()), Some(client_id)),
        };
        let meta = Meta { databricks_instance: instance, run_id, auth_type, client_id };
        Ok(admin::CreateTaskResponse { resource_meta: meta.encode() })
    }

    async fn get(&self, call: &Call, request: admin::GetTaskRequest) -> Result<admin::Resource, PluginError> {
        let deadline = api::deadline(call, self.settings.api.get_timeout.0);
        let meta = Meta::decode(&request.resource_meta).map_err(PluginError::InvalidArgument)?;
        self.settings.check_allowed(&meta.databricks_instance).map_err(PluginError::InvalidArgument)?;
        let auth = Self::auth_of(&meta)?;
        let mut url = self.url(&meta.databricks_instance, "api/2.1/jobs/runs/get")?;
        url.query_pairs_mut().append_pair("run_id", &meta.run_id);
        let answer = self
            .send(&meta.databricks_instance, &auth, deadline, |t| {
                Request::get("runs/get", url.clone()).bearer(t).accept_status(400).accept_status(404)
            })
            .await?;
        if answer.status != 200 {
            // A run the workspace does not know will never finish: the task failed.
            return match run_unknown(&answer) {
                Some(said) => Ok(resource::with_phase(
                    flotilla_sdk::proto::core::task_execution::Phase::Failed,
                    format!("Databricks does not know run {}: {said}", meta.run_id),
                )),
                None => Err(refused(&answer, "runs/get")),
            };
        }
        let run = &answer.body;
        let phase = state::phase_of(run).ok_or_else(|| {
            ApiError::malformed(
                API,
                "runs/get",
                format!("no state for run {}: {}", meta.run_id, api::excerpt(run.to_string().as_bytes())),
            )
        })?;
        tracing::debug!(request_id = call.request_id.as_deref().unwrap_or("-"), run_id = %meta.run_id, phase = ?phase.phase, "Polled a Databricks run");
        let mut resource = resource::with_phase(phase.phase, phase.message);
        let job_id = match run.get("job_id") {
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        // Upstream's link when the run names its job; else the run's own page, as
        // Databricks gives it (an https URL only: it reaches the Flyte console).
        let uri = job_id.map(|job_id| console_url(&meta.databricks_instance, &job_id, &meta.run_id)).or_else(
            || {
                run.get("run_page_url")
                    .and_then(Value::as_str)
                    .filter(|u| u.starts_with("https://"))
                    .map(str::to_owned)
            },
        );
        if let Some(uri) = uri {
            resource.log_links.push(template::log_link(LOG_LINK_NAME, uri));
        }
        Ok(resource)
    }

    async fn delete(&self, call: &Call, request: admin::DeleteTaskRequest) -> Result<(), PluginError> {
        let deadline = api::deadline(call, self.settings.api.delete_timeout.0);
        let meta = Meta::decode(&request.resource_meta).map_err(PluginError::InvalidArgument)?;
        self.settings.check_allowed(&meta.databricks_instance).map_err(PluginError::InvalidArgument)?;
        let auth = Self::auth_of(&meta)?;
        let url = self.url(&meta.databricks_instance, "api/2.1/jobs/runs/cancel")?;
        let run_id: u64 = meta.run_id.parse().map_err(|_| {
            PluginError::InvalidArgument("resource_meta.run_id is not a decimal run id".to_owned())
        })?;
        // Cancelling is idempotent on Databricks' side; a run that no longer exists is cancelled enough.
        let request = |t: &Secret| {
            Request::post_json("runs/cancel", url.clone(), json!({ "run_id": run_id }))
                .bearer(t)
                .accept_status(400)
                .accept_status(404)
        };
        let answer = self.send(&meta.databricks_instance, &auth, deadline, request).await?;
        // As at get: only Databricks' answer about the run says it is gone; a 404 from a wrong
        // host or path (ENDPOINT_NOT_FOUND) has cancelled nothing.
        if matches!(answer.status, 400 | 404) && run_unknown(&answer).is_none() {
            return Err(refused(&answer, "runs/cancel"));
        }
        tracing::info!(request_id = call.request_id.as_deref().unwrap_or("-"), run_id = %meta.run_id, status = answer.status, "Cancelled a Databricks run");
        Ok(())
    }
}
