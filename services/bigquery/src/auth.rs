//! Google access tokens for the BigQuery API, from the credentials Google's client libraries
//! find by default (application default credentials), in their order:
//!
//! - a credentials file named by `GOOGLE_APPLICATION_CREDENTIALS` (or the plugin's settings),
//!   else gcloud's own (`gcloud auth application-default login` writes it), holding either
//!   - a service-account key: a JWT signed with the key is exchanged at the key's `token_uri`
//!     for an access token (OAuth 2.0 JWT bearer grant, RFC 7523), or
//!   - a user's credentials (`authorized_user`): the refresh token is exchanged for an access
//!     token (OAuth 2.0 refresh token grant, RFC 6749 section 6);
//! - otherwise the GCE/GKE metadata server (workload identity), which hands out tokens itself.
//!
//! Tokens are cached and fetched again five minutes before they expire, or at once after the
//! API refuses one. The file is read at each fetch, so a rotated key is picked up without a
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
    /// A credentials file, and what named it (for messages).
    File {
        /// The file.
        path: PathBuf,
        /// The setting or variable that named it, or gcloud's default location.
        named_by: &'static str,
    },
    /// The metadata server at this base URL; `gcloud` is where gcloud's file
    /// was looked for and not found (for the message when there is no server either).
    Metadata {
        /// The metadata server.
        url: Url,
        /// gcloud's file, not there.
        gcloud: Option<PathBuf>,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File { path, named_by } => {
                write!(f, "the credentials file {} ({named_by})", path.display())
            }
            Self::Metadata { url, .. } => write!(f, "the metadata server at {url}"),
        }
    }
}

/// The fields of a service-account key file we use.
#[derive(Deserialize)]
struct KeyFile {
    client_email: String,
    private_key: String,
    #[serde(default)]
    token_uri: Option<String>,
}

/// The fields of a user's credentials file (`"type": "authorized_user"`) we use.
#[derive(Deserialize)]
struct UserCredentials {
    client_id: String,
    client_secret: String,
    refresh_token: String,
    #[serde(default)]
    token_uri: Option<String>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// An access token, and the project the credentials file bills quota to
/// (`quota_project_id`; sent as `x-goog-user-project`, as Google's client
/// libraries do).
#[derive(Clone)]
pub(crate) struct Token {
    pub(crate) bearer: Secret,
    pub(crate) quota_project: Option<String>,
}

struct Cached {
    token: Token,
    refresh_at: Instant,
}

/// Access tokens from one [`Source`], cached.
pub(crate) struct Credentials {
    source: Source,
    api: Api,
    quota_project: Option<String>,
    cached: Mutex<Option<Cached>>,
}

impl Credentials {
    /// Tokens from `source`; `quota_project`, when given, is billed instead of
    /// the credentials file's (`GOOGLE_CLOUD_QUOTA_PROJECT`).
    pub(crate) fn new(source: Source, api: Api, quota_project: Option<String>) -> Self {
        Self { source, api, quota_project, cached: Mutex::new(None) }
    }

    pub(crate) fn source(&self) -> &Source {
        &self.source
    }

    /// A valid access token, fetched if the cached one is missing or near its end.
    pub(crate) async fn token(&self, deadline: Instant) -> Result<Token, PluginError> {
        // Held across the fetch: concurrent calls wait for one fetch instead of each making one.
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(c.token.clone());
        }
        let ((bearer, lifetime), quota_project) = match &self.source {
            Source::File { path, .. } => self.fetch_with_file(path, deadline).await?,
            Source::Metadata { url, gcloud } => {
                (self.fetch_from_metadata(url, gcloud.as_deref(), deadline).await?, None)
            }
        };
        let token = Token { bearer, quota_project: self.quota_project.clone().or(quota_project) };
        let refresh_at = Instant::now() + lifetime.saturating_sub(REFRESH_EARLY).max(Duration::from_secs(30));
        *cached = Some(Cached { token: token.clone(), refresh_at });
        Ok(token)
    }

    /// Forgets the cached token (after the API refused it).
    pub(crate) async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    /// A token from the credentials file at `path`, and the file's quota project.
    async fn fetch_with_file(
        &self,
        path: &PathBuf,
        deadline: Instant,
    ) -> Result<((Secret, Duration), Option<String>), PluginError> {
        let where_ = self.source.to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| PluginError::Unconfigured(format!("cannot read {where_}: {e}")))?;
        // Errors name fields and positions, never values: the file holds a private key or a
        // refresh token.
        let unusable = |why: String| {
            PluginError::Unconfigured(format!(
                "{where_} is neither a service-account key nor a user's credentials: {why}"
            ))
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| unusable(api::describe_json_error(&e)))?;
        let quota_project = match json.get("quota_project_id") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(p)) if p.is_empty() => None,
            Some(serde_json::Value::String(p)) if reqwest::header::HeaderValue::from_str(p).is_ok() => {
                Some(p.clone())
            }
            Some(serde_json::Value::String(_)) => {
                return Err(PluginError::Unconfigured(format!(
                    "{where_}: `quota_project_id` is not a project id (it holds characters no header can carry)"
                )));
            }
            Some(_) => {
                return Err(PluginError::Unconfigured(format!(
                    "{where_}: `quota_project_id` is not a string"
                )));
            }
        };
        let token = match json.get("type") {
            Some(serde_json::Value::String(kind)) if kind == "service_account" => {
                let key = fields(&where_, "a service-account key", json)?;
                self.fetch_with_key(&where_, key, deadline).await
            }
            Some(serde_json::Value::String(kind)) if kind == "authorized_user" => {
                let user = fields(&where_, "a user's credentials", json)?;
                self.fetch_with_refresh_token(&where_, user, deadline).await
            }
            Some(serde_json::Value::String(kind)) => Err(PluginError::Unconfigured(format!(
                "{where_} has type `{kind}`; supported are `service_account` keys and `authorized_user` \
                 credentials (`gcloud auth application-default login`), or none, to use the metadata server"
            ))),
            _ if json.is_string() => {
                Err(unusable("it holds a JSON string, not an object (was the file encoded twice?)".into()))
            }
            _ => Err(unusable(
                "it has no `type` (\"service_account\" for a key, \"authorized_user\" for gcloud's)".into(),
            )),
        }?;
        Ok((token, quota_project))
    }

    /// The service-account way: a signed JWT exchanged for a token.
    async fn fetch_with_key(
        &self,
        where_: &str,
        key: KeyFile,
        deadline: Instant,
    ) -> Result<(Secret, Duration), PluginError> {
        let signer = RsaKey::from_pem(&key.private_key)
            .map_err(|e| PluginError::Unconfigured(format!("{where_}: private_key: {e}")))?;
        let (token_uri, url) = token_endpoint(where_, key.token_uri)?;
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
            .map_err(|e| token_error(e, &format!("the service-account key in {where_} was")))?;
        parse_token(&self.api, answer.body)
    }

    /// The user's way: the refresh token exchanged for an access token.
    async fn fetch_with_refresh_token(
        &self,
        where_: &str,
        user: UserCredentials,
        deadline: Instant,
    ) -> Result<(Secret, Duration), PluginError> {
        let (_, url) = token_endpoint(where_, user.token_uri)?;
        let form = vec![
            ("grant_type".to_owned(), "refresh_token".to_owned()),
            ("client_id".to_owned(), user.client_id),
            ("client_secret".to_owned(), user.client_secret),
            ("refresh_token".to_owned(), user.refresh_token),
        ];
        let answer =
            self.api.send(Request::post_form("token", url, form).secret_answer(), deadline).await.map_err(
                |e| {
                    token_error(
                        e,
                        &format!(
                            "the user's credentials in {where_} (run `gcloud auth application-default login` \
                         again?) were"
                        ),
                    )
                },
            )?;
        parse_token(&self.api, answer.body)
    }

    async fn fetch_from_metadata(
        &self,
        base: &Url,
        gcloud: Option<&std::path::Path>,
        deadline: Instant,
    ) -> Result<(Secret, Duration), PluginError> {
        let url = base
            .join("computeMetadata/v1/instance/service-accounts/default/token")
            .expect("a relative path joins any base URL");
        let request = Request::get("metadata token", url).header("metadata-flavor", "Google").secret_answer();
        // Off GCP there is no metadata server; say so quickly rather than retrying for the whole budget.
        let deadline = deadline.min(Instant::now() + METADATA_PATIENCE);
        let answer = self.api.send(request, deadline).await.map_err(|e| {
            let gcloud = gcloud.map_or_else(
                || "gcloud's (neither $CLOUDSDK_CONFIG nor $HOME is set)".to_owned(),
                |p| format!("gcloud's at {}", p.display()),
            );
            PluginError::Unconfigured(format!(
                "no Google credentials: GOOGLE_APPLICATION_CREDENTIALS (or [plugin] credentials_file) names no \
                 credentials file, there is no {gcloud} (`gcloud auth application-default login` makes it), \
                 and the metadata server at {base} did not give a token ({e})"
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

/// The fields of a credentials file of one type; errors name fields, never values.
fn fields<T: serde::de::DeserializeOwned>(
    where_: &str,
    what: &str,
    json: serde_json::Value,
) -> Result<T, PluginError> {
    serde_json::from_value(json).map_err(|e| {
        PluginError::Unconfigured(format!("{where_} is not {what}: {}", api::describe_json_error(&e)))
    })
}

/// A credentials file's `token_uri` (Google's endpoint when it names none), checked.
fn token_endpoint(where_: &str, token_uri: Option<String>) -> Result<(String, Url), PluginError> {
    let token_uri = token_uri.unwrap_or_else(|| DEFAULT_TOKEN_URI.to_owned());
    let url: Url = token_uri
        .parse()
        .map_err(|e| PluginError::Unconfigured(format!("{where_}: token_uri `{token_uri}`: {e}")))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(PluginError::Unconfigured(format!(
            "{where_}: token_uri `{token_uri}` is not an http(s) URL"
        )));
    }
    Ok((token_uri, url))
}

/// `what` names the credentials and ends with the verb: "the key in … was".
fn token_error(e: ApiError, what: &str) -> PluginError {
    match e.status() {
        // The token endpoint refusing what we sent is a credential problem on our side.
        Some(400 | 401 | 403) => PluginError::Unconfigured(format!("{what} refused: {e}")),
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
