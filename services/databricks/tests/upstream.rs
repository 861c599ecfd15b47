//! Differential test against upstream: `fixtures/upstream_specs.json` holds
//! Databricks tasks serialized by the real flytekit and flytekitplugins-spark,
//! each with the runs/submit body upstream's connector builds from it (made by
//! `fixtures/upstream_specs.py`). The service must send the same body for the
//! same template. The only allowed difference: Struct numbers (all doubles on
//! the wire, `2.0`) are sent as integers when integral.

mod support;

use flotilla_proto::admin;
use flotilla_testkit::fakes::databricks::SUBMIT;
use prost::Message as _;
use serde_json::Value;
use support::*;

const FIXTURE: &str = include_str!("fixtures/upstream_specs.json");

/// Integral floats as integers, so `2.0` and `2` compare equal.
fn normalize(v: Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9e15 => Value::from(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, normalize(v))).collect()),
        other => other,
    }
}

fn b64(s: &str) -> Vec<u8> {
    // A tiny decoder, so the test needs no base64 crate.
    let table = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let clean: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= u32::from(table(c)) << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    out
}

#[tokio::test]
async fn the_service_sends_the_body_upstreams_connector_builds() {
    let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 9, "{}", cases.len());
    let mut rig = Rig::with(Some(TOKEN), |s| s.instance = Some(INSTANCE.into())).await;
    let mut checked = Vec::new();
    for (attempt, case) in (0..).zip(cases) {
        let name = case["name"].as_str().unwrap();
        let template = flotilla_proto::core::TaskTemplate::decode(
            b64(case["template_b64"].as_str().unwrap()).as_slice(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let before = rig.fake.requests_to(SUBMIT).len();
        let request = admin::CreateTaskRequest {
            template: Some(template),
            output_prefix: "s3://bucket/outputs".into(),
            task_execution_metadata: Some(execution_metadata(attempt)),
            ..Default::default()
        };
        rig.client.create_task(request).await.unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let submits = rig.fake.requests_to(SUBMIT);
        assert_eq!(submits.len(), before + 1, "{name}");
        let mut body = submits.last().unwrap().json();
        body.as_object_mut().unwrap().remove("idempotency_token").expect("a token");
        assert_eq!(normalize(body), normalize(case["expected_spec"].clone()), "{name}");
        checked.push(name.to_owned());
    }
    // The serverless case with a credential provider really carried it (the fixture exercises it).
    let provider = cases.iter().find(|c| c["name"] == "serverless_environments_and_provider").unwrap();
    let params = provider["expected_spec"]["tasks"][0]["spark_python_task"]["parameters"].as_array().unwrap();
    assert_eq!(params.last().unwrap(), "--flyte-credential-provider=acme-provider");
    eprintln!("matched upstream for: {checked:?}");
}
