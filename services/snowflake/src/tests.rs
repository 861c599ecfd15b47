use std::collections::HashMap;

use flotilla_sdk::proto::core::{self, literal, primitive, scalar};

use super::*;

fn literal_int(i: i64) -> core::Literal {
    primitive_literal(primitive::Value::Integer(i))
}

fn template(statement: &str) -> core::TaskTemplate {
    core::TaskTemplate {
        r#type: TASK_TYPE.into(),
        target: Some(core::task_template::Target::Sql(core::Sql { statement: statement.into(), dialect: 0 })),
        ..Default::default()
    }
}

fn connection(role: Option<&str>) -> Connection {
    let mut config: HashMap<String, String> =
        [("user", "u"), ("account", "org-acct"), ("database", "D"), ("schema", "S"), ("warehouse", "W")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
    if let Some(r) = role {
        config.insert("role".into(), r.into());
    }
    Connection::from_config(&config).unwrap()
}

#[test]
fn the_body_carries_statement_bindings_and_connection() {
    let mut t = template("SELECT * FROM t WHERE id = %(id)s");
    t.metadata = Some(core::TaskMetadata {
        timeout: Some(prost_types::Duration { seconds: 90, nanos: 1 }),
        ..Default::default()
    });
    let inputs = core::LiteralMap { literals: [("id".to_owned(), literal_int(7))].into_iter().collect() };
    let body = statement_body(&t, &connection(Some("R")), Some(&inputs)).unwrap();
    assert_eq!(
        body,
        json!({
            "statement": "SELECT * FROM t WHERE id = ?",
            "database": "D", "schema": "S", "warehouse": "W", "role": "R",
            "bindings": {"1": {"type": "FIXED", "value": "7"}},
            "timeout": 91,
        })
    );
    let body = statement_body(&template("SELECT 1"), &connection(None), None).unwrap();
    assert_eq!(body, json!({"statement": "SELECT 1", "database": "D", "schema": "S", "warehouse": "W"}));
}

#[test]
fn a_timeout_beyond_the_apis_seven_days_is_sent_as_that_maximum() {
    let with_timeout = |seconds: i64| {
        let mut t = template("SELECT 1");
        t.metadata = Some(core::TaskMetadata {
            timeout: Some(prost_types::Duration { seconds, nanos: 0 }),
            ..Default::default()
        });
        statement_body(&t, &connection(None), None).unwrap()["timeout"].clone()
    };
    assert_eq!(with_timeout(604_800), json!(604_800));
    assert_eq!(with_timeout(10 * 86_400), json!(604_800));
}

#[test]
fn names_reach_the_sql_api_in_the_case_snowflake_stores_them() {
    for (written, sent) in [
        ("analytics", "ANALYTICS"),
        ("Compute_WH", "COMPUTE_WH"),
        ("_tmp$1", "_TMP$1"),
        ("ANALYTICS", "ANALYTICS"),
        (r#""Mixed Case""#, "Mixed Case"),
        (r#""say ""hi""""#, r#"say "hi""#),
        ("my-db", "my-db"),
        ("", ""),
    ] {
        assert_eq!(api_identifier(written), sent, "{written}");
    }
    let mut c = connection(Some("analyst"));
    c.database = "analytics".into();
    let body = statement_body(&template("SELECT 1"), &c, None).unwrap();
    assert_eq!((body["database"].as_str(), body["role"].as_str()), (Some("ANALYTICS"), Some("ANALYST")));
}

#[test]
fn a_template_without_a_query_or_with_unbindable_inputs_is_refused() {
    let no_sql = core::TaskTemplate { r#type: TASK_TYPE.into(), ..Default::default() };
    let e = statement_body(&no_sql, &connection(None), None).unwrap_err();
    assert!(matches!(&e, PluginError::InvalidArgument(m) if m.contains("sql.statement")), "{e}");
    let e = statement_body(&template("SELECT %(x)s"), &connection(None), None).unwrap_err();
    assert!(matches!(&e, PluginError::InvalidArgument(m) if m.contains("\"x\"")), "{e}");
    let map =
        core::Literal { value: Some(literal::Value::Map(core::LiteralMap::default())), ..Default::default() };
    let inputs = core::LiteralMap { literals: [("m".to_owned(), map)].into_iter().collect() };
    let e = statement_body(&template("SELECT 1"), &connection(None), Some(&inputs)).unwrap_err();
    assert!(matches!(&e, PluginError::InvalidArgument(m) if m.contains("`m`")), "{e}");
}

fn scalar_literal(value: scalar::Value) -> core::Literal {
    core::Literal {
        value: Some(literal::Value::Scalar(Box::new(core::Scalar { value: Some(value) }))),
        ..Default::default()
    }
}

fn primitive_literal(value: primitive::Value) -> core::Literal {
    scalar_literal(scalar::Value::Primitive(core::Primitive { value: Some(value) }))
}

#[test]
fn datetimes_durations_and_none_reach_snowflake_as_the_python_connector_renders_them() {
    let at = |seconds, nanos| {
        primitive_literal(primitive::Value::Datetime(prost_types::Timestamp { seconds, nanos }))
    };
    let took = |seconds, nanos| {
        primitive_literal(primitive::Value::Duration(prost_types::Duration { seconds, nanos }))
    };
    let none = || scalar_literal(scalar::Value::NoneType(core::Void {}));
    let list = |items: Vec<core::Literal>| core::Literal {
        value: Some(literal::Value::Collection(core::LiteralCollection { literals: items })),
        ..Default::default()
    };
    let inputs = core::LiteralMap {
        literals: [
            ("a", at(1_704_164_645, 0)),
            ("b", at(1_704_164_645, 123_456_789)),
            ("c", took(90, 0)),
            ("d", took(93_784, 500_000_000)),
            ("e", took(-1, 0)),
            ("f", none()),
            ("g", list(vec![literal_int(1), none(), literal_int(3)])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
    };
    let t = template(
        "SELECT %(a)s, %(b)s, %(c)s, %(d)s, %(e)s WHERE x IS %(f)s AND '{{ .inputs.f }}' IS NULL AND n IN (%(g)s)",
    );
    let body = statement_body(&t, &connection(None), Some(&inputs)).unwrap();
    assert_eq!(
        body["statement"],
        "SELECT ?, ?, ?, ?, ? WHERE x IS NULL AND NULL IS NULL AND n IN (?, NULL, ?)"
    );
    let text = |v: &str| json!({"type": "TEXT", "value": v});
    assert_eq!(
        body["bindings"],
        json!({
            "1": text("2024-01-02 03:04:05+00:00"),
            "2": text("2024-01-02 03:04:05.123456+00:00"),
            "3": text("00:01:30"),
            "4": text("26:03:04.500000"),
            "5": text("-1:59:59"),
            "6": {"type": "FIXED", "value": "1"},
            "7": {"type": "FIXED", "value": "3"},
        })
    );
}

#[test]
fn request_ids_are_uuids_stable_per_attempt_and_statement() {
    let id = |attempt: u32, prefix: &str, sql: &str| {
        let meta = admin::TaskExecutionMetadata {
            task_execution_id: Some(core::TaskExecutionIdentifier {
                retry_attempt: attempt,
                ..Default::default()
            }),
            ..Default::default()
        };
        request_id(Some(&meta), prefix, &json!({"statement": sql}))
    };
    let a = id(0, "s3://b/p", "SELECT 1");
    assert_eq!(a, id(0, "s3://b/p", "SELECT 1"));
    assert_ne!(a, id(1, "s3://b/p", "SELECT 1"));
    assert_ne!(a, id(0, "s3://b/q", "SELECT 1"));
    // Another statement under the same attempt is another submit, not a retry of the first.
    assert_ne!(a, id(0, "s3://b/p", "SELECT 2"));
    let random = request_id(None, "", &json!({}));
    assert_ne!(random, request_id(None, "", &json!({})));
    for u in [a, random] {
        let groups: Vec<&str> = u.split('-').collect();
        assert_eq!(groups.iter().map(|g| g.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12], "{u}");
        assert!(u.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{u}");
        assert_eq!(&u[14..15], "4", "{u}");
        assert!("89ab".contains(&u[19..20]), "{u}");
    }
}

fn store() -> SecretStore {
    SecretStore::new("/nonexistent-flotilla-secrets", |_| None)
}

#[test]
fn config_reads_base_url_and_budgets_with_env_overrides() {
    let table: toml::Table =
        toml::from_str("base_url = \"https://proxy.example/{account}\"\nget_timeout = \"1s\"").unwrap();
    let env: HashMap<&str, &str> = [
        ("FLOTILLA_SNOWFLAKE_GET_TIMEOUT", "750ms"),
        ("FLOTILLA_SNOWFLAKE_BASE_URL", "http://127.0.0.1:9/{account}/"),
    ]
    .into_iter()
    .collect();
    let s = Snowflake::from_parts(&table, &|k| env.get(k).map(|v| (*v).to_owned()), store()).unwrap();
    assert_eq!(s.settings.get_timeout.0, Duration::from_millis(750));
    assert_eq!(s.base(&connection(None)).unwrap().as_str(), "http://127.0.0.1:9/org-acct/");
    let s = Snowflake::from_parts(&toml::Table::new(), &|_| None, store()).unwrap();
    assert_eq!(s.base(&connection(None)).unwrap().as_str(), "https://org-acct.snowflakecomputing.com/");
}

#[test]
fn budgets_are_read_from_plugin_http_as_the_readme_documents() {
    let table: toml::Table =
        toml::from_str("[http]\nget_timeout = \"1s\"\ncreate_timeout = \"20s\"").unwrap();
    let s = Snowflake::from_parts(&table, &|_| None, store()).unwrap();
    assert_eq!(
        (s.settings.get_timeout.0, s.settings.create_timeout.0),
        (Duration::from_secs(1), Duration::from_secs(20))
    );
    let table: toml::Table = toml::from_str("get_timeout = \"2s\"\n[http]\nget_timeout = \"1s\"").unwrap();
    let e = Snowflake::from_parts(&table, &|_| None, store()).unwrap_err();
    assert!(e.contains("set it in one place"), "{e}");
    let table: toml::Table = toml::from_str("[http]\nget_timeot = \"1s\"").unwrap();
    let e = Snowflake::from_parts(&table, &|_| None, store()).unwrap_err();
    assert!(e.contains("get_timeot"), "{e}");
}

#[test]
fn bad_config_names_every_problem() {
    let table: toml::Table = toml::from_str("base_url = 5\nget_timeot = \"1s\"").unwrap();
    let e = Snowflake::from_parts(&table, &|_| None, store()).unwrap_err();
    assert!(e.contains("base_url: expected a string") && e.contains("get_timeot"), "{e}");
    let table: toml::Table = toml::from_str("base_url = \"ftp://x\"").unwrap();
    let e = Snowflake::from_parts(&table, &|_| None, store()).unwrap_err();
    assert!(e.contains("base_url"), "{e}");
    let e = Snowflake::from_parts(
        &toml::Table::new(),
        &|k| (k == "FLOTILLA_SNOWFLAKE_GET_TIMEOUT").then(|| "soon".into()),
        store(),
    )
    .unwrap_err();
    assert!(e.contains("FLOTILLA_SNOWFLAKE_GET_TIMEOUT"), "{e}");
}
