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
//! auth_type = "pat"         # or "oauth_m2m" (FLYTE_DATABRICKS_AUTH_TYPE); a task's databricksAuthType wins
//! client_id = "…"           # OAuth service principal (DATABRICKS_CLIENT_ID); its secret is the
//!                           # secret DATABRICKS_CLIENT_SECRET
//!
//! [plugin.http]             # flotilla_cloud::api::ApiSettings, as every cloud service
//! get_timeout = "2.5s"      # FLOTILLA_DATABRICKS_GET_TIMEOUT; also create_timeout,
//! create_timeout = "8s"     # delete_timeout, attempt_timeout, connect_timeout,
//!                           # backoff_initial, backoff_max
//! ```

use flotilla_cloud::api::{ApiSettings, parse_base_url};
use flotilla_sdk::telemetry::config::Env;
use reqwest::Url;
use serde::Deserialize;

/// Overrides `base_url`.
pub const ENV_BASE_URL: &str = "FLOTILLA_DATABRICKS_BASE_URL";
/// Prefix of the [`ApiSettings`] overrides (`FLOTILLA_DATABRICKS_GET_TIMEOUT`, ...).
pub const ENV_PREFIX: &str = "FLOTILLA_DATABRICKS_";
/// Upstream's variable naming the workspace when a task names none.
pub const ENV_INSTANCE: &str = "FLYTE_DATABRICKS_INSTANCE";
/// Upstream's variable naming the service credential provider of serverless runs.
pub const ENV_CREDENTIAL_PROVIDER: &str = "FLYTE_DATABRICKS_SERVICE_CREDENTIAL_PROVIDER";
/// Upstream's variable choosing the authentication (`pat`, `oauth_m2m`, `oidc_federation`).
pub const ENV_AUTH_TYPE: &str = "FLYTE_DATABRICKS_AUTH_TYPE";
/// Upstream's variable naming the OAuth service principal.
pub const ENV_CLIENT_ID: &str = "DATABRICKS_CLIENT_ID";
/// The authentication types upstream knows.
pub const AUTH_TYPES: [&str; 3] = ["pat", "oauth_m2m", "oidc_federation"];

/// The service's own keys of the `[plugin]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabricksConfig {
    base_url: Option<String>,
    instance: Option<String>,
    allowed_instances: Option<Vec<String>>,
    service_credential_provider: Option<String>,
    auth_type: Option<String>,
    client_id: Option<String>,
    #[serde(default)]
    http: ApiSettings,
}

/// Validated settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Where the API is called: `https://{instance}` unless overridden; `{instance}` is substituted.
    pub base_url: Option<String>,
    /// The workspace used when a task names none.
    pub instance: Option<String>,
    /// When non-empty, the only workspaces tasks may name (the token is sent to the workspace).
    pub allowed_instances: Vec<String>,
    /// `--flyte-credential-provider` for serverless runs whose task names none.
    pub service_credential_provider: Option<String>,
    /// The service's authentication when a task names none (`pat` when unset).
    pub auth_type: Option<String>,
    /// The OAuth service principal when a task names none.
    pub client_id: Option<String>,
    /// HTTP client settings and the budgets of CreateTask, GetTask and DeleteTask (`[plugin.http]`).
    pub api: ApiSettings,
}

impl Settings {
    /// Reads the `[plugin]` table, then the environment through `env`.
    ///
    /// # Errors
    /// Every problem, each naming its key or variable.
    pub fn load(table: &toml::Table, env: Env<'_>) -> Result<Self, String> {
        let c: DatabricksConfig = table.clone().try_into().map_err(|e| format!("[plugin]: {e}"))?;
        let mut api = c.http;
        let mut problems = Vec::new();
        api.override_from_env(env, ENV_PREFIX, &mut problems);
        problems.extend(api.problems());

        let base_url = env(ENV_BASE_URL)
            .or(c.base_url)
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty());
        if let Some(u) = &base_url
            && let Err(e) = parse_base_url(&u.replace("{instance}", "example.cloud.databricks.com"))
        {
            problems.push(format!("base_url ({ENV_BASE_URL}): {e}"));
        }
        let instance = match env(ENV_INSTANCE).or(c.instance).map(|i| normalize_instance(&i)).transpose() {
            Ok(i) => i.filter(|i| !i.is_empty()),
            Err(e) => {
                problems.push(format!("instance ({ENV_INSTANCE}): {e}"));
                None
            }
        };
        let mut allowed_instances = Vec::new();
        for (n, i) in c.allowed_instances.unwrap_or_default().iter().enumerate() {
            match normalize_instance(i) {
                Ok(i) if !i.is_empty() => allowed_instances.push(i),
                Ok(_) => problems.push(format!("allowed_instances[{n}]: empty")),
                Err(e) => problems.push(format!("allowed_instances[{n}]: {e}")),
            }
        }
        let service_credential_provider =
            env(ENV_CREDENTIAL_PROVIDER).or(c.service_credential_provider).filter(|p| !p.is_empty());
        let auth_type = env(ENV_AUTH_TYPE).or(c.auth_type).filter(|a| !a.is_empty());
        if let Some(a) = &auth_type
            && !AUTH_TYPES.contains(&a.as_str())
        {
            problems
                .push(format!("auth_type ({ENV_AUTH_TYPE}): {a:?} is not one of {}", AUTH_TYPES.join(", ")));
        }
        let client_id = env(ENV_CLIENT_ID).or(c.client_id).filter(|c| !c.is_empty());
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Self {
            base_url,
            instance,
            allowed_instances,
            service_credential_provider,
            auth_type,
            client_id,
            api,
        })
    }

    /// The API root for `instance`, ending in `/`.
    ///
    /// # Errors
    /// When `base_url` with the instance substituted is not a URL.
    pub fn api_root(&self, instance: &str) -> Result<Url, String> {
        match &self.base_url {
            Some(base) => parse_base_url(&base.replace("{instance}", instance)),
            None => parse_base_url(&format!("https://{instance}")),
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
    use std::{collections::HashMap, time::Duration};

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
        assert!(s.api.get_timeout.0 < Duration::from_secs(3));
        assert_eq!(s.api_root("h.cloud.databricks.com").unwrap().as_str(), "https://h.cloud.databricks.com/");
    }

    #[test]
    fn file_then_environment() {
        let s = load(
            "base_url = \"http://127.0.0.1:1/\"\ninstance = \"file\"\n\
             allowed_instances = [\"https://a.b/\"]\nservice_credential_provider = \"p\"\n\
             [http]\nget_timeout = \"1s\"\ncreate_timeout = \"2s\"",
            &[
                ("FLOTILLA_DATABRICKS_GET_TIMEOUT", "700ms"),
                (ENV_INSTANCE, "https://env.cloud.databricks.com/"),
            ],
        )
        .unwrap();
        assert_eq!(s.base_url.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(s.instance.as_deref(), Some("env.cloud.databricks.com"));
        assert_eq!(s.api.get_timeout.0, Duration::from_millis(700));
        assert_eq!(s.api.create_timeout.0, Duration::from_secs(2));
        assert_eq!(s.allowed_instances, vec!["a.b".to_owned()]);
        assert_eq!(s.service_credential_provider.as_deref(), Some("p"));
        let s =
            load("", &[(ENV_BASE_URL, "https://proxy/{instance}"), (ENV_CREDENTIAL_PROVIDER, "q")]).unwrap();
        assert_eq!(s.api_root("w.x").unwrap().as_str(), "https://proxy/w.x/");
        assert_eq!(s.service_credential_provider.as_deref(), Some("q"));
    }

    #[test]
    fn problems_are_named() {
        let e = load(
            "base_url = \"ftp://x\"\n[http]\nget_timeout = \"0s\"",
            &[("FLOTILLA_DATABRICKS_DELETE_TIMEOUT", "soon")],
        )
        .unwrap_err();
        assert!(e.contains("base_url") && e.contains("get_timeout") && e.contains("DELETE_TIMEOUT"), "{e}");
        assert!(load("nope = 1", &[]).unwrap_err().contains("nope"));
        assert!(load("", &[(ENV_INSTANCE, "evil.com/x?y")]).unwrap_err().contains(ENV_INSTANCE));
        assert!(load("", &[(ENV_AUTH_TYPE, "kerberos")]).unwrap_err().contains("kerberos"));
        let s = load("auth_type = \"pat\"", &[(ENV_AUTH_TYPE, "oauth_m2m"), (ENV_CLIENT_ID, "sp")]).unwrap();
        assert_eq!((s.auth_type.as_deref(), s.client_id.as_deref()), (Some("oauth_m2m"), Some("sp")));
    }

    #[test]
    fn allowed_instances_restrict_tasks() {
        let s = load("allowed_instances = [\"a.b\"]", &[]).unwrap();
        assert!(s.check_allowed("a.b").is_ok());
        assert!(s.check_allowed("evil.com").unwrap_err().contains("evil.com"));
        assert!(Settings::default().check_allowed("any").is_ok());
    }
}
