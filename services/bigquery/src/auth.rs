//! Google access tokens for the BigQuery API, the two ways a BigQuery agent pod has them:
//!
//! - a service-account key file (`GOOGLE_APPLICATION_CREDENTIALS`, as Google's client libraries
//!   read it): a JWT signed with the key is exchanged at the key's `token_uri` for an access
//!   token (OAuth 2.0 JWT bearer grant, RFC 7523);
//! - otherwise the GCE/GKE metadata server (workload identity), which hands out tokens itself.
//!
//! Tokens are cached and fetched again five minutes before they expire, or at once after the
//! API refuses one. The key file is read at each fetch, so a rotated key is picked up without a
//! restart.

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use flotilla_cloud::{
    api::{self, Api, ApiError, Request},
    jwt::RsaKey,
    secret::Secret,
};
use flotilla_sdk::PluginError;
use reqwest::Url;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Mutex;

/// The scope BigQuery jobs need (Google's client libraries ask for cloud-platform too).
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Google's token endpoint, for key files that do not name one.
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// How long to wait for the metadata server before concluding there is none.
const METADATA_PATIENCE: Duration = Duration::from_secs(1);
/// Fetch a new token this long before the cached one expires.
const REFRESH_EARLY: Duration = Duration::from_secs(300);

/// Where tokens come from.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    /// A service-account key file.
    KeyFile(PathBuf),
    /// The metadata server at this base URL.
    Metadata(Url),
}

/// The fields of a service-account key file we use.
#[derive(Deserialize)]
struct KeyFile {
    client_email: String,
    private_key: String,
    #[serde(default)]
    token_uri: Option<String>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

struct Cached {
    token: Secret,
    refresh_at: Instant,
}

/// Access tokens from one [`Source`], cached.
pub(crate) struct Credentials {
    source: Source,
    api: Api,
    cached: Mutex<Option<Cached>>,
}

impl Credentials {
    pub(crate) fn new(source: Source, api: Api) -> Self {
        Self { source, api, cached: Mutex::new(None) }
    }

    pub(crate) fn source(&self) -> &Source {
        &self.source
    }

    /// A valid access token, fetched if the cached one is missing or near its end.
    pub(crate) async fn token(&self, deadline: Instant) -> Result<Secret, PluginError> {
        // Held across the fetch: concurrent calls wait for one fetch instead of each making one.
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(c.token.clone());
        }
        let (token, lifetime) = match &self.source {
            Source::KeyFile(path) => self.fetch_with_key_file(path, deadline).await?,
            Source::Metadata(base) => self.fetch_from_metadata(base, deadline).await?,
        };
        let refresh_at = Instant::now() + lifetime.saturating_sub(REFRESH_EARLY).max(Duration::from_secs(30));
        *cached = Some(Cached { token: token.clone(), refresh_at });
        Ok(token)
    }

    /// Forgets the cached token (after the API refused it).
    pub(crate) async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    async fn fetch_with_key_file(
        &self,
        path: &PathBuf,
        deadline: Instant,
    ) -> Result<(Secret, Duration), PluginError> {
        let where_ =
            format!("the service-account key file {} (GOOGLE_APPLICATION_CREDENTIALS)", path.display());
        let text = std::fs::read_to_string(path)
            .map_err(|e| PluginError::Unconfigured(format!("cannot read {where_}: {e}")))?;
        // Errors name fields and positions, never values: the file holds a private key.
        let not_a_key =
            |why: String| PluginError::Unconfigured(format!("{where_} is not a service-account key: {why}"));
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| not_a_key(api::describe_json_error(&e)))?;
        match json.get("type") {
            Some(serde_json::Value::String(kind)) if kind == "service_account" => {}
            Some(serde_json::Value::String(kind)) => {
                return Err(PluginError::Unconfigured(format!(
                    "{where_} has type `{kind}`; only `service_account` keys are supported (or leave it unset to use the metadata server)"
                )));
            }
            _ if json.is_string() => {
                return Err(not_a_key(
                    "it holds a JSON string, not an object (was the key encoded twice?)".into(),
                ));
            }
            _ => {
                return Err(not_a_key(
                    "it has no `type` (a service-account key says \"service_account\")".into(),
                ));
            }
        }
        let key: KeyFile =
            serde_json::from_value(json).map_err(|e| not_a_key(api::describe_json_error(&e)))?;
        let signer = RsaKey::from_pem(&key.private_key)
            .map_err(|e| PluginError::Unconfigured(format!("{where_}: private_key: {e}")))?;
        let token_uri = key.token_uri.unwrap_or_else(|| DEFAULT_TOKEN_URI.to_owned());
        let url: Url = token_uri
            .parse()
            .map_err(|e| PluginError::Unconfigured(format!("{where_}: token_uri `{token_uri}`: {e}")))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(PluginError::Unconfigured(format!(
                "{where_}: token_uri `{token_uri}` is not an http(s) URL"
            )));
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let assertion = signer.sign_rs256(&json!({
            "iss": key.client_email,
            "scope": SCOPE,
            "aud": token_uri,
            "iat": now,
            "exp": now + 3600,
        }));
        let form = vec![
            ("grant_type".to_owned(), "urn:ietf:params:oauth:grant-type:jwt-bearer".to_owned()),
            ("assertion".to_owned(), assertion),
        ];
        let answer = self
            .api
            .send(Request::post_form("token", url, form).secret_answer(), deadline)
            .await
            .map_err(token_error)?;
        parse_token(&self.api, answer.body)
    }

    async fn fetch_from_metadata(
        &self,
        base: &Url,
        deadline: Instant,
    ) -> Result<(Secret, Duration), PluginError> {
        let url = base
            .join("computeMetadata/v1/instance/service-accounts/default/token")
            .expect("a relative path joins any base URL");
        let request = Request::get("metadata token", url).header("metadata-flavor", "Google").secret_answer();
        // Off GCP there is no metadata server; say so quickly rather than retrying for the whole budget.
        let deadline = deadline.min(Instant::now() + METADATA_PATIENCE);
        let answer = self.api.send(request, deadline).await.map_err(|e| {
            PluginError::Unconfigured(format!(
                "no Google credentials: GOOGLE_APPLICATION_CREDENTIALS (or [plugin] credentials_file) names no \
                 service-account key file, and the metadata server at {base} did not give a token ({e})"
            ))
        })?;
        parse_token(&self.api, answer.body)
    }
}

fn parse_token(api: &Api, body: serde_json::Value) -> Result<(Secret, Duration), PluginError> {
    let answer: TokenAnswer = serde_json::from_value(body).map_err(|e| {
        PluginError::from(ApiError::malformed(
            api.name(),
            "token",
            format!("no access_token: {}", api::describe_json_error(&e)),
        ))
    })?;
    let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600)).min(api::MAX_TOKEN_LIFETIME);
    Ok((Secret::new(answer.access_token), lifetime))
}

fn token_error(e: ApiError) -> PluginError {
    match e.status() {
        // The token endpoint refusing our assertion is a credential problem on our side.
        Some(400 | 401 | 403) => {
            PluginError::Unconfigured(format!("the service-account key was refused: {e}"))
        }
        _ => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use flotilla_cloud::api::{Api, ApiSettings, MAX_TOKEN_LIFETIME};
    use serde_json::json;

    use super::parse_token;

    #[test]
    fn a_token_lifetime_past_any_clock_is_capped_not_a_panic() {
        let api = Api::new("BigQuery", &ApiSettings::default()).unwrap();
        let (_, lifetime) = parse_token(&api, json!({"access_token": "t", "expires_in": u64::MAX})).unwrap();
        assert_eq!(lifetime, MAX_TOKEN_LIFETIME);
        // What the cache then computes from it.
        let _ = std::time::Instant::now() + lifetime;
    }
}
