//! The Databricks `runs/submit` body built from a task template, with the
//! same result as flytekit's Databricks connector: `custom.databricksConf` is
//! the body, completed with the compute, the entrypoint and the environment.
//!
//! - Compute: classic (`existing_cluster_id`, or `new_cluster` given the
//!   container image as `docker_image`, `custom.sparkConf` as `spark_conf`
//!   and the environment in `spark_env_vars`) or serverless (`environment_key`
//!   / `environments` without cluster keys: the task goes in a one-element
//!   `tasks` list and the environment in the matching `environments[].spec`).
//! - Entrypoint: `custom.notebookPath` makes a `notebook_task`; otherwise a
//!   `spark_python_task` running flytetools' entrypoint (or the user's
//!   `python_file`) from git with the container's arguments.
//! - Environment: the container's, plus `FLYTE_FAIL_ON_ERROR=true`.

use serde_json::{Map, Value, json};

/// Environment variable the connector adds so `pyflyte-execute` exits non-zero on a task error.
pub const FAIL_ON_ERROR: &str = "FLYTE_FAIL_ON_ERROR";
/// Where the default entrypoints live (the flytetools repository, at a fixed commit).
pub const DEFAULT_GIT_URL: &str = "https://github.com/flyteorg/flytetools";
/// The flytetools commit the default entrypoints are taken from.
pub const DEFAULT_GIT_COMMIT: &str = "572298df1f971fb58c258398bd70a6372f811c96";
/// The entrypoint on classic compute.
pub const CLASSIC_ENTRYPOINT: &str = "flytekitplugins/databricks/entrypoint.py";
/// The entrypoint on serverless compute.
pub const SERVERLESS_ENTRYPOINT: &str = "flytekitplugins/databricks/entrypoint_serverless.py";
/// `task_key` of the single task of a serverless Python run.
const SERVERLESS_TASK_KEY: &str = "flyte_task";
/// `task_key` of the single task of a serverless notebook run.
const SERVERLESS_NOTEBOOK_TASK_KEY: &str = "flyte_notebook_task";

/// What the spec needs from the template's container.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Container {
    /// The task's image (becomes `new_cluster.docker_image.url` unless set).
    pub image: String,
    /// Arguments, already rendered by propeller (`pyflyte-fast-execute … -- pyflyte-execute …`).
    pub args: Vec<String>,
    /// Environment variables, in template order.
    pub env: Vec<(String, String)>,
}

/// Python's truthiness of a JSON value, which upstream's checks rely on.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

fn not_null(v: Option<&Value>) -> bool {
    !matches!(v, None | Some(Value::Null))
}

/// Builds the `runs/submit` body (without `idempotency_token`).
///
/// `custom` is the template's `custom` as JSON; `default_credential_provider`
/// is the service's `FLYTE_DATABRICKS_SERVICE_CREDENTIAL_PROVIDER`, used when
/// the task does not name `databricksServiceCredentialProvider`.
///
/// # Errors
/// A message naming the missing or mistyped field.
pub fn build(
    custom: &Map<String, Value>,
    container: &Container,
    default_credential_provider: Option<&str>,
) -> Result<Map<String, Value>, String> {
    let mut job = match custom.get("databricksConf") {
        Some(Value::Object(conf)) => conf.clone(),
        None | Some(Value::Null) => {
            return Err("custom.databricksConf is missing: a Databricks task carries its runs/submit \
                        settings there (set databricks_conf in the task's Databricks config)"
                .to_owned());
        }
        Some(other) => return Err(format!("custom.databricksConf must be an object, got {}", kind(other))),
    };
    let mut env = Map::new();
    for (k, v) in &container.env {
        env.insert(k.clone(), Value::String(v.clone()));
    }
    env.insert(FAIL_ON_ERROR.to_owned(), Value::String("true".to_owned()));

    let has_cluster = not_null(job.get("existing_cluster_id")) || not_null(job.get("new_cluster"));
    let has_serverless = truthy(job.get("environment_key")) || truthy(job.get("environments"));
    if !has_cluster && !has_serverless {
        return Err("custom.databricksConf has no compute: give one of existing_cluster_id or new_cluster \
                    (classic compute), or environment_key or environments (serverless)"
            .to_owned());
    }
    // As upstream's `is_serverless_config`: a cluster key set to null is no cluster.
    let serverless = !has_cluster && has_serverless;

    if truthy(custom.get("notebookPath")) {
        notebook(&mut job, custom, container, env, serverless)?;
    } else {
        python_file(&mut job, custom, container, env, serverless, default_credential_provider)?;
    }
    Ok(job)
}

fn notebook(
    job: &mut Map<String, Value>,
    custom: &Map<String, Value>,
    container: &Container,
    env: Map<String, Value>,
    serverless: bool,
) -> Result<(), String> {
    let mut task = Map::new();
    task.insert("notebook_path".to_owned(), custom["notebookPath"].clone());
    if truthy(custom.get("notebookBaseParameters")) {
        task.insert("base_parameters".to_owned(), custom["notebookBaseParameters"].clone());
    }
    let git_source = job.remove("git_source").filter(|g| truthy(Some(g)));
    if git_source.is_some() {
        task.insert("source".to_owned(), json!("GIT"));
    }
    if serverless {
        let key = configure_serverless(job, env)?;
        job.insert(
            "tasks".to_owned(),
            json!([{ "task_key": SERVERLESS_NOTEBOOK_TASK_KEY, "notebook_task": task, "environment_key": key }]),
        );
    } else {
        configure_classic(job, custom, container, env)?;
        job.insert("notebook_task".to_owned(), Value::Object(task));
    }
    if let Some(g) = git_source {
        job.insert("git_source".to_owned(), g);
    }
    Ok(())
}

fn python_file(
    job: &mut Map<String, Value>,
    custom: &Map<String, Value>,
    container: &Container,
    env: Map<String, Value>,
    serverless: bool,
    default_credential_provider: Option<&str>,
) -> Result<(), String> {
    let git_source = job.remove("git_source").filter(|g| truthy(Some(g))).unwrap_or_else(
        || json!({ "git_url": DEFAULT_GIT_URL, "git_provider": "gitHub", "git_commit": DEFAULT_GIT_COMMIT }),
    );
    let user_file = job.remove("python_file").filter(|f| truthy(Some(f)));
    if serverless {
        let python_file = user_file.unwrap_or_else(|| json!(SERVERLESS_ENTRYPOINT));
        let key = configure_serverless(job, env)?;
        let mut parameters: Vec<Value> = container.args.iter().map(|a| json!(a)).collect();
        // The task's setting wins when present at all (even empty), as upstream's `dict.get(key, env)`.
        let provider = match custom.get("databricksServiceCredentialProvider") {
            Some(Value::String(s)) => Some(s.as_str()),
            Some(Value::Null) => None,
            Some(other) => {
                return Err(format!(
                    "custom.databricksServiceCredentialProvider must be a string, got {}",
                    kind(other)
                ));
            }
            None => default_credential_provider,
        };
        if let Some(p) = provider.filter(|p| !p.is_empty()) {
            parameters.push(json!(format!("--flyte-credential-provider={p}")));
        }
        job.insert(
            "tasks".to_owned(),
            json!([{
                "task_key": SERVERLESS_TASK_KEY,
                "spark_python_task": { "python_file": python_file, "source": "GIT", "parameters": parameters },
                "environment_key": key,
            }]),
        );
    } else {
        let python_file = user_file.unwrap_or_else(|| json!(CLASSIC_ENTRYPOINT));
        configure_classic(job, custom, container, env)?;
        job.insert(
            "spark_python_task".to_owned(),
            json!({ "python_file": python_file, "source": "GIT", "parameters": container.args }),
        );
    }
    job.insert("git_source".to_owned(), git_source);
    Ok(())
}

/// Serverless: makes sure `environments` holds the environment the task uses
/// (adding `{environment_key, spec: {client: "1"}}` when absent), merges `env`
/// into its `spec.environment_vars` (ours win), and returns its key.
fn configure_serverless(job: &mut Map<String, Value>, env: Map<String, Value>) -> Result<Value, String> {
    let key = match job.remove("environment_key") {
        None | Some(Value::Null) => json!("default"),
        Some(k) => k,
    };
    let environments = job.entry("environments").or_insert_with(|| json!([]));
    if environments.is_null() {
        *environments = json!([]);
    }
    let Value::Array(list) = environments else {
        return Err(format!("custom.databricksConf.environments must be a list, got {}", kind(environments)));
    };
    let position = list.iter().position(|e| e.get("environment_key") == Some(&key));
    let index = match position {
        Some(i) => i,
        None => {
            list.push(json!({ "environment_key": key, "spec": { "client": "1" } }));
            list.len() - 1
        }
    };
    let Value::Object(entry) = &mut list[index] else {
        return Err("custom.databricksConf.environments holds an entry that is not an object".to_owned());
    };
    let spec = entry.entry("spec").or_insert_with(|| json!({}));
    if spec.is_null() {
        *spec = json!({});
    }
    let Value::Object(spec) = spec else {
        return Err(format!("custom.databricksConf.environments[{index}].spec must be an object"));
    };
    let vars = spec.entry("environment_vars").or_insert_with(|| json!({}));
    if vars.is_null() {
        *vars = json!({});
    }
    let Value::Object(vars) = vars else {
        return Err(format!(
            "custom.databricksConf.environments[{index}].spec.environment_vars must be an object"
        ));
    };
    vars.extend(env);
    Ok(key)
}

/// Classic compute: an existing cluster needs nothing; a new cluster gets the
/// container image, `custom.sparkConf` and the environment where it has none.
fn configure_classic(
    job: &mut Map<String, Value>,
    custom: &Map<String, Value>,
    container: &Container,
    env: Map<String, Value>,
) -> Result<(), String> {
    if not_null(job.get("existing_cluster_id")) {
        return Ok(());
    }
    let Some(cluster) = job.get_mut("new_cluster").filter(|c| !c.is_null()) else {
        return Ok(());
    };
    let Value::Object(cluster) = cluster else {
        return Err(format!("custom.databricksConf.new_cluster must be an object, got {}", kind(cluster)));
    };
    if !truthy(cluster.get("docker_image")) {
        if container.image.is_empty() {
            return Err("custom.databricksConf.new_cluster has no docker_image and the template has no \
                        container image to run"
                .to_owned());
        }
        cluster.insert("docker_image".to_owned(), json!({ "url": container.image }));
    }
    if !truthy(cluster.get("spark_conf")) {
        let conf = custom.get("sparkConf").filter(|c| !c.is_null()).cloned().unwrap_or_else(|| json!({}));
        cluster.insert("spark_conf".to_owned(), conf);
    }
    match cluster.get_mut("spark_env_vars") {
        Some(Value::Object(vars)) if !vars.is_empty() => vars.extend(env),
        Some(other) if truthy(Some(other)) => {
            return Err(format!(
                "custom.databricksConf.new_cluster.spark_env_vars must be an object, got {}",
                kind(other)
            ));
        }
        _ => {
            cluster.insert("spark_env_vars".to_owned(), Value::Object(env));
        }
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
