use serde_json::{Map, Value, json};

use super::*;

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn container() -> Container {
    Container {
        image: "ghcr.io/acme/spark:1".to_owned(),
        args: vec!["pyflyte-execute".to_owned(), "--inputs".to_owned(), "s3://b/inputs.pb".to_owned()],
        env: vec![("A".to_owned(), "1".to_owned())],
    }
}

fn default_git() -> Value {
    json!({ "git_url": DEFAULT_GIT_URL, "git_provider": "gitHub", "git_commit": DEFAULT_GIT_COMMIT })
}

#[test]
fn new_cluster_gets_image_conf_env_and_the_classic_entrypoint() {
    let custom = obj(json!({
        "databricksConf": { "run_name": "r", "new_cluster": { "num_workers": 2, "spark_version": "13.3" },
                            "timeout_seconds": 3600 },
        "sparkConf": { "spark.driver.memory": "1g" },
        "databricksInstance": "x.cloud.databricks.com",
    }));
    let job = build(&custom, &container(), None).unwrap();
    assert_eq!(
        Value::Object(job),
        json!({
            "run_name": "r",
            "timeout_seconds": 3600,
            "new_cluster": {
                "num_workers": 2, "spark_version": "13.3",
                "docker_image": { "url": "ghcr.io/acme/spark:1" },
                "spark_conf": { "spark.driver.memory": "1g" },
                "spark_env_vars": { "A": "1", "FLYTE_FAIL_ON_ERROR": "true" },
            },
            "spark_python_task": {
                "python_file": CLASSIC_ENTRYPOINT, "source": "GIT",
                "parameters": ["pyflyte-execute", "--inputs", "s3://b/inputs.pb"],
            },
            "git_source": default_git(),
        })
    );
}

#[test]
fn new_cluster_keeps_what_the_user_set_and_merges_env() {
    let custom = obj(json!({
        "databricksConf": { "new_cluster": {
            "docker_image": { "url": "mine" },
            "spark_conf": { "k": "v" },
            "spark_env_vars": { "B": "2", "FLYTE_FAIL_ON_ERROR": "false" },
        } },
        "sparkConf": { "ignored": "yes" },
    }));
    let job = build(&custom, &container(), None).unwrap();
    assert_eq!(
        job["new_cluster"],
        json!({
            "docker_image": { "url": "mine" },
            "spark_conf": { "k": "v" },
            "spark_env_vars": { "A": "1", "B": "2", "FLYTE_FAIL_ON_ERROR": "true" },
        })
    );
}

#[test]
fn missing_spark_conf_becomes_an_empty_object() {
    let custom = obj(json!({ "databricksConf": { "new_cluster": {} } }));
    let job = build(&custom, &container(), None).unwrap();
    assert_eq!(job["new_cluster"]["spark_conf"], json!({}));
}

#[test]
fn existing_cluster_is_left_alone() {
    let custom =
        obj(json!({ "databricksConf": { "existing_cluster_id": "0101-abc" }, "sparkConf": { "a": "b" } }));
    let job = build(&custom, &container(), None).unwrap();
    assert_eq!(
        Value::Object(job),
        json!({
            "existing_cluster_id": "0101-abc",
            "spark_python_task": {
                "python_file": CLASSIC_ENTRYPOINT, "source": "GIT",
                "parameters": ["pyflyte-execute", "--inputs", "s3://b/inputs.pb"],
            },
            "git_source": default_git(),
        })
    );
}

#[test]
fn user_git_source_and_python_file_replace_the_defaults() {
    let git =
        json!({ "git_url": "https://github.com/acme/jobs", "git_provider": "gitHub", "git_branch": "main" });
    let custom = obj(json!({ "databricksConf": {
        "existing_cluster_id": "c", "git_source": git, "python_file": "run.py",
    } }));
    let job = build(&custom, &container(), None).unwrap();
    assert_eq!(job["git_source"], git);
    assert_eq!(job["spark_python_task"]["python_file"], json!("run.py"));
    assert!(!job.contains_key("python_file"));
}

#[test]
fn serverless_adds_the_environment_and_a_single_task() {
    let custom = obj(json!({ "databricksConf": { "run_name": "r", "environment_key": "gpu" } }));
    let job = build(&custom, &container(), None).unwrap();
    assert_eq!(
        Value::Object(job),
        json!({
            "run_name": "r",
            "environments": [{ "environment_key": "gpu", "spec": {
                "client": "1", "environment_vars": { "A": "1", "FLYTE_FAIL_ON_ERROR": "true" } } }],
            "tasks": [{
                "task_key": "flyte_task",
                "spark_python_task": {
                    "python_file": SERVERLESS_ENTRYPOINT, "source": "GIT",
                    "parameters": ["pyflyte-execute", "--inputs", "s3://b/inputs.pb"],
                },
                "environment_key": "gpu",
            }],
            "git_source": default_git(),
        })
    );
}

#[test]
fn serverless_merges_into_a_given_environment_and_defaults_its_key() {
    let custom = obj(json!({ "databricksConf": { "environments": [
        { "environment_key": "other", "spec": { "client": "2" } },
        { "environment_key": "default", "spec": { "client": "2", "dependencies": ["pandas"],
                                                   "environment_vars": { "A": "old", "C": "3" } } },
    ] } }));
    let job = build(&custom, &container(), None).unwrap();
    assert_eq!(
        job["environments"],
        json!([
            { "environment_key": "other", "spec": { "client": "2" } },
            { "environment_key": "default", "spec": { "client": "2", "dependencies": ["pandas"],
              "environment_vars": { "A": "1", "C": "3", "FLYTE_FAIL_ON_ERROR": "true" } } },
        ])
    );
    assert_eq!(job["tasks"][0]["environment_key"], json!("default"));
}

#[test]
fn serverless_credential_provider_comes_from_the_task_or_the_service() {
    let base = json!({ "databricksConf": { "environment_key": "e" } });
    let job = build(&obj(base.clone()), &container(), Some("svc")).unwrap();
    let params = &job["tasks"][0]["spark_python_task"]["parameters"];
    assert_eq!(params.as_array().unwrap().last().unwrap(), &json!("--flyte-credential-provider=svc"));

    let mut with_task = obj(base.clone());
    with_task.insert("databricksServiceCredentialProvider".to_owned(), json!("task"));
    let job = build(&with_task, &container(), Some("svc")).unwrap();
    let params = &job["tasks"][0]["spark_python_task"]["parameters"];
    assert_eq!(params.as_array().unwrap().last().unwrap(), &json!("--flyte-credential-provider=task"));

    let mut empty = obj(base);
    empty.insert("databricksServiceCredentialProvider".to_owned(), json!(""));
    let job = build(&empty, &container(), Some("svc")).unwrap();
    assert_eq!(job["tasks"][0]["spark_python_task"]["parameters"].as_array().unwrap().len(), 3);
}

#[test]
fn a_cluster_key_wins_over_serverless_settings() {
    let custom = obj(json!({ "databricksConf": { "existing_cluster_id": "c", "environment_key": "e" } }));
    let job = build(&custom, &container(), None).unwrap();
    assert!(job.contains_key("spark_python_task"));
    assert!(!job.contains_key("tasks"));
    assert_eq!(job["environment_key"], json!("e"));
}

#[test]
fn a_null_cluster_key_is_no_cluster_and_serverless_settings_decide() {
    // flytekit's is_serverless_config reads `new_cluster: None` as no cluster; the key stays in the body.
    let custom = obj(json!({ "databricksConf": { "new_cluster": null, "environment_key": "e" } }));
    let job = build(&custom, &container(), None).unwrap();
    assert!(!job.contains_key("spark_python_task"), "{job:?}");
    assert_eq!(job["tasks"][0]["environment_key"], json!("e"));
    assert_eq!(job["environments"][0]["environment_key"], json!("e"));
    assert_eq!(job.get("new_cluster"), Some(&Value::Null));
}

#[test]
fn notebook_on_classic_compute() {
    let custom = obj(json!({
        "databricksConf": { "existing_cluster_id": "c", "git_source": { "git_url": "u", "git_provider": "gitHub" } },
        "notebookPath": "/Users/a/nb",
        "notebookBaseParameters": { "x": "1" },
    }));
    let job = build(&custom, &container(), None).unwrap();
    assert_eq!(
        Value::Object(job),
        json!({
            "existing_cluster_id": "c",
            "notebook_task": { "notebook_path": "/Users/a/nb", "base_parameters": { "x": "1" }, "source": "GIT" },
            "git_source": { "git_url": "u", "git_provider": "gitHub" },
        })
    );
}

#[test]
fn notebook_on_serverless_without_git() {
    let custom = obj(json!({ "databricksConf": { "environment_key": "nb" }, "notebookPath": "/Shared/x" }));
    let job = build(&custom, &container(), None).unwrap();
    assert_eq!(
        job["tasks"],
        json!([{ "task_key": "flyte_notebook_task", "notebook_task": { "notebook_path": "/Shared/x" },
                 "environment_key": "nb" }])
    );
    assert!(!job.contains_key("git_source"));
    assert!(!job.contains_key("environment_key"));
}

#[test]
fn bad_configurations_name_the_field() {
    let cases = [
        (json!({}), "custom.databricksConf is missing"),
        (json!({ "databricksConf": "x" }), "custom.databricksConf must be an object"),
        (json!({ "databricksConf": {} }), "has no compute"),
        (json!({ "databricksConf": { "new_cluster": null } }), "has no compute"),
        (json!({ "databricksConf": { "new_cluster": 3 } }), "new_cluster must be an object"),
        (json!({ "databricksConf": { "environments": 3 } }), "environments must be a list"),
        (
            json!({ "databricksConf": { "environment_key": "e" }, "databricksServiceCredentialProvider": 1 }),
            "databricksServiceCredentialProvider must be a string",
        ),
    ];
    for (custom, want) in cases {
        let err = build(&obj(custom.clone()), &container(), None).unwrap_err();
        assert!(err.contains(want), "{custom}: {err}");
    }
    let no_image = Container { image: String::new(), ..container() };
    let err = build(&obj(json!({ "databricksConf": { "new_cluster": {} } })), &no_image, None).unwrap_err();
    assert!(err.contains("no container image"), "{err}");
}
