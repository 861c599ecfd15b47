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
//! The bearer token is read on every call from the secret upstream operators
//! mount (`FLYTE_DATABRICKS_ACCESS_TOKEN`), never stored in `resource_meta`.

pub mod config;
pub mod meta;
pub mod spec;
pub mod state;

use flotilla_sdk::{AgentSpec, Plugin, ServiceConfig};

pub use config::Settings;

/// The `spark` task type (upstream's `DatabricksAgent`).
pub const SPARK: &str = "spark";
/// The `databricks` task type (upstream's `DatabricksAgentV2`).
pub const DATABRICKS: &str = "databricks";
/// The agents' name in ListAgents, as upstream's (v1.15.3) agent server answers.
pub const AGENT_NAME: &str = "Databricks Agent";

/// The Databricks plugin.
#[derive(Clone, Debug)]
pub struct Databricks {
    settings: Settings,
}

impl Databricks {
    /// A plugin with these settings.
    pub fn new(settings: Settings) -> Self {
        Self { settings }
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
        Settings::load(&config.plugin, &flotilla_sdk::telemetry::config::process_env).map(Self::new)
    }
}

impl Plugin for Databricks {
    fn agents(&self) -> Vec<AgentSpec> {
        vec![AgentSpec::asynchronous(AGENT_NAME, SPARK), AgentSpec::asynchronous(AGENT_NAME, DATABRICKS)]
    }
}
