use super::*;

fn config(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn full() -> HashMap<String, String> {
    config(&[
        ("user", "flyte_user"),
        ("account", "myorg-my_account"),
        ("database", "DB"),
        ("schema", "PUBLIC"),
        ("warehouse", "WH"),
    ])
}

#[test]
fn connection_comes_from_the_template_config() {
    let c = Connection::from_config(&full()).unwrap();
    assert_eq!(c.user, "flyte_user");
    assert_eq!(c.account, "myorg-my_account");
    assert_eq!((c.database.as_str(), c.schema.as_str(), c.warehouse.as_str()), ("DB", "PUBLIC", "WH"));
    assert_eq!(c.role, None);
    let mut with_role = full();
    with_role.insert("role".into(), "ANALYST".into());
    assert_eq!(Connection::from_config(&with_role).unwrap().role.as_deref(), Some("ANALYST"));
}

#[test]
fn missing_config_keys_are_all_named() {
    let mut c = full();
    c.remove("user");
    c.insert("warehouse".into(), " ".into());
    let e = Connection::from_config(&c).unwrap_err();
    assert!(e.contains("lacks user, warehouse"), "{e}");
    let e = Connection::from_config(&HashMap::new()).unwrap_err();
    assert!(e.contains("lacks user, account, database, schema, warehouse"), "{e}");
}

#[test]
fn jwt_names_and_host() {
    let c = Connection::from_config(&full()).unwrap();
    assert_eq!(c.jwt_account(), "MYORG-MY_ACCOUNT");
    assert_eq!(c.jwt_subject(), "MYORG-MY_ACCOUNT.FLYTE_USER");
    assert_eq!(c.host_account(), "myorg-my-account");
    let mut locator = full();
    locator.insert("account".into(), "xy12345.us-east-2.aws".into());
    let c = Connection::from_config(&locator).unwrap();
    assert_eq!(c.jwt_account(), "XY12345");
    assert_eq!(c.host_account(), "xy12345.us-east-2.aws");
}

#[test]
fn meta_is_upstreams_json() {
    let c = Connection::from_config(&full()).unwrap();
    let m = Meta::new(&c, "01b2c3d4-0000-1111-0000-00000abc1234".into(), true);
    let v: serde_json::Value = serde_json::from_slice(&m.encode()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "user": "flyte_user", "account": "myorg-my_account", "database": "DB", "schema": "PUBLIC",
            "warehouse": "WH", "query_id": "01b2c3d4-0000-1111-0000-00000abc1234", "has_output": true,
        })
    );
    assert_eq!(Meta::decode(&m.encode()).unwrap(), m);
    // Exactly what upstream's agent writes (dataclass fields in order) decodes too.
    let upstream = br#"{"user": "u", "account": "a-b", "database": "d", "schema": "s", "warehouse": "w", "query_id": "01ab", "has_output": false}"#;
    let m = Meta::decode(upstream).unwrap();
    assert_eq!((m.query_id.as_str(), m.has_output, m.role.as_deref()), ("01ab", false, None));
    // Upstream's earlier agent wrote no has_output and answered `results` on every success.
    let older = br#"{"user": "u", "account": "a-b", "database": "d", "schema": "s", "warehouse": "w", "table": "t", "query_id": "01ab"}"#;
    assert!(Meta::decode(older).unwrap().has_output);
}

#[test]
fn bad_meta_is_refused_without_echoing_it() {
    assert!(Meta::decode(b"").unwrap_err().contains("empty"));
    let e = Meta::decode(b"{\"secret\": \"hunter2\"}").unwrap_err();
    assert!(!e.contains("hunter2"), "{e}");
    let e = Meta::decode(br#"{"user": "u", "account": "a", "database": "d", "schema": "s", "warehouse": "w", "query_id": "../x", "has_output": false}"#).unwrap_err();
    assert!(e.contains("query_id"), "{e}");
}

#[test]
fn links_and_uris_match_upstream() {
    let c = Connection::from_config(&full()).unwrap();
    let m = Meta::new(&c, "01ab".into(), true);
    assert_eq!(m.results_uri(), "snowflake://flyte_user:myorg-my_account/WH/DB/PUBLIC/01ab");
    assert_eq!(
        m.log_uri(),
        "https://app.snowflake.com/my_account/myorg/#/compute/history/queries/01ab/detail"
    );
    let mut single = full();
    single.insert("account".into(), "acct".into());
    let m = Meta::new(&Connection::from_config(&single).unwrap(), "01ab".into(), false);
    assert_eq!(m.log_uri(), "https://app.snowflake.com//acct/#/compute/history/queries/01ab/detail");
}

#[test]
fn an_account_that_could_name_another_host_is_refused_in_templates_and_metas() {
    for bad in [
        "myacct.attacker.invalid/",
        "myacct.x@127.0.0.1:8080/",
        "acct/path",
        "acct:443",
        "acct#frag",
        ".acct",
        "acct.",
        "a..b",
        "acct name",
    ] {
        let mut c = full();
        c.insert("account".into(), bad.into());
        let e = Connection::from_config(&c).unwrap_err();
        assert!(e.contains("is not a Snowflake account identifier"), "{bad}: {e}");
        let meta = serde_json::json!({
            "user": "u", "account": bad, "database": "D", "schema": "S", "warehouse": "W",
            "query_id": "01b2c3d4-0000-0000-0000-000000000001", "has_output": false
        });
        let e = Meta::decode(meta.to_string().as_bytes()).unwrap_err();
        assert!(e.contains("is not a Snowflake account identifier"), "{bad}: {e}");
    }
    for good in ["myorg-my_account", "xy12345.us-east-2.aws", "ORG-ACCT"] {
        let mut c = full();
        c.insert("account".into(), good.into());
        assert!(Connection::from_config(&c).is_ok(), "{good}");
    }
}
