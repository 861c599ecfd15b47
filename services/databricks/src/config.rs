//! The service's settings: the `[plugin]` table of its config file, then
//! environment overrides (`FLOTILLA_DATABRICKS_*`, and upstream's
//! `FLYTE_DATABRICKS_INSTANCE` / `FLYTE_DATABRICKS_SERVICE_CREDENTIAL_PROVIDER`).
//!
//! ```toml
//! [plugin]
//! instance = "dbc-1234.cloud.databricks.com"   # when a task names none
//! base_url = "https://proxy.internal/{instance}"   # default https://{instance}
//! allowed_instances = ["dbc-1234.cloud.databricks.com"]   # default: any
//! service_credential_provider = "my-provider"   # serverless runs
//! create_budget = "2.5s"
//! get_budget = "2.5s"
//! delete_budget = "2.5s"
//! attempt_timeout = "2s"
//! ```

use std::time::Duration;

use flotilla_sdk::telemetry::config::{Env, HumanDuration, override_from_env};
use serde::Deserialize;

/// Overrides `base_url`.
pub const ENV_BASE_URL: &str = "FLOTILLA_DATABRICKS_BASE_URL";
/// Overrides `create_budget`.
pub const ENV_CREATE_BUDGET: &str = "FLOTILLA_DATABRICKS_CREATE_BUDGET";
/// Overrides `get_budget`.
pub const ENV_GET_BUDGET: &str = "FLOTILLA_DATABRICKS_GET_BUDGET";
/// Overrides `delete_budget`.
pub const ENV_DELETE_BUDGET: &str = "FLOTILLA_DATABRICKS_DELETE_BUDGET";
/// Overrides `attempt_timeout`.
pub const ENV_ATTEMPT_TIMEOUT: &str = "FLOTILLA_DATABRICKS_ATTEMPT_TIMEOUT";
/// Upstream's variable naming the workspace when a task names none.
pub const ENV_INSTANCE: &str = "FLYTE_DATABRICKS_INSTANCE";
/// Upstream's variable naming the service credential provider of serverless runs.
pub const ENV_CREDENTIAL_PROVIDER: &str = "FLYTE_DATABRICKS_SERVICE_CREDENTIAL_PROVIDER";

/// Default time a call may spend on the Databricks API, retries included:
/// within propeller's default 3 s deadline.
pub const DEFAULT_BUDGET: Duration = Duration::from_millis(2500);
/// Default bound of one HTTP attempt.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// The `[plugin]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabricksConfig {
    base_url: Option<String>,
    instance: Option<String>,
    allowed_instances: Option<Vec<String>>,
    service_credential_provider: Option<String>,
    create_budget: Option<HumanDuration>,
    get_budget: Option<HumanDuration>,
    delete_budget: Option<HumanDuration>,
    attempt_timeout: Option<HumanDuration>,
}

/// Validated settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Where the API is called: `https://{instance}` unless overridden; `{instance}` is substituted.
    pub base_url: Option<String>,
    /// The workspace used when a task names none.
    pub instance: Option<String>,
    /// When non-empty, the only workspaces tasks may name (the token is sent to the workspace).
    pub allowed_instances: Vec<String>,
    /// `--flyte-credential-provider` for serverless runs whose task names none.
    pub service_credential_provider: Option<String>,
    /// Budget of CreateTask's API calls.
    pub create_budget: Duration,
    /// Budget of GetTask's API calls.
    pub get_budget: Duration,
    /// Budget of DeleteTask's API calls.
    pub delete_budget: Duration,
    /// Bound of one HTTP attempt.
    pub attempt_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            base_url: None,
            instance: None,
            allowed_instances: Vec::new(),
            service_credential_provider: None,
            create_budget: DEFAULT_BUDGET,
            get_budget: DEFAULT_BUDGET,
            delete_budget: DEFAULT_BUDGET,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
        }
    }
}

impl Settings {
    /// Reads the `[plugin]` table, then the environment through `env`.
    ///
    /// # Errors
    /// Every problem, each naming its key or variable.
    pub fn load(table: &toml::Table, env: Env<'_>) -> Result<Self, String> {
        let c: DatabricksConfig = table.clone().try_into().map_err(|e| format!("[plugin]: {e}"))?;
        let mut problems = Vec::new();
        let d = Self::default();
        let mut base_url = c.base_url;
        let mut create = c.create_budget.unwrap_or(HumanDuration(d.create_budget));
        let mut get = c.get_budget.unwrap_or(HumanDuration(d.get_budget));
        let mut delete = c.delete_budget.unwrap_or(HumanDuration(d.delete_budget));
        let mut attempt = c.attempt_timeout.unwrap_or(HumanDuration(d.attempt_timeout));
        if let Some(v) = env(ENV_BASE_URL) {
            base_url = Some(v);
        }
        override_from_env(env, ENV_CREATE_BUDGET, &mut create, &mut problems);
        override_from_env(env, ENV_GET_BUDGET, &mut get, &mut problems);
        override_from_env(env, ENV_DELETE_BUDGET, &mut delete, &mut problems);
        override_from_env(env, ENV_ATTEMPT_TIMEOUT, &mut attempt, &mut problems);

        let base_url = base_url.map(|u| u.trim().trim_end_matches('/').to_owned()).filter(|u| !u.is_empty());
        if let Some(u) = &base_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            problems.push(format!("base_url: {u:?} must start with http:// or https://"));
        }
        let mut instance = c.instance;
        if let Some(v) = env(ENV_INSTANCE) {
            instance = Some(v);
        }
        let instance = match instance.map(|i| normalize_instance(&i)).transpose() {
            Ok(i) => i.filter(|i| !i.is_empty()),
            Err(e) => {
                problems.push(format!("instance ({ENV_INSTANCE}): {e}"));
                None
            }
        };
        let mut allowed_instances = Vec::new();
        for (n, i) in c.allowed_instances.unwrap_or_default().iter().enumerate() {
            match normalize_instance(i) {
                Ok(i) => allowed_instances.push(i),
                Err(e) => problems.push(format!("allowed_instances[{n}]: {e}")),
            }
        }
        let service_credential_provider =
            env(ENV_CREDENTIAL_PROVIDER).or(c.service_credential_provider).filter(|p| !p.is_empty());
        for (name, value) in [("create_budget", &create), ("get_budget", &get), ("delete_budget", &delete)] {
            if value.0.is_zero() {
                problems.push(format!("{name}: must be more than zero"));
            }
        }
        if attempt.0.is_zero() {
            problems.push("attempt_timeout: must be more than zero".to_owned());
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Self {
            base_url,
            instance,
            allowed_instances,
            service_credential_provider,
            create_budget: create.0,
            get_budget: get.0,
            delete_budget: delete.0,
            attempt_timeout: attempt.0,
        })
    }

    /// The API root for `instance` (no trailing slash).
    pub fn api_root(&self, instance: &str) -> String {
        match &self.base_url {
            Some(base) => base.replace("{instance}", instance),
            None => format!("https://{instance}"),
        }
    }

    /// Checks `instance` against `allowed_instances`.
    ///
    /// # Errors
    /// Names the instance and the allowed ones.
    pub fn check_allowed(&self, instance: &str) -> Result<(), String> {
        if self.allowed_instances.is_empty() || self.allowed_instances.iter().any(|a| a == instance) {
            Ok(())
        } else {
            Err(format!(
                "Databricks instance {instance:?} is not one this service may call (allowed_instances: {})",
                self.allowed_instances.join(", ")
            ))
        }
    }
}

/// A workspace host as upstream uses it (`host[:port]`): a leading `https://`
/// and trailing `/` are dropped; anything else that is not a host is refused.
///
/// # Errors
/// Says what is wrong with it.
pub fn normalize_instance(raw: &str) -> Result<String, String> {
    let s = raw.trim();
    let s = s.strip_prefix("https://").unwrap_or(s).trim_end_matches('/');
    if s.is_empty() {
        return Ok(String::new());
    }
    let ok = s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    if !ok {
        return Err(format!("{s:?} is not a host name (expected e.g. dbc-1234.cloud.databricks.com)"));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Settings, String> {
        let table: toml::Table = toml.parse().unwrap();
        let env: HashMap<String, String> = env.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        Settings::load(&table, &|k| env.get(k).cloned())
    }

    #[test]
    fn defaults_fit_propellers_deadline() {
        let s = load("", &[]).unwrap();
        assert_eq!(s, Settings::default());
        assert!(s.get_budget < Duration::from_secs(3));
        assert_eq!(s.api_root("h.cloud.databricks.com"), "https://h.cloud.databricks.com");
    }

    #[test]
    fn file_then_environment() {
        let s = load(
            "base_url = \"http://127.0.0.1:1/\"\ninstance = \"file\"\nget_budget = \"1s\"\n\
             allowed_instances = [\"https://a.b/\"]\nservice_credential_provider = \"p\"",
            &[(ENV_GET_BUDGET, "700ms"), (ENV_INSTANCE, "https://env.cloud.databricks.com/")],
        )
        .unwrap();
        assert_eq!(s.base_url.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(s.instance.as_deref(), Some("env.cloud.databricks.com"));
        assert_eq!(s.get_budget, Duration::from_millis(700));
        assert_eq!(s.allowed_instances, vec!["a.b".to_owned()]);
        assert_eq!(s.service_credential_provider.as_deref(), Some("p"));
        let s =
            load("", &[(ENV_BASE_URL, "https://proxy/{instance}"), (ENV_CREDENTIAL_PROVIDER, "q")]).unwrap();
        assert_eq!(s.api_root("w.x"), "https://proxy/w.x");
        assert_eq!(s.service_credential_provider.as_deref(), Some("q"));
    }

    #[test]
    fn problems_are_named() {
        let e =
            load("base_url = \"ftp://x\"\nget_budget = \"0s\"", &[(ENV_DELETE_BUDGET, "soon")]).unwrap_err();
        assert!(e.contains("base_url") && e.contains("get_budget") && e.contains(ENV_DELETE_BUDGET), "{e}");
        assert!(load("nope = 1", &[]).unwrap_err().contains("nope"));
        assert!(load("", &[(ENV_INSTANCE, "evil.com/x?y")]).unwrap_err().contains(ENV_INSTANCE));
    }

    #[test]
    fn allowed_instances_restrict_tasks() {
        let s = load("allowed_instances = [\"a.b\"]", &[]).unwrap();
        assert!(s.check_allowed("a.b").is_ok());
        assert!(s.check_allowed("evil.com").unwrap_err().contains("evil.com"));
        assert!(Settings::default().check_allowed("any").is_ok());
    }
}
