//! The echo plugin: a dependency-free pair of agents for local stacks, tests,
//! demos and benchmarks (ARCHITECTURE.md, "The echo plugin").
//!
//! - `echo` v0 (async): CreateTask answers a `resource_meta` carrying the
//!   inputs; GetTask answers `SUCCEEDED` with `outputs` equal to them. Template
//!   `custom` options: `duration_ms` (number) keeps the task `RUNNING` until
//!   that long after create; `fail_with` (string) ends it `FAILED` with that
//!   message. DeleteTask always succeeds.
//! - `echo_sync` v0 (sync): ExecuteTaskSync answers `SUCCEEDED` with the inputs
//!   as outputs (honouring `fail_with`, and `duration_ms` as a delay).
//!
//! Stateless: the inputs travel in `resource_meta` (JSON with the inputs as
//! base64 protobuf), so any replica answers for a task another created.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use flotilla_sdk::{
    AgentSpec, Call, Plugin, PluginError, ServiceConfig,
    proto::{admin, core},
    resource,
};
use prost::Message;
use prost_types::value::Kind;
use serde::{Deserialize, Serialize};

/// The async task type.
pub const ECHO: &str = "echo";
/// The sync task type.
pub const ECHO_SYNC: &str = "echo_sync";
/// Default largest inputs carried in `resource_meta` (encoded protobuf bytes).
pub const DEFAULT_MAX_INLINE_BYTES: usize = 3 * 1024 * 1024;
/// The largest `resource_meta` echo hands out, whatever `max_inline_bytes`
/// allows: the answer that carries it must fit the 4 MiB message limit that
/// gRPC clients (grpc-go in propeller, grpcio) apply by default, less room for
/// the answer's own framing. (Base64 makes 3 MiB of inputs 4 MiB of meta.)
pub const MAX_META_BYTES: usize = 4 * 1024 * 1024 - 64;

/// The echo plugin.
#[derive(Clone, Debug)]
pub struct Echo {
    max_inline_bytes: usize,
}

impl Default for Echo {
    fn default() -> Self {
        Self { max_inline_bytes: DEFAULT_MAX_INLINE_BYTES }
    }
}

/// The `[plugin]` table of `flotilla-echo`'s config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EchoConfig {
    /// Largest inputs (encoded bytes) a task may carry in its resource_meta.
    max_inline_bytes: Option<usize>,
}

impl Echo {
    /// An echo plugin whose tasks carry at most `max_inline_bytes` of inputs.
    pub fn with_max_inline_bytes(max_inline_bytes: usize) -> Self {
        Self { max_inline_bytes }
    }

    /// Builds the plugin from the service configuration's `[plugin]` table.
    ///
    /// # Errors
    /// Names an unknown or mistyped key.
    pub fn from_config(config: &ServiceConfig) -> Result<Self, String> {
        let c: EchoConfig = config.plugin.clone().try_into().map_err(|e| format!("[plugin]: {e}"))?;
        Ok(c.max_inline_bytes.map_or_else(Self::default, Self::with_max_inline_bytes))
    }
}

/// What the template's `custom` asks of an echo task.
#[derive(Debug, Default, PartialEq)]
struct Options {
    duration_ms: u64,
    fail_with: Option<String>,
}

impl Options {
    fn from_template(template: Option<&core::TaskTemplate>) -> Result<Self, PluginError> {
        let mut o = Self::default();
        let Some(custom) = template.and_then(|t| t.custom.as_ref()) else {
            return Ok(o);
        };
        if let Some(v) = custom.fields.get("duration_ms") {
            o.duration_ms = match v.kind {
                Some(Kind::NumberValue(n)) if (0.0..=86_400_000.0).contains(&n) => n as u64,
                _ => {
                    return Err(PluginError::InvalidArgument(format!(
                        "custom.duration_ms must be a number of milliseconds between 0 and 86400000, got {}",
                        describe(v)
                    )));
                }
            };
        }
        if let Some(v) = custom.fields.get("fail_with") {
            o.fail_with = match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                Some(Kind::NullValue(_)) => None,
                _ => {
                    return Err(PluginError::InvalidArgument(format!(
                        "custom.fail_with must be a string, got {}",
                        describe(v)
                    )));
                }
            };
        }
        Ok(o)
    }
}

fn describe(v: &prost_types::Value) -> String {
    match &v.kind {
        Some(Kind::NumberValue(n)) => format!("the number {n}"),
        Some(Kind::StringValue(s)) => format!("the string {}", flotilla_sdk::wire::Quoted(s)),
        Some(Kind::BoolValue(b)) => format!("the boolean {b}"),
        Some(Kind::StructValue(_)) => "an object".to_owned(),
        Some(Kind::ListValue(_)) => "a list".to_owned(),
        Some(Kind::NullValue(_)) | None => "null".to_owned(),
    }
}

/// The `resource_meta` of an echo task.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    /// Format version of this JSON.
    v: u32,
    /// When the task becomes terminal, in ms since the Unix epoch.
    done_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fail_with: Option<String>,
    /// The inputs, as base64 of the encoded `LiteralMap` (absent when there were none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    inputs: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Meta {
    fn decode(bytes: &[u8]) -> Result<Self, PluginError> {
        if bytes.is_empty() {
            return Err(PluginError::InvalidArgument("resource_meta is empty".to_owned()));
        }
        serde_json::from_slice(bytes)
            .map_err(|e| PluginError::InvalidArgument(format!("resource_meta is not an echo task's: {e}")))
    }

    fn inputs(&self) -> Result<Option<core::LiteralMap>, PluginError> {
        let Some(b64) = &self.inputs else { return Ok(None) };
        let bytes = B64
            .decode(b64)
            .map_err(|e| PluginError::InvalidArgument(format!("resource_meta.inputs is not base64: {e}")))?;
        core::LiteralMap::decode(bytes.as_slice()).map(Some).map_err(|e| {
            PluginError::InvalidArgument(format!("resource_meta.inputs is not a LiteralMap: {e}"))
        })
    }
}

impl Plugin for Echo {
    fn agents(&self) -> Vec<AgentSpec> {
        vec![AgentSpec::asynchronous("Echo Agent", ECHO), AgentSpec::sync("Echo Sync Agent", ECHO_SYNC)]
    }

    async fn create(
        &self,
        _call: &Call,
        request: admin::CreateTaskRequest,
    ) -> Result<admin::CreateTaskResponse, PluginError> {
        let options = Options::from_template(request.template.as_ref())?;
        let inputs = match &request.inputs {
            Some(map) => {
                let size = map.encoded_len();
                if size > self.max_inline_bytes {
                    return Err(PluginError::InvalidArgument(format!(
                        "echo carries its inputs in resource_meta, and these are {size} bytes, more than \
                         its limit of {} bytes",
                        self.max_inline_bytes
                    )));
                }
                Some(B64.encode(map.encode_to_vec()))
            }
            None => None,
        };
        let meta = Meta {
            v: 1,
            done_at_ms: now_ms().saturating_add(options.duration_ms),
            fail_with: options.fail_with,
            inputs,
        };
        let resource_meta = serde_json::to_vec(&meta).map_err(|e| PluginError::Internal(e.to_string()))?;
        if resource_meta.len() > MAX_META_BYTES {
            return Err(PluginError::InvalidArgument(format!(
                "echo carries its inputs in resource_meta, and these would make it {} bytes, more than the \
                 {MAX_META_BYTES} bytes that fit a gRPC client's default 4 MiB message limit",
                resource_meta.len()
            )));
        }
        Ok(admin::CreateTaskResponse { resource_meta })
    }

    async fn get(
        &self,
        _call: &Call,
        request: admin::GetTaskRequest,
    ) -> Result<admin::Resource, PluginError> {
        let meta = Meta::decode(&request.resource_meta)?;
        let now = now_ms();
        if now < meta.done_at_ms {
            return Ok(resource::running(format!("echo finishes in {} ms", meta.done_at_ms - now)));
        }
        if let Some(message) = meta.fail_with {
            return Ok(resource::failed(message));
        }
        Ok(resource::succeeded(meta.inputs()?))
    }

    async fn delete(&self, _call: &Call, _request: admin::DeleteTaskRequest) -> Result<(), PluginError> {
        Ok(())
    }

    async fn execute(
        &self,
        _call: &Call,
        header: admin::CreateRequestHeader,
        inputs: Option<core::LiteralMap>,
    ) -> Result<admin::Resource, PluginError> {
        let options = Options::from_template(header.template.as_ref())?;
        if options.duration_ms > 0 {
            tokio::time::sleep(Duration::from_millis(options.duration_ms)).await;
        }
        Ok(match options.fail_with {
            Some(message) => resource::failed(message),
            None => resource::succeeded(inputs),
        })
    }
}

#[cfg(test)]
mod tests;
