//! The connection a Snowflake task names (from `TaskTemplate.config`, as upstream's task
//! serializes it) and the `resource_meta` that carries it from create to get and delete.
//!
//! `resource_meta` is upstream's JSON, field for field (`user`, `account`, `database`,
//! `schema`, `warehouse`, `query_id`, `has_output`), so a statement submitted by upstream's
//! agent can be polled and canceled by this service and the other way round. The only
//! addition is `role`, written only when the template sets one. No credential is in it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The template `config` keys upstream's `SnowflakeTask` writes, all required.
pub const REQUIRED_KEYS: [&str; 5] = ["user", "account", "database", "schema", "warehouse"];

/// Where a statement runs and as whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The Snowflake user the key pair belongs to.
    pub user: String,
    /// The account identifier (`orgname-accountname`, or a locator such as `xy12345.us-east-2.aws`).
    pub account: String,
    /// Database to run in.
    pub database: String,
    /// Schema to run in.
    pub schema: String,
    /// Warehouse to run on.
    pub warehouse: String,
    /// Role to run as; the user's default when absent.
    pub role: Option<String>,
}

/// An account identifier becomes the API's host name (`<account>.snowflakecomputing.com`)
/// and signs the key-pair JWT: only the characters Snowflake's identifiers use, so that no
/// template or `resource_meta` can point the service, and its signed token, at another host.
fn check_account(account: &str) -> Result<(), String> {
    let fine = !account.is_empty()
        && account.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !account.starts_with(['.', '-'])
        && !account.ends_with(['.', '-'])
        && !account.contains("..");
    if fine {
        Ok(())
    } else {
        Err(format!(
            "account {account:?} is not a Snowflake account identifier (letters, digits, _, - and . only, \
             as in myorg-myaccount or xy12345.us-east-2.aws)"
        ))
    }
}

impl Connection {
    /// Reads the connection from a template's `config` map.
    ///
    /// # Errors
    /// Names every missing or empty key.
    pub fn from_config(config: &HashMap<String, String>) -> Result<Self, String> {
        let missing: Vec<&str> = REQUIRED_KEYS
            .into_iter()
            .filter(|k| config.get(*k).is_none_or(|v| v.trim().is_empty()))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the task template's config lacks {} (a Snowflake task needs {} there, as \
                 flytekitplugins-snowflake's SnowflakeConfig writes them)",
                missing.join(", "),
                REQUIRED_KEYS.join(", ")
            ));
        }
        let get = |k: &str| config[k].trim().to_owned();
        check_account(&get("account"))?;
        Ok(Self {
            user: get("user"),
            account: get("account"),
            database: get("database"),
            schema: get("schema"),
            warehouse: get("warehouse"),
            role: config.get("role").map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()),
        })
    }

    /// The account part of a key-pair JWT's `iss`/`sub`: upper case, without the region and
    /// cloud of a locator (`xy12345.us-east-2.aws` → `XY12345`).
    pub fn jwt_account(&self) -> String {
        let account = self.account.split('.').next().unwrap_or(&self.account);
        account.to_ascii_uppercase()
    }

    /// The `sub` claim: `ACCOUNT.USER`, both upper case.
    pub fn jwt_subject(&self) -> String {
        format!("{}.{}", self.jwt_account(), self.user.to_ascii_uppercase())
    }

    /// The account's host name part: `<account>.snowflakecomputing.com` takes the identifier
    /// in lower case, with `_` (allowed in account names, not in host names) as `-`.
    pub fn host_account(&self) -> String {
        self.account.to_ascii_lowercase().replace('_', "-")
    }
}

/// The `resource_meta` of a Snowflake task (upstream's `SnowflakeJobMetadata`, plus `role`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// See [`Connection::user`].
    pub user: String,
    /// See [`Connection::account`].
    pub account: String,
    /// See [`Connection::database`].
    pub database: String,
    /// See [`Connection::schema`].
    pub schema: String,
    /// See [`Connection::warehouse`].
    pub warehouse: String,
    /// The statement handle, which is Snowflake's query id.
    pub query_id: String,
    /// Whether the task declares outputs (then a success answers `results`). Upstream's
    /// earlier agent wrote no such field and answered `results` on every success.
    #[serde(default = "always")]
    pub has_output: bool,
    /// See [`Connection::role`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl Meta {
    /// The meta of a statement submitted on `connection`.
    pub fn new(connection: &Connection, query_id: String, has_output: bool) -> Self {
        Self {
            user: connection.user.clone(),
            account: connection.account.clone(),
            database: connection.database.clone(),
            schema: connection.schema.clone(),
            warehouse: connection.warehouse.clone(),
            query_id,
            has_output,
            role: connection.role.clone(),
        }
    }

    /// Parses `resource_meta` bytes.
    ///
    /// # Errors
    /// Says what is wrong, without echoing the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.is_empty() {
            return Err("resource_meta is empty".to_owned());
        }
        let meta: Self = serde_json::from_slice(bytes)
            .map_err(|e| format!("resource_meta is not a Snowflake task's: {e}"))?;
        if meta.query_id.is_empty() || !meta.query_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("resource_meta.query_id is not a Snowflake query id".to_owned());
        }
        check_account(&meta.account).map_err(|e| format!("resource_meta: {e}"))?;
        Ok(meta)
    }

    /// The JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a struct of strings and a bool always serializes")
    }

    /// The connection this statement runs on.
    pub fn connection(&self) -> Connection {
        Connection {
            user: self.user.clone(),
            account: self.account.clone(),
            database: self.database.clone(),
            schema: self.schema.clone(),
            warehouse: self.warehouse.clone(),
            role: self.role.clone(),
        }
    }

    /// The `results` structured dataset URI upstream answers on success.
    pub fn results_uri(&self) -> String {
        format!(
            "snowflake://{}:{}/{}/{}/{}/{}",
            self.user, self.account, self.warehouse, self.database, self.schema, self.query_id
        )
    }

    /// Upstream's log link: Snowsight's query detail page. Upstream splits the account on
    /// `-` and takes the first part as the account and the second as the region; so do we,
    /// so links match.
    pub fn log_uri(&self) -> String {
        let mut parts = self.account.split('-');
        let account = parts.next().unwrap_or("");
        let region = parts.next().unwrap_or("");
        format!(
            "https://app.snowflake.com/{region}/{account}/#/compute/history/queries/{}/detail",
            self.query_id
        )
    }
}

/// Whether `s` looks like a Snowflake query id (a statement handle): letters, digits and `-`,
/// so it is safe in a URL path.
pub fn is_query_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The log link's name, as upstream.
pub const LOG_NAME: &str = "Snowflake Query Details";

/// What a resource_meta without `has_output` meant to the agent that wrote it.
fn always() -> bool {
    true
}

#[cfg(test)]
mod tests;
