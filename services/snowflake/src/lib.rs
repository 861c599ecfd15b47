//! The Snowflake plugin: task type `snowflake`, a drop-in replacement for flytekit's Snowflake
//! agent/connector (PROTOCOL.md §4.3), on the Snowflake SQL API v2 instead of the Python
//! connector.
//!
//! - create: `POST /api/v2/statements?requestId=…&async=true&retry=true` with the template's
//!   `sql.statement` (placeholders rewritten as bindings: [`sql`]), and the `database`,
//!   `schema`, `warehouse` (and optional `role`) from `TaskTemplate.config`. The request id is
//!   derived from the task execution, so a repeated CreateTask for the same attempt finds the
//!   statement it already started instead of running it twice.
//! - get: `GET /api/v2/statements/{query_id}`, mapped by [`status`]; on success with a
//!   declared output, `results` is the structured dataset `snowflake://user:account/warehouse/
//!   database/schema/query_id`, as upstream. Every answer carries upstream's log link.
//! - delete: `POST /api/v2/statements/{query_id}/cancel`; a statement that is already finished
//!   or unknown counts as canceled.
//!
//! Authentication is key-pair JWT (RS256, `iss = ACCOUNT.USER.SHA256:<fingerprint>`, `sub =
//! ACCOUNT.USER`, one hour at most) signed with the PEM private key upstream operators mount as
//! the secret `snowflake_private_key` (`_FSEC_SNOWFLAKE_PRIVATE_KEY`, or the file
//! `/etc/secrets/snowflake_private_key`). The key is read on every call, so a rotated secret
//! takes effect without a restart, and a service without it still starts and advertises
//! `snowflake`; calls then answer `FAILED_PRECONDITION` naming the secret and where it is read.

pub mod meta;
pub mod sql;
pub mod status;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_cloud::{
    api::{self, Api, ApiError, ApiSettings},
    jwt::RsaKey,
    secret::{Secret, SecretStore},
    template::{self, Native},
};
use flotilla_sdk::{
    AgentSpec, Call, Plugin, PluginError, ServiceConfig,
    proto::{admin, core},
    telemetry::config::Env,
};
use prost::Message as _;
use serde_json::{Value, json};
use url::Url;

use crate::{
    meta::{Connection, LOG_NAME, Meta},
    sql::Input,
};

/// The task type.
pub const TASK_TYPE: &str = "snowflake";
/// The agent's name in `ListAgents`, as upstream's connector.
pub const AGENT_NAME: &str = "Snowflake Connector";
/// The secret holding the PEM private key, under the name upstream operators mount it.
pub const PRIVATE_KEY_SECRET: &str = "snowflake_private_key";
/// Prefix of this service's environment overrides.
pub const ENV_PREFIX: &str = "FLOTILLA_SNOWFLAKE_";
/// Overrides `[plugin] base_url`.
pub const ENV_BASE_URL: &str = "FLOTILLA_SNOWFLAKE_BASE_URL";
/// The API's name in errors, logs and metrics.
const API_NAME: &str = "Snowflake";
/// How long a JWT is valid (Snowflake accepts at most an hour).
const JWT_LIFETIME: Duration = Duration::from_secs(59 * 60);
/// Sent as `User-Agent`, which the SQL API requires.
const USER_AGENT: &str = concat!("flotilla-snowflake/", env!("CARGO_PKG_VERSION"));
/// Stands for the account in a `base_url` template.
const ACCOUNT_PLACEHOLDER: &str = "{account}";

/// The Snowflake plugin.
#[derive(Clone, Debug)]
pub struct Snowflake {
    api: Api,
    settings: ApiSettings,
    /// `None`: `https://<account>.snowflakecomputing.com`. May contain `{account}`.
    base_url: Option<String>,
    secrets: SecretStore,
}

impl Snowflake {
    /// A plugin calling `base_url` (or each account's own host when `None`) with `settings`,
    /// reading the private key from `secrets`.
    ///
    /// # Errors
    /// A bad base URL or settings.
    pub fn new(
        base_url: Option<String>,
        settings: ApiSettings,
        secrets: SecretStore,
    ) -> Result<Self, String> {
        let mut problems = settings.problems();
        if let Some(url) = &base_url
            && let Err(e) = api::parse_base_url(&url.replace(ACCOUNT_PLACEHOLDER, "account"))
        {
            problems.push(format!("base_url: {e}"));
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let api = Api::new(API_NAME, &settings)?;
        Ok(Self { api, settings, base_url, secrets })
    }

    /// Builds the plugin from the service configuration's `[plugin]` table (`base_url` and the
    /// shared API settings such as `get_timeout`) and `FLOTILLA_SNOWFLAKE_*` variables.
    ///
    /// # Errors
    /// Every unknown, mistyped or invalid setting.
    pub fn from_config(config: &ServiceConfig) -> Result<Self, String> {
        Self::from_parts(&config.plugin, &|name| std::env::var(name).ok(), SecretStore::from_process())
    }

    /// [`Self::from_config`] with the environment and secrets given, for tests.
    ///
    /// # Errors
    /// Every unknown, mistyped or invalid setting.
    pub fn from_parts(table: &toml::Table, env: Env<'_>, secrets: SecretStore) -> Result<Self, String> {
        let mut table = table.clone();
        let mut problems = Vec::new();
        let mut base_url = match table.remove("base_url") {
            None => None,
            Some(toml::Value::String(s)) => Some(s),
            Some(other) => {
                problems.push(format!("[plugin] base_url: expected a string, got {}", other.type_str()));
                None
            }
        };
        if let Some(url) = env(ENV_BASE_URL).filter(|u| !u.trim().is_empty()) {
            base_url = Some(url);
        }
        // `[plugin.http]`, as every cloud service documents its budgets; the same
        // keys straight under `[plugin]` are read too, as this service first took them.
        match table.remove("http") {
            None => {}
            Some(toml::Value::Table(http)) => {
                for (key, value) in http {
                    if table.contains_key(&key) {
                        problems.push(format!("[plugin] {key} and [plugin.http] {key}: set it in one place"));
                    }
                    table.insert(key, value);
                }
            }
            Some(other) => {
                problems.push(format!("[plugin] http: expected a table, got {}", other.type_str()))
            }
        }
        let mut settings: ApiSettings = match toml::Value::Table(table).try_into() {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("[plugin]: {e}"));
                ApiSettings::default()
            }
        };
        settings.override_from_env(env, ENV_PREFIX, &mut problems);
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Self::new(base_url.map(|u| u.trim().to_owned()), settings, secrets)
    }

    /// The API root for `connection`'s account.
    fn base(&self, connection: &Connection) -> Result<Url, PluginError> {
        let host_account = connection.host_account();
        let raw = match &self.base_url {
            Some(template) => template.replace(ACCOUNT_PLACEHOLDER, &host_account),
            None => format!("https://{host_account}.snowflakecomputing.com"),
        };
        api::parse_base_url(&raw).map_err(|e| {
            PluginError::InvalidArgument(format!(
                "the account {:?} makes no API URL: {e}",
                connection.account
            ))
        })
    }

    fn url(&self, connection: &Connection, path: &str) -> Result<Url, PluginError> {
        self.base(connection)?
            .join(path)
            .map_err(|e| PluginError::InvalidArgument(format!("bad Snowflake API path {path:?}: {e}")))
    }

    /// A fresh key-pair JWT for `connection`'s user, from the mounted private key.
    fn token(&self, connection: &Connection) -> Result<Secret, PluginError> {
        let pem = self
            .secrets
            .get(PRIVATE_KEY_SECRET)
            .map_err(|e| e.for_purpose("the PEM private key of the Snowflake user's key pair"))?;
        let key = RsaKey::from_pem(pem.expose()).map_err(|e| {
            PluginError::Unconfigured(format!("the secret `{PRIVATE_KEY_SECRET}` is not a usable key: {e}"))
        })?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let subject = connection.jwt_subject();
        let claims = json!({
            "iss": format!("{subject}.{}", key.public_key_fingerprint()),
            "sub": subject,
            "iat": now,
            "exp": now + JWT_LIFETIME.as_secs(),
        });
        Ok(Secret::new(key.sign_rs256(&claims)))
    }

    fn authorized(&self, request: api::Request, token: &Secret) -> api::Request {
        request
            .bearer(token)
            .header("x-snowflake-authorization-token-type", "KEYPAIR_JWT")
            .header("user-agent", USER_AGENT)
    }
}

/// The longest statement timeout the SQL API takes (`timeout`, in seconds: 7 days).
const MAX_STATEMENT_TIMEOUT_SECS: i64 = 7 * 24 * 3600;

/// The SQL API request id of a submit: a UUID derived from the task execution id (one per
/// attempt), the output prefix and the request body, so the same create repeated (by the
/// gateway, or by propeller after a lost answer) finds the statement it started, while a
/// different statement under the same attempt starts its own. Random when there is no
/// execution id.
pub fn request_id(
    metadata: Option<&admin::TaskExecutionMetadata>,
    output_prefix: &str,
    body: &Value,
) -> String {
    let seed = metadata.and_then(|m| m.task_execution_id.as_ref()).map(|id| {
        let mut bytes = b"flotilla-snowflake/2\n".to_vec();
        bytes.extend_from_slice(&id.encode_to_vec());
        bytes.push(b'\n');
        bytes.extend_from_slice(output_prefix.as_bytes());
        bytes.push(b'\n');
        bytes.extend_from_slice(body.to_string().as_bytes());
        bytes
    });
    let hex = match seed {
        Some(bytes) => {
            let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
            digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
        }
        None => template::random_id(),
    };
    // Version 4 and RFC 4122 variant bits, so it reads as an ordinary UUID.
    let mut chars: Vec<char> = hex.chars().take(32).collect();
    chars[12] = '4';
    chars[16] = ['8', '9', 'a', 'b'][chars[16].to_digit(16).unwrap_or(0) as usize % 4];
    let s: String = chars.into_iter().collect();
    format!("{}-{}-{}-{}-{}", &s[..8], &s[8..12], &s[12..16], &s[16..20], &s[20..32])
}

fn to_input(value: Native) -> Input {
    match value {
        Native::Int(i) => Input::Int(i),
        Native::Float(f) => Input::Float(f),
        Native::Str(s) => Input::Str(s),
        Native::Bool(b) => Input::Bool(b),
        Native::Datetime(t) => Input::Datetime(datetime_text(&t)),
        Native::Duration(d) => Input::Duration(duration_text(&d)),
        Native::List(items) => Input::List(items.into_iter().map(to_input).collect()),
        Native::Null => Input::Null,
    }
}

/// A datetime as the Python connector renders flytekit's (UTC) one:
/// `YYYY-MM-DD HH:MM:SS[.ffffff]+00:00`. The offset keeps TIMESTAMP_LTZ/TZ
/// comparisons in UTC whatever the session's time zone.
fn datetime_text(t: &prost_types::Timestamp) -> String {
    let text = template::format_datetime(t).replacen('T', " ", 1);
    let text = text.strip_suffix(".000000").unwrap_or(&text);
    format!("{text}+00:00")
}

/// A duration as the Python connector renders a `timedelta`: `HH:MM:SS[.ffffff]`, hours
/// unbounded, a negative one as Python normalises it (-1 s is `-1:59:59`).
fn duration_text(d: &prost_types::Duration) -> String {
    let micros = i128::from(d.seconds) * 1_000_000 + i128::from(d.nanos / 1000);
    let days = micros.div_euclid(86_400_000_000);
    let in_day = micros.rem_euclid(86_400_000_000);
    let (secs, fraction) = (in_day / 1_000_000, in_day % 1_000_000);
    let hours = secs / 3600 + days * 24;
    let (mins, secs) = (secs % 3600 / 60, secs % 60);
    if fraction == 0 {
        format!("{hours:02}:{mins:02}:{secs:02}")
    } else {
        format!("{hours:02}:{mins:02}:{secs:02}.{fraction:06}")
    }
}

/// The SQL API body for a template and its inputs.
///
/// # Errors
/// `INVALID_ARGUMENT` naming what is missing or wrong in the template or inputs.
pub fn statement_body(
    template: &core::TaskTemplate,
    connection: &Connection,
    inputs: Option<&core::LiteralMap>,
) -> Result<Value, PluginError> {
    let statement = template::sql_statement(template).ok_or_else(|| {
        PluginError::InvalidArgument(
            "the task template has no sql.statement: a Snowflake task needs its query there".to_owned(),
        )
    })?;
    let inputs: Vec<(String, Input)> = template::native_inputs(inputs)
        .map_err(PluginError::InvalidArgument)?
        .into_iter()
        .map(|(name, value)| (name, to_input(value)))
        .collect();
    let prepared = sql::prepare(statement, &inputs).map_err(|e| PluginError::InvalidArgument(e.0))?;
    let mut body = json!({
        "statement": prepared.statement,
        "database": api_identifier(&connection.database),
        "schema": api_identifier(&connection.schema),
        "warehouse": api_identifier(&connection.warehouse),
    });
    if let Some(role) = &connection.role {
        body["role"] = json!(api_identifier(role));
    }
    if let Some(bindings) = prepared.bindings_json() {
        body["bindings"] = bindings;
    }
    // Flyte does not cancel a webapi task that times out (flyte#2298); Snowflake's own
    // statement timeout does, so the task's timeout is passed on.
    if let Some(timeout) = template.metadata.as_ref().and_then(|m| m.timeout.as_ref()) {
        let secs = timeout.seconds + i64::from(timeout.nanos > 0);
        if secs > 0 {
            // The API takes at most 7 days; a longer Flyte timeout gets that maximum.
            body["timeout"] = json!(secs.min(MAX_STATEMENT_TIMEOUT_SECS));
        }
    }
    Ok(body)
}

/// A database, schema, warehouse or role name as the SQL API wants it. Its
/// fields are case-sensitive, matching the names `SHOW` prints, while the
/// names in a template are what a user would write in SQL (and what upstream's
/// Python connector passes as such): unquoted, Snowflake stores them in upper
/// case; quoted (`"My_DB"`), as written. Anything else is passed as given.
fn api_identifier(name: &str) -> String {
    if let Some(inner) = name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        return inner.replace("\"\"", "\"");
    }
    let mut chars = name.chars();
    let plain = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
    if plain { name.to_ascii_uppercase() } else { name.to_owned() }
}

fn has_outputs(template: &core::TaskTemplate) -> bool {
    template.interface.as_ref().and_then(|i| i.outputs.as_ref()).is_some_and(|o| !o.variables.is_empty())
}

fn handle_of(body: &Value) -> Option<String> {
    body.get("statementHandle").and_then(Value::as_str).filter(|h| !h.is_empty()).map(str::to_owned)
}

impl Plugin for Snowflake {
    fn agents(&self) -> Vec<AgentSpec> {
        vec![AgentSpec::asynchronous(AGENT_NAME, TASK_TYPE)]
    }

    fn settings(&self) -> Vec<(&'static str, String)> {
        let base = self
            .base_url
            .clone()
            .unwrap_or_else(|| format!("https://{ACCOUNT_PLACEHOLDER}.snowflakecomputing.com"));
        let mut s = vec![("base_url", base), ("secrets_dir", self.secrets.dir().display().to_string())];
        s.extend(self.settings.describe());
        s
    }

    async fn create(
        &self,
        call: &Call,
        request: admin::CreateTaskRequest,
    ) -> Result<admin::CreateTaskResponse, PluginError> {
        let deadline = api::deadline(call, self.settings.create_timeout.0);
        let template = request
            .template
            .as_ref()
            .ok_or_else(|| PluginError::InvalidArgument("CreateTask carries no task template".to_owned()))?;
        let connection = Connection::from_config(&template.config).map_err(PluginError::InvalidArgument)?;
        let body = statement_body(template, &connection, request.inputs.as_ref())?;
        let token = self.token(&connection)?;
        let id = request_id(request.task_execution_metadata.as_ref(), &request.output_prefix, &body);
        let mut url = self.url(&connection, "api/v2/statements")?;
        url.query_pairs_mut()
            .append_pair("requestId", &id)
            .append_pair("async", "true")
            .append_pair("retry", "true");
        // Safe to retry: Snowflake runs a statement once per requestId when retry=true.
        let submit = self
            .authorized(api::Request::post_json("submit statement", url, body), &token)
            .accept_status(422);
        let answer = self.api.send(submit, deadline).await.map_err(PluginError::from)?;
        let Some(query_id) = handle_of(&answer.body) else {
            if answer.status == 422 {
                let s = status::from_answer(422, &answer.body).expect("422 is a statement answer");
                return Err(PluginError::InvalidArgument(format!(
                    "Snowflake refused the statement: {}",
                    s.message
                )));
            }
            return Err(ApiError::malformed(
                API_NAME,
                "submit statement",
                "the answer has no statementHandle",
            )
            .into());
        };
        if !meta::is_query_id(&query_id) {
            return Err(ApiError::malformed(
                API_NAME,
                "submit statement",
                "the statementHandle is not a query id",
            )
            .into());
        }
        tracing::info!(request_id = call.request_id.as_deref().unwrap_or("-"), account = %connection.account, query_id = %query_id, snowflake_request_id = %id, "Submitted statement");
        let meta = Meta::new(&connection, query_id, has_outputs(template));
        Ok(admin::CreateTaskResponse { resource_meta: meta.encode() })
    }

    async fn get(&self, call: &Call, request: admin::GetTaskRequest) -> Result<admin::Resource, PluginError> {
        let deadline = api::deadline(call, self.settings.get_timeout.0);
        let meta = Meta::decode(&request.resource_meta).map_err(PluginError::InvalidArgument)?;
        let connection = meta.connection();
        let token = self.token(&connection)?;
        let url = self.url(&connection, &format!("api/v2/statements/{}", meta.query_id))?;
        let poll = self
            .authorized(api::Request::get("get statement status", url), &token)
            .accept_status(422)
            .accept_status(408)
            // 200 carries the first partition of the results, which may be
            // megabytes; the status alone says the statement succeeded.
            .ignore_body_of(200);
        let answer = self.api.send(poll, deadline).await.map_err(PluginError::from)?;
        let Some(status) = status::from_answer(answer.status, &answer.body) else {
            return Err(ApiError::malformed(
                API_NAME,
                "get statement status",
                format!("HTTP {} is not an answer the SQL API documents for a statement", answer.status),
            )
            .into());
        };
        tracing::debug!(request_id = call.request_id.as_deref().unwrap_or("-"), query_id = %meta.query_id, http_status = answer.status, phase = ?status.phase, "Statement status");
        let outputs =
            (status.phase == core::task_execution::Phase::Succeeded && meta.has_output).then(|| {
                template::structured_dataset_output(
                    &core::TaskTemplate::default(),
                    "results",
                    meta.results_uri(),
                )
            });
        Ok(admin::Resource {
            phase: status.phase as i32,
            message: status.message,
            outputs,
            log_links: vec![template::log_link(LOG_NAME, meta.log_uri())],
            ..Default::default()
        })
    }

    async fn delete(&self, call: &Call, request: admin::DeleteTaskRequest) -> Result<(), PluginError> {
        let deadline = api::deadline(call, self.settings.delete_timeout.0);
        let meta = Meta::decode(&request.resource_meta).map_err(PluginError::InvalidArgument)?;
        let connection = meta.connection();
        let token = self.token(&connection)?;
        let url = self.url(&connection, &format!("api/v2/statements/{}/cancel", meta.query_id))?;
        // Finished (422) or unknown (404) statements are as canceled as they will get.
        let cancel = self
            .authorized(api::Request::post_empty("cancel statement", url), &token)
            .accept_status(422)
            .accept_status(404);
        let answer = self.api.send(cancel, deadline).await.map_err(PluginError::from)?;
        tracing::info!(request_id = call.request_id.as_deref().unwrap_or("-"), query_id = %meta.query_id, http_status = answer.status, "Canceled statement");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
