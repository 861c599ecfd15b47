//! Credentials, read where flytekit's agents read them, and a type that never prints them.
//!
//! flytekit's `get_agent_secret(key)` looks in the environment first (`_FSEC_<KEY>` in upper
//! case, and the bare `<KEY>` in the agent server), then in the file `/etc/secrets/<key>` in
//! lower case: the mount of the `flyteagent` Kubernetes secret. flytekit's own overrides of those
//! places are read too (`FLYTE_SECRETS_ENV_PREFIX`, `FLYTE_SECRETS_DEFAULT_DIR`,
//! `FLYTE_SECRETS_FILE_PREFIX`). Operators moving from upstream keep their secrets where they are.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use flotilla_sdk::PluginError;

/// Where secret files are mounted unless `FLOTILLA_SECRETS_DIR` says otherwise.
pub const DEFAULT_SECRETS_DIR: &str = "/etc/secrets";
/// Environment variable naming the secrets directory.
pub const ENV_SECRETS_DIR: &str = "FLOTILLA_SECRETS_DIR";
/// flytekit's name for the secrets directory, read when [`ENV_SECRETS_DIR`] is not set.
pub const FLYTE_SECRETS_DIR: &str = "FLYTE_SECRETS_DEFAULT_DIR";
/// flytekit's override of the `_FSEC_` prefix of secret environment variables.
pub const FLYTE_SECRETS_ENV_PREFIX: &str = "FLYTE_SECRETS_ENV_PREFIX";
/// flytekit's prefix of secret file names (none by default).
pub const FLYTE_SECRETS_FILE_PREFIX: &str = "FLYTE_SECRETS_FILE_PREFIX";
/// The prefix of secret environment variables unless [`FLYTE_SECRETS_ENV_PREFIX`] says otherwise.
pub const DEFAULT_ENV_PREFIX: &str = "_FSEC_";

/// A credential. Its `Debug` and `Display` print `[redacted]`; only [`Secret::expose`] shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A credential that is not configured anywhere the service looks, or whose
/// file is there but cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingSecret {
    /// The secret's key, as upstream operators know it.
    pub key: String,
    /// What it is for, e.g. " (the Databricks access token)"; may be empty.
    purpose: String,
    /// The environment variables tried, joined for the message.
    env: String,
    /// The file tried.
    file: String,
    /// Why the file, which exists, could not be read (permissions, not UTF-8).
    unreadable: Option<String>,
}

impl fmt::Display for MissingSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self { key, purpose, env, file, unreadable } = self;
        match unreadable {
            Some(why) => write!(
                f,
                "credential `{key}`{purpose}: the file {file} is there but cannot be read ({why}); let the \
                 service's user read it (a secret volume's defaultMode or fsGroup), or set the environment \
                 variable {env}"
            ),
            None => write!(
                f,
                "missing credential `{key}`{purpose}: set the environment variable {env} or mount it as the file {file}"
            ),
        }
    }
}

impl std::error::Error for MissingSecret {}

impl MissingSecret {
    /// Says what the secret is for, in the message (e.g. "the Databricks access token").
    #[must_use]
    pub fn for_purpose(mut self, purpose: &str) -> Self {
        self.purpose = format!(" ({purpose})");
        self
    }
}

impl From<MissingSecret> for PluginError {
    fn from(e: MissingSecret) -> Self {
        PluginError::Unconfigured(e.to_string())
    }
}

type Lookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Reads secrets from the environment and a directory of files.
#[derive(Clone)]
pub struct SecretStore {
    dir: PathBuf,
    env_prefix: String,
    file_prefix: String,
    env: Lookup,
}

impl fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretStore")
            .field("dir", &self.dir)
            .field("env_prefix", &self.env_prefix)
            .field("file_prefix", &self.file_prefix)
            .finish_non_exhaustive()
    }
}

impl SecretStore {
    /// The process environment, with the places flytekit's settings name: the directory from
    /// `$FLOTILLA_SECRETS_DIR`, else `$FLYTE_SECRETS_DEFAULT_DIR`, else `/etc/secrets`; the
    /// prefixes from `$FLYTE_SECRETS_ENV_PREFIX` (default `_FSEC_`) and
    /// `$FLYTE_SECRETS_FILE_PREFIX` (default none). Values are trimmed; a blank one counts as unset.
    pub fn from_process() -> Self {
        Self::from_env(|name| std::env::var(name).ok())
    }

    /// As [`SecretStore::from_process`], with `lookup` as the environment.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        // Trimmed, as flytekit strips them; blank counts as unset.
        let set = |name: &str| lookup(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let dir =
            set(ENV_SECRETS_DIR).or_else(|| set(FLYTE_SECRETS_DIR)).unwrap_or(DEFAULT_SECRETS_DIR.to_owned());
        let env_prefix = set(FLYTE_SECRETS_ENV_PREFIX).unwrap_or(DEFAULT_ENV_PREFIX.to_owned());
        let file_prefix = set(FLYTE_SECRETS_FILE_PREFIX).unwrap_or_default();
        Self { dir: dir.into(), env_prefix, file_prefix, env: Arc::new(lookup) }
    }

    /// Secrets from `lookup` (environment) and files in `dir`, flytekit's default prefixes; for tests.
    pub fn new(
        dir: impl Into<PathBuf>,
        lookup: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            dir: dir.into(),
            env_prefix: DEFAULT_ENV_PREFIX.to_owned(),
            file_prefix: String::new(),
            env: Arc::new(lookup),
        }
    }

    /// The directory secret files are read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads `key`: `_FSEC_<KEY>` (or the configured prefix), then `<key>` and `<KEY>` from the
    /// environment, then the file `<dir>/<file prefix><key in lower case>`. Surrounding whitespace
    /// is trimmed; an empty value counts as missing.
    ///
    /// # Errors
    /// [`MissingSecret`], naming every place looked at, when none holds a value.
    pub fn get(&self, key: &str) -> Result<Secret, MissingSecret> {
        let upper = key.to_ascii_uppercase();
        let mut names = vec![format!("{}{upper}", self.env_prefix), key.to_owned()];
        if upper != key {
            names.push(upper);
        }
        for name in &names {
            if let Some(v) = (self.env)(name).filter(|v| !v.trim().is_empty()) {
                return Ok(Secret::new(v.trim()));
            }
        }
        let file = self.dir.join(format!("{}{}", self.file_prefix, key.to_ascii_lowercase()));
        let unreadable = match std::fs::read_to_string(&file) {
            Ok(v) if !v.trim().is_empty() => return Ok(Secret::new(v.trim())),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            // The error names the reason only (permission denied, invalid UTF-8), never content.
            Err(e) => Some(e.to_string()),
        };
        Err(MissingSecret {
            key: key.to_owned(),
            purpose: String::new(),
            env: names.join(" or "),
            file: file.display().to_string(),
            unreadable,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn store(dir: &Path, env: &[(&str, &str)]) -> SecretStore {
        let env: HashMap<String, String> =
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        SecretStore::new(dir, move |k| env.get(k).cloned())
    }

    #[test]
    fn environment_wins_over_the_file_and_fsec_over_the_bare_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("flyte_token"), "from-file\n").unwrap();
        let s = store(dir.path(), &[("FLYTE_TOKEN", "bare"), ("_FSEC_FLYTE_TOKEN", " fsec ")]);
        assert_eq!(s.get("flyte_token").unwrap().expose(), "fsec");
        let s = store(dir.path(), &[("FLYTE_TOKEN", "bare")]);
        assert_eq!(s.get("flyte_token").unwrap().expose(), "bare");
        let s = store(dir.path(), &[]);
        assert_eq!(s.get("FLYTE_TOKEN").unwrap().expose(), "from-file");
    }

    #[test]
    fn flytekits_overrides_of_the_places_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("sec-token"), "from-prefixed-file\n").unwrap();
        std::fs::write(dir.path().join("token"), "from-plain-file\n").unwrap();
        let dir_text = dir.path().display().to_string();
        let env = move |vars: &[(&'static str, String)]| {
            let vars: HashMap<&str, String> = vars.iter().cloned().collect();
            SecretStore::from_env(move |k| vars.get(k).cloned())
        };
        // flytekit's directory and file prefix.
        let s = env(&[
            ("FLYTE_SECRETS_DEFAULT_DIR", dir_text.clone()),
            ("FLYTE_SECRETS_FILE_PREFIX", "sec-".into()),
        ]);
        assert_eq!(s.dir(), dir.path());
        assert_eq!(s.get("token").unwrap().expose(), "from-prefixed-file");
        // Flotilla's own directory setting wins; empty settings are unset.
        let s = env(&[
            ("FLOTILLA_SECRETS_DIR", dir_text.clone()),
            ("FLYTE_SECRETS_DEFAULT_DIR", "/nonexistent".into()),
            ("FLYTE_SECRETS_FILE_PREFIX", " ".into()),
        ]);
        assert_eq!(s.get("token").unwrap().expose(), "from-plain-file");
        // The environment prefix replaces _FSEC_, and the message names it.
        let s = env(&[("FLYTE_SECRETS_ENV_PREFIX", "MYSEC_".into()), ("MYSEC_API_KEY", "v".into())]);
        assert_eq!(s.get("api_key").unwrap().expose(), "v");
        let s = env(&[("FLYTE_SECRETS_ENV_PREFIX", "MYSEC_".into()), ("_FSEC_API_KEY", "v".into())]);
        let e = s.get("api_key").unwrap_err().to_string();
        assert!(e.contains("MYSEC_API_KEY") && e.contains("/etc/secrets/api_key"), "{e}");
    }

    #[test]
    fn missing_secret_names_every_place_and_never_prints_values() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty"), "  \n").unwrap();
        let e = store(dir.path(), &[("EMPTY", "")]).get("empty").unwrap_err().for_purpose("a test token");
        let text = e.to_string();
        assert!(text.contains("`empty` (a test token)"), "{text}");
        assert!(text.contains("_FSEC_EMPTY or empty or EMPTY"), "{text}");
        assert!(text.contains(&dir.path().join("empty").display().to_string()), "{text}");
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret} {secret:?}"), "[redacted] Secret([redacted])");
    }

    #[test]
    fn a_secret_file_that_is_there_but_unreadable_is_not_called_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("binary"), [0xff, 0xfe, b's', b'3', b'c']).unwrap();
        std::fs::create_dir(dir.path().join("a_dir")).unwrap();
        for key in ["binary", "a_dir"] {
            let text = store(dir.path(), &[]).get(key).unwrap_err().to_string();
            assert!(text.contains("is there but cannot be read"), "{key}: {text}");
            assert!(!text.starts_with("missing"), "{key}: {text}");
            assert!(!text.contains("s3c"), "{key}: {text}");
        }
        let text = store(dir.path(), &[]).get("absent").unwrap_err().to_string();
        assert!(text.starts_with("missing credential `absent`"), "{text}");
    }
}
