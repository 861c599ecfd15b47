//! The BigQuery plugin: task type `bigquery_query_job_task` v0, a drop-in for flytekit's
//! BigQuery agent (`flytekitplugins-bigquery`), on the BigQuery v2 REST jobs API.
//!
//! - create: `jobs.insert` of a query job: `sql.statement`, named query parameters built from the
//!   inputs, and the template's `custom` job-config keys (`destinationTable`, `writeDisposition`,
//!   `priority`, …, which upstream's agent drops), in `custom.ProjectID` / `custom.Location`.
//!   The job id is ours, so a retried insert cannot start a second job (409 means it exists).
//! - get: `jobs.get`; PENDING → INITIALIZING, RUNNING → RUNNING, DONE → SUCCEEDED with the
//!   `results` dataset `bq://project:dataset.table`, or FAILED with BigQuery's `errorResult`
//!   (RETRYABLE_FAILED when BigQuery calls it a backend or internal error); the BigQuery console
//!   link on every answer.
//! - delete: `jobs.cancel`; a job that no longer exists counts as cancelled.
//!
//! `resource_meta` is upstream's JSON `{"job_id", "project", "location"}`, so tasks created by
//! upstream's agent can be polled here after a switch.

mod auth;
mod job;

use std::{path::PathBuf, time::Instant};

use flotilla_cloud::api::{self, Api, ApiError, ApiSettings, Request, Response};
use flotilla_sdk::{
    AgentSpec, Call, Plugin, PluginError, ServiceConfig,
    proto::{admin, core::task_execution::Phase},
    resource,
    telemetry::config::{self, Env},
};
use reqwest::Url;
use serde::Deserialize;

pub use job::{JobMeta, TASK_TYPE};

/// Environment variable overriding `base_url`.
pub const ENV_BASE_URL: &str = "FLOTILLA_BIGQUERY_BASE_URL";
/// Environment variable naming the credentials file, ahead of `credentials_file` and
/// `GOOGLE_APPLICATION_CREDENTIALS`.
pub const ENV_CREDENTIALS_FILE: &str = "FLOTILLA_BIGQUERY_CREDENTIALS_FILE";
/// Environment variable overriding `metadata_url`.
pub const ENV_METADATA_URL: &str = "FLOTILLA_BIGQUERY_METADATA_URL";
/// The variable Google's client libraries read the key file's path from.
pub const GOOGLE_APPLICATION_CREDENTIALS: &str = "GOOGLE_APPLICATION_CREDENTIALS";
/// The project to bill quota to, ahead of the credentials file's `quota_project_id` (as
/// Google's client libraries read it).
pub const GOOGLE_CLOUD_QUOTA_PROJECT: &str = "GOOGLE_CLOUD_QUOTA_PROJECT";
/// gcloud's configuration directory when not `~/.config/gcloud`; its
/// `application_default_credentials.json` is gcloud's credentials file.
pub const CLOUDSDK_CONFIG: &str = "CLOUDSDK_CONFIG";
/// The file `gcloud auth application-default login` writes, in gcloud's configuration directory.
const GCLOUD_CREDENTIALS: &str = "application_default_credentials.json";

/// The `[plugin]` table of `flotilla-bigquery`'s configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BigQueryConfig {
    /// The BigQuery API root (regional endpoints, proxies, fakes).
    pub base_url: String,
    /// A credentials file (a service-account key, or a user's credentials); default:
    /// `$GOOGLE_APPLICATION_CREDENTIALS`, else gcloud's, when there is one.
    pub credentials_file: Option<PathBuf>,
    /// The metadata server, used when there is no credentials file.
    pub metadata_url: String,
    /// HTTP timeouts and per-operation budgets.
    pub http: ApiSettings,
}

impl Default for BigQueryConfig {
    fn default() -> Self {
        Self {
            base_url: "https://bigquery.googleapis.com/".to_owned(),
            credentials_file: None,
            metadata_url: "http://metadata.google.internal/".to_owned(),
            http: ApiSettings::default(),
        }
    }
}

/// The location in BigQuery's "Already Exists: Job project:location.job_id" message.
fn location_in_message(message: &str, job_id: &str) -> Option<String> {
    let job = message.split_whitespace().find(|w| w.ends_with(&format!(".{job_id}")))?;
    let (_, rest) = job.rsplit_once(':')?;
    let location = rest.strip_suffix(job_id)?.strip_suffix('.')?;
    (!location.is_empty()).then(|| location.to_owned())
}

/// Where gcloud keeps its credentials file: `$CLOUDSDK_CONFIG`, else
/// `$HOME/.config/gcloud` (gcloud's own rule on Linux and macOS).
fn gcloud_credentials(env: Env<'_>) -> Option<PathBuf> {
    let dir = match env(CLOUDSDK_CONFIG).filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env("HOME").filter(|h| !h.is_empty())?).join(".config").join("gcloud"),
    };
    Some(dir.join(GCLOUD_CREDENTIALS))
}

/// The BigQuery plugin.
pub struct BigQuery {
    api: Api,
    base: Url,
    credentials: auth::Credentials,
}

impl std::fmt::Debug for BigQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BigQuery")
            .field("base", &self.base.as_str())
            .field("credentials", self.credentials.source())
            .finish()
    }
}

impl BigQuery {
    /// Builds the plugin from the service configuration's `[plugin]` table and the process
    /// environment.
    ///
    /// # Errors
    /// Every problem with the settings, each naming its key or variable.
    pub fn from_config(config: &ServiceConfig) -> Result<Self, String> {
        Self::from_config_with_env(config, &config::process_env)
    }

    /// As [`BigQuery::from_config`], with the environment given (for tests).
    ///
    /// # Errors
    /// Every problem with the settings, each naming its key or variable.
    pub fn from_config_with_env(config: &ServiceConfig, env: Env<'_>) -> Result<Self, String> {
        let mut c: BigQueryConfig = config.plugin.clone().try_into().map_err(|e| format!("[plugin]: {e}"))?;
        let mut problems = Vec::new();
        config::override_from_env(env, ENV_BASE_URL, &mut c.base_url, &mut problems);
        config::override_from_env(env, ENV_METADATA_URL, &mut c.metadata_url, &mut problems);
        c.http.override_from_env(env, "FLOTILLA_BIGQUERY_", &mut problems);
        // The order: our own variable, the config file, then as Google's client libraries
        // look: GOOGLE_APPLICATION_CREDENTIALS, gcloud's file when it exists, the metadata server.
        let mut named_by = "[plugin] credentials_file";
        let gcloud = gcloud_credentials(env);
        if let Some(path) = env(ENV_CREDENTIALS_FILE).filter(|p| !p.is_empty()) {
            c.credentials_file = Some(path.into());
            named_by = ENV_CREDENTIALS_FILE;
        } else if c.credentials_file.is_none() {
            c.credentials_file =
                env(GOOGLE_APPLICATION_CREDENTIALS).filter(|p| !p.is_empty()).map(PathBuf::from);
            named_by = GOOGLE_APPLICATION_CREDENTIALS;
            if c.credentials_file.is_none() {
                c.credentials_file = gcloud.clone().filter(|p| p.is_file());
                named_by = "gcloud's application default credentials";
            }
        }
        let quota_project = env(GOOGLE_CLOUD_QUOTA_PROJECT).filter(|p| !p.is_empty());
        if quota_project.as_deref().is_some_and(|p| reqwest::header::HeaderValue::from_str(p).is_err()) {
            problems.push(format!(
                "{GOOGLE_CLOUD_QUOTA_PROJECT}: not a project id (it holds characters no header can carry)"
            ));
        }
        problems.extend(c.http.problems().into_iter().map(|p| format!("[plugin.http] {p}")));
        let base = api::parse_base_url(&c.base_url).map_err(|e| problems.push(format!("base_url: {e}"))).ok();
        let metadata = api::parse_base_url(&c.metadata_url)
            .map_err(|e| problems.push(format!("metadata_url: {e}")))
            .ok();
        let (Some(base), Some(metadata), true) = (base, metadata, problems.is_empty()) else {
            return Err(problems.join("; "));
        };
        let source = match c.credentials_file {
            Some(path) => auth::Source::File { path, named_by },
            None => auth::Source::Metadata { url: metadata, gcloud },
        };
        let api = Api::new("BigQuery", &c.http)?;
        let token_api = Api::new("Google OAuth", &c.http)?;
        Ok(Self { api, base, credentials: auth::Credentials::new(source, token_api, quota_project) })
    }

    /// `<base>bigquery/v2/projects/<project>/jobs[/<job_id>[/cancel]]`, each segment escaped.
    fn jobs_url(&self, project: &str, rest: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("base URLs are http(s), which have paths")
            .pop_if_empty()
            .extend(["bigquery", "v2", "projects", project, "jobs"])
            .extend(rest);
        url
    }

    /// Sends `request` with a token; when the token is refused, once more with a fresh one.
    async fn send(&self, request: Request, deadline: Instant) -> Result<Response, PluginError> {
        let authorized = |request: Request, token: auth::Token| {
            let request = request.bearer(&token.bearer);
            match token.quota_project {
                Some(project) => request.header("x-goog-user-project", &project),
                None => request,
            }
        };
        let token = self.credentials.token(deadline).await?;
        match self.api.send(authorized(request.clone(), token), deadline).await {
            Err(e) if e.status() == Some(401) => {
                self.credentials.invalidate().await;
                let token = self.credentials.token(deadline).await?;
                Ok(self.api.send(authorized(request, token), deadline).await?)
            }
            other => Ok(other?),
        }
    }
}

impl Plugin for BigQuery {
    fn agents(&self) -> Vec<AgentSpec> {
        vec![AgentSpec::asynchronous("Bigquery Connector", TASK_TYPE)]
    }

    fn settings(&self) -> Vec<(&'static str, String)> {
        let mut s =
            vec![("base_url", self.base.to_string()), ("credentials", self.credentials.source().to_string())];
        s.extend(self.api.settings().describe());
        s
    }

    async fn create(
        &self,
        call: &Call,
        request: admin::CreateTaskRequest,
    ) -> Result<admin::CreateTaskResponse, PluginError> {
        let deadline = api::deadline(call, self.api.settings().create_timeout.0);
        let template = request
            .template
            .as_ref()
            .ok_or_else(|| PluginError::InvalidArgument("CreateTaskRequest.template is missing".into()))?;
        let job = job::QueryJob::from_template(template, request.inputs.as_ref())?;
        let url = self.jobs_url(&job.project, &[]);
        // Our job id makes the insert idempotent: a repeat answers 409 for the same job.
        let answer = self
            .send(Request::post_json("jobs.insert", url, job.body()).accept_status(409), deadline)
            .await?;
        // A repeat's 409 carries no jobReference, but its message names the job as
        // "project:location.job_id": without the location, a regional job would read
        // as "Not found" on every poll.
        let location = answer.body["jobReference"]["location"].as_str().map(str::to_owned).or_else(|| {
            (answer.status == 409)
                .then(|| location_in_message(&answer.error_message(), &job.job_id))
                .flatten()
        });
        let meta = JobMeta {
            job_id: job.job_id,
            project: job.project,
            location: location.or(job.location).unwrap_or_default(),
        };
        tracing::info!(request_id = call.request_id.as_deref().unwrap_or("-"), job_id = %meta.job_id, project = %meta.project, "BigQuery job inserted");
        Ok(admin::CreateTaskResponse { resource_meta: meta.encode() })
    }

    async fn get(&self, call: &Call, request: admin::GetTaskRequest) -> Result<admin::Resource, PluginError> {
        let deadline = api::deadline(call, self.api.settings().get_timeout.0);
        let meta = JobMeta::decode(&request.resource_meta)?;
        let url = self.location_query(self.jobs_url(&meta.project, &[&meta.job_id]), &meta);
        let link = meta.console_link();
        let answer = self.send(Request::get("jobs.get", url).accept_status(404), deadline).await?;
        if answer.status == 404 {
            if !job_gone(&answer) {
                return Err(ApiError::refusal("BigQuery", "jobs.get", &answer).into());
            }
            let message = answer.error_message();
            let mut r = resource::failed(format!("BigQuery job {} no longer exists: {message}", meta.job_id));
            r.log_links.push(link);
            return Ok(r);
        }
        let mut r = job::to_resource(&answer.body)
            .map_err(|detail| PluginError::from(ApiError::malformed("BigQuery", "jobs.get", detail)))?;
        if r.phase != Phase::Succeeded as i32 {
            r.outputs = None;
        }
        r.log_links.push(link);
        Ok(r)
    }

    async fn delete(&self, call: &Call, request: admin::DeleteTaskRequest) -> Result<(), PluginError> {
        let deadline = api::deadline(call, self.api.settings().delete_timeout.0);
        let meta = JobMeta::decode(&request.resource_meta)?;
        let url = self.location_query(self.jobs_url(&meta.project, &[&meta.job_id, "cancel"]), &meta);
        // Cancelling a job that is gone (or done) is not an error: delete must be idempotent.
        let answer = self.send(Request::post_empty("jobs.cancel", url).accept_status(404), deadline).await?;
        if answer.status == 404 && !job_gone(&answer) {
            return Err(ApiError::refusal("BigQuery", "jobs.cancel", &answer).into());
        }
        Ok(())
    }
}

/// Whether a 404 is BigQuery's own answer about the job (reason notFound, "Not found: Job
/// p:l.j"). A 404 from a wrong base URL, an unknown path or a proxy is an error to fix, not a
/// verdict on the task: neither a failed task at get nor a cancelled one at delete.
fn job_gone(answer: &api::Response) -> bool {
    api::google_reason_is(&answer.body, "notFound") && answer.error_message().contains("Not found: Job")
}

impl BigQuery {
    fn location_query(&self, mut url: Url, meta: &JobMeta) -> Url {
        if !meta.location.is_empty() {
            url.query_pairs_mut().append_pair("location", &meta.location);
        }
        url
    }
}

#[cfg(test)]
mod tests {
    use super::location_in_message;

    #[test]
    fn a_repeated_inserts_409_names_the_jobs_location() {
        let job = "flotilla_3f2a";
        let said = |m: &str| location_in_message(m, job);
        assert_eq!(
            said("Already Exists: Job my-project:europe-west2.flotilla_3f2a").as_deref(),
            Some("europe-west2")
        );
        // Domain-scoped projects have a colon of their own.
        assert_eq!(
            said("Already Exists: Job example.com:my-project:US.flotilla_3f2a").as_deref(),
            Some("US")
        );
        assert_eq!(said("Already Exists: Job my-project:US.flotilla_other"), None);
        assert_eq!(said("Already Exists: Job my-project.flotilla_3f2a"), None);
        assert_eq!(said("Already Exists: Job my-project:.flotilla_3f2a"), None);
        assert_eq!(said(""), None);
    }
}
