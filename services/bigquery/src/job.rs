//! The query job: what `jobs.insert` is sent for a template, what `resource_meta` carries, and
//! how a `jobs.get` answer becomes a `Resource`.

use flotilla_cloud::template::{self, Native};
use flotilla_sdk::{
    PluginError,
    proto::{
        admin,
        core::{self, TaskTemplate, task_execution::Phase},
    },
    resource,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The task type flytekitplugins-bigquery's `BigQueryTask` serializes.
pub const TASK_TYPE: &str = "bigquery_query_job_task";

/// `custom` keys that are the task's own settings, not BigQuery job-config keys.
const OWN_KEYS: [&str; 3] = ["ProjectID", "Location", "Domain"];
/// Job-config keys the plugin sets itself.
const SET_BY_US: [&str; 3] = ["query", "queryParameters", "parameterMode"];
/// `errorResult.reason`s BigQuery documents as transient on its side.
const TRANSIENT_REASONS: [&str; 5] =
    ["backendError", "internalError", "jobBackendError", "jobInternalError", "rateLimitExceeded"];

/// What `get` and `delete` need: upstream's `{"job_id", "project", "location"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMeta {
    /// The BigQuery job id.
    pub job_id: String,
    /// The project the job runs in.
    pub project: String,
    /// The job's location (`US`, `EU`, a region); may be empty. Upstream
    /// writes `null` when the template names none.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub location: String,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

impl JobMeta {
    /// The JSON bytes for `resource_meta`.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("strings always serialize")
    }

    /// Reads `resource_meta`.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming what is missing.
    pub fn decode(bytes: &[u8]) -> Result<Self, PluginError> {
        serde_json::from_slice(bytes).map_err(|e| {
            PluginError::InvalidArgument(format!(
                "resource_meta is not a BigQuery job reference (JSON with job_id, project, location): {e}"
            ))
        })
    }

    /// The BigQuery console's page for the job, as upstream links it.
    pub fn console_link(&self) -> core::TaskLog {
        template::log_link(
            "BigQuery Console",
            format!(
                "https://console.cloud.google.com/bigquery?project={}&j=bq:{}:{}&page=queryresults",
                self.project, self.location, self.job_id
            ),
        )
    }
}

/// A query job built from a task template.
#[derive(Debug)]
pub(crate) struct QueryJob {
    pub(crate) job_id: String,
    pub(crate) project: String,
    pub(crate) location: Option<String>,
    sql: String,
    parameters: Vec<Value>,
    extra: Map<String, Value>,
}

impl QueryJob {
    pub(crate) fn from_template(
        template: &TaskTemplate,
        inputs: Option<&core::LiteralMap>,
    ) -> Result<Self, PluginError> {
        let invalid = |m: String| PluginError::InvalidArgument(m);
        let mut custom = template::custom_json(template);
        let project = match custom.get("ProjectID") {
            Some(Value::String(p)) if !p.trim().is_empty() => p.trim().to_owned(),
            Some(other @ (Value::Number(_) | Value::Bool(_) | Value::Array(_) | Value::Object(_))) => {
                return Err(invalid(format!(
                    "template custom.ProjectID must be a string (a GCP project id), got {other}"
                )));
            }
            _ => {
                return Err(invalid(
                    "template custom.ProjectID is missing: the GCP project to run the BigQuery job in \
                     (BigQueryConfig(ProjectID=...))"
                        .into(),
                ));
            }
        };
        let location = match custom.get("Location") {
            Some(Value::String(l)) if !l.trim().is_empty() => Some(l.trim().to_owned()),
            None | Some(Value::Null | Value::String(_)) => None,
            Some(other) => {
                return Err(invalid(format!("template custom.Location must be a string, got {other}")));
            }
        };
        let Some(sql) = template::sql_statement(template) else {
            return Err(invalid("template sql.statement is empty: a BigQuery task needs a query".into()));
        };
        let parameters = template::native_inputs(inputs)
            .map_err(invalid)?
            .into_iter()
            .map(|(name, value)| {
                parameter(&name, &value).map_err(|e| invalid(format!("input {name:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        for key in OWN_KEYS.iter().chain(&SET_BY_US) {
            custom.remove(*key);
        }
        Ok(Self {
            job_id: format!("flotilla_{}", template::random_id()),
            project,
            location,
            sql: sql.to_owned(),
            parameters,
            extra: custom,
        })
    }

    /// The `jobs.insert` body.
    pub(crate) fn body(&self) -> Value {
        let mut query = Map::new();
        query.insert("useLegacySql".into(), Value::Bool(false));
        // The template's job-config keys (destinationTable, writeDisposition, priority, ...).
        query.extend(self.extra.clone());
        query.insert("query".into(), Value::String(self.sql.clone()));
        query.insert("queryParameters".into(), Value::Array(self.parameters.clone()));
        if !self.parameters.is_empty() {
            query.insert("parameterMode".into(), Value::String("NAMED".into()));
        }
        let mut reference = json!({"projectId": self.project, "jobId": self.job_id});
        if let Some(l) = &self.location {
            reference["location"] = Value::String(l.clone());
        }
        json!({"jobReference": reference, "configuration": {"query": query}})
    }
}

/// A named query parameter, typed as upstream types them (int → INT64, float → FLOAT64,
/// str → STRING, bool → BOOL, datetime → DATETIME, list → ARRAY).
fn parameter(name: &str, value: &Native) -> Result<Value, String> {
    Ok(
        json!({"name": name, "parameterType": parameter_type(value)?, "parameterValue": parameter_value(value)}),
    )
}

/// A value's BigQuery parameter type. BigQuery has no arrays of arrays, so a
/// list of lists is refused here (and the work stays linear in the input).
fn parameter_type(value: &Native) -> Result<Value, String> {
    let scalar = |t: &str| Ok(json!({"type": t}));
    match value {
        Native::Int(_) => scalar("INT64"),
        Native::Float(_) => scalar("FLOAT64"),
        Native::Str(_) | Native::Duration(_) => scalar("STRING"),
        Native::Bool(_) => scalar("BOOL"),
        Native::Datetime(_) => scalar("DATETIME"),
        // Upstream's agent refuses it too (its parameter typing has no None).
        Native::Null => Err("None: a BigQuery query parameter needs a value".to_owned()),
        Native::List(items) if items.iter().any(|i| matches!(i, Native::List(_))) => {
            Err("a list of lists: BigQuery query parameters have no arrays of arrays".to_owned())
        }
        Native::List(items) if items.iter().any(|i| matches!(i, Native::Null)) => {
            Err("a list holding None: BigQuery arrays cannot hold NULL".to_owned())
        }
        Native::List(items) => {
            let element = items.first().map_or_else(|| Ok(json!({"type": "STRING"})), parameter_type)?;
            Ok(json!({"type": "ARRAY", "arrayType": element}))
        }
    }
}

fn parameter_value(value: &Native) -> Value {
    let scalar = |v: String| json!({"value": v});
    match value {
        Native::Int(i) => scalar(i.to_string()),
        Native::Float(f) => scalar(f.to_string()),
        Native::Str(s) => scalar(s.clone()),
        Native::Bool(b) => scalar(b.to_string()),
        Native::Datetime(t) => scalar(template::format_datetime(t)),
        Native::Duration(_) => scalar(value.to_text()),
        Native::List(items) => json!({"arrayValues": items.iter().map(parameter_value).collect::<Vec<_>>()}),
        // Refused by parameter_type before a value is made.
        Native::Null => json!({"value": Value::Null}),
    }
}

/// A `jobs.get` answer as a `Resource` (without log links).
pub(crate) fn to_resource(job: &Value) -> Result<admin::Resource, String> {
    let status = job.get("status").ok_or("no `status`")?;
    if let Some(error) = status.get("errorResult").filter(|e| e.is_object()) {
        let reason = error["reason"].as_str().unwrap_or_default();
        let message = error["message"].as_str().unwrap_or("the job failed");
        let text = if reason.is_empty() { message.to_owned() } else { format!("{reason}: {message}") };
        return Ok(if TRANSIENT_REASONS.contains(&reason) {
            resource::retryable_failed(text)
        } else {
            resource::failed(text)
        });
    }
    let state = status.get("state").and_then(Value::as_str).ok_or("no `status.state`")?;
    Ok(match state {
        "PENDING" => resource::with_phase(Phase::Initializing, state),
        "RUNNING" => resource::running(state),
        "DONE" => {
            let table = &job["configuration"]["query"]["destinationTable"];
            let outputs =
                match (table["projectId"].as_str(), table["datasetId"].as_str(), table["tableId"].as_str()) {
                    (Some(p), Some(d), Some(t)) => Some(template::structured_dataset_output(
                        &TaskTemplate::default(),
                        "results",
                        format!("bq://{p}:{d}.{t}"),
                    )),
                    _ => None,
                };
            admin::Resource { message: state.to_owned(), ..resource::succeeded(outputs) }
        }
        other => resource::running(format!("BigQuery job state {other}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(job: Value) -> (Phase, String) {
        let r = to_resource(&job).unwrap();
        (Phase::try_from(r.phase).unwrap(), r.message)
    }

    #[test]
    fn upstreams_meta_reads_with_or_without_a_location() {
        // flytekit writes `"location": null` for a template without `Location`.
        for (json, location) in [
            (r#"{"job_id":"j","project":"p","location":null}"#, ""),
            (r#"{"job_id":"j","project":"p"}"#, ""),
            (r#"{"job_id":"j","project":"p","location":"EU"}"#, "EU"),
        ] {
            let meta = JobMeta::decode(json.as_bytes()).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(
                (meta.job_id.as_str(), meta.project.as_str(), meta.location.as_str()),
                ("j", "p", location)
            );
        }
    }

    #[test]
    fn every_documented_state_maps_to_a_phase() {
        assert_eq!(phase(json!({"status": {"state": "PENDING"}})).0, Phase::Initializing);
        assert_eq!(phase(json!({"status": {"state": "RUNNING"}})).0, Phase::Running);
        assert_eq!(phase(json!({"status": {"state": "DONE"}})).0, Phase::Succeeded);
        assert_eq!(
            phase(json!({"status": {"state": "NEWSTATE"}})),
            (Phase::Running, "BigQuery job state NEWSTATE".into())
        );
        let failed = json!({"status": {"state": "DONE", "errorResult": {"reason": "invalidQuery", "message": "Syntax error"}}});
        assert_eq!(phase(failed), (Phase::Failed, "invalidQuery: Syntax error".into()));
        let transient = json!({"status": {"state": "DONE", "errorResult": {"reason": "backendError", "message": "retry"}}});
        assert_eq!(phase(transient).0, Phase::RetryableFailed);
        // Errors without errorResult are warnings of a job that succeeded.
        let warned = json!({"status": {"state": "DONE", "errors": [{"reason": "x", "message": "warning"}]}});
        assert_eq!(phase(warned).0, Phase::Succeeded);
        assert!(to_resource(&json!({"kind": "bigquery#job"})).is_err());
    }

    #[test]
    fn parameters_are_typed_like_upstream() {
        assert_eq!(
            parameter("n", &Native::Int(3)).unwrap(),
            json!({"name": "n", "parameterType": {"type": "INT64"}, "parameterValue": {"value": "3"}})
        );
        assert_eq!(
            parameter("xs", &Native::List(vec![Native::Str("a".into()), Native::Str("b".into())])).unwrap(),
            json!({"name": "xs", "parameterType": {"type": "ARRAY", "arrayType": {"type": "STRING"}},
                   "parameterValue": {"arrayValues": [{"value": "a"}, {"value": "b"}]}})
        );
        assert_eq!(parameter("b", &Native::Bool(true)).unwrap()["parameterValue"]["value"], "true");
        assert_eq!(parameter("f", &Native::Float(1.5)).unwrap()["parameterType"]["type"], "FLOAT64");
        // BigQuery has no arrays of arrays; a deep nesting is refused at once, not typed level by level.
        let mut deep = Native::Int(1);
        for _ in 0..40 {
            deep = Native::List(vec![deep]);
        }
        let e = parameter("deep", &deep).unwrap_err();
        assert!(e.contains("no arrays of arrays"), "{e}");
        // None has no BigQuery parameter type (upstream's agent refuses it too), alone or in a list.
        assert!(parameter("o", &Native::Null).unwrap_err().contains("needs a value"));
        let e = parameter("os", &Native::List(vec![Native::Int(1), Native::Null])).unwrap_err();
        assert!(e.contains("cannot hold NULL"), "{e}");
    }
}
