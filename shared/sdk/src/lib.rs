//! The Flotilla plugin SDK.
//!
//! A plugin is a type implementing [`Plugin`]: it names the agents it carries
//! and the task categories each serves, and implements `create`/`get`/`delete`
//! (async agents) or `execute` (sync agents). [`serve`] turns it into a whole
//! plugin service: the three `flyteidl.service` agent services, gRPC health,
//! the admin listener (`/metrics` with flytekit's `flyte_agent_*` series,
//! `/livez`, `/readyz`), request size limits, and graceful shutdown. [`main`]
//! adds the command line, configuration and signal handling of a
//! `flotilla-<plugin>` binary.
//!
//! ```no_run
//! use flotilla_sdk::{AgentSpec, Call, Plugin, PluginError, proto::admin};
//!
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     fn agents(&self) -> Vec<AgentSpec> {
//!         vec![AgentSpec::sync("Hello Agent", "hello")]
//!     }
//!
//!     async fn execute(
//!         &self,
//!         _call: &Call,
//!         _header: admin::CreateRequestHeader,
//!         inputs: Option<flotilla_sdk::proto::core::LiteralMap>,
//!     ) -> Result<admin::Resource, PluginError> {
//!         Ok(flotilla_sdk::resource::succeeded(inputs))
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     flotilla_sdk::main("flotilla-hello", "Says hello to Flyte.", |_config| Ok(Hello))
//! }
//! ```

#![warn(missing_docs)]

mod calls;
mod error;
pub mod h2serve;
mod metrics;
mod plugin;
pub mod resource;
mod runner;
mod serve;
mod service;
pub mod tls;
pub mod wire;

pub use calls::unary;
pub use error::PluginError;
pub use flotilla_proto as proto;
pub use flotilla_telemetry as telemetry;
pub use plugin::{AgentSpec, Call, Category, Plugin};
pub use runner::{
    ENV_MAX_REQUEST_BYTES, ENV_SHUTDOWN_GRACE, EXIT_CONFIG, ServiceConfig, bind_pair, main,
    one_address_for_both, run_process,
};
pub use serve::{
    HealthWatch, ServeError, ServeOptions, health_reporter, serve, set_health, shown, stopping, with_grace,
};
