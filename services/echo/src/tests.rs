use std::collections::BTreeMap;

use flotilla_sdk::{
    Category,
    proto::core::{
        Literal, LiteralMap, Primitive, Scalar, literal, primitive, scalar, task_execution::Phase,
    },
};
use prost_types::{Struct, Value};

use super::*;

fn call() -> Call {
    Call { category: Category::new(ECHO, 0), deadline: None, request_id: None }
}

fn int_inputs(n: i64) -> LiteralMap {
    let lit = Literal {
        value: Some(literal::Value::Scalar(Box::new(Scalar {
            value: Some(scalar::Value::Primitive(Primitive { value: Some(primitive::Value::Integer(n)) })),
        }))),
        ..Default::default()
    };
    LiteralMap { literals: [("x".to_owned(), lit)].into() }
}

fn template(custom: &[(&str, Kind)]) -> core::TaskTemplate {
    let fields: BTreeMap<String, Value> =
        custom.iter().map(|(k, v)| ((*k).to_owned(), Value { kind: Some(v.clone()) })).collect();
    core::TaskTemplate {
        r#type: ECHO.to_owned(),
        custom: Some(Struct { fields: fields.into_iter().collect() }),
        ..Default::default()
    }
}

async fn create_then_get(echo: &Echo, custom: &[(&str, Kind)]) -> admin::Resource {
    let created = echo
        .create(
            &call(),
            admin::CreateTaskRequest {
                inputs: Some(int_inputs(7)),
                template: Some(template(custom)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    echo.get(&call(), admin::GetTaskRequest { resource_meta: created.resource_meta, ..Default::default() })
        .await
        .unwrap()
}

#[tokio::test]
async fn get_echoes_the_inputs() {
    let r = create_then_get(&Echo::default(), &[]).await;
    assert_eq!(r.phase, Phase::Succeeded as i32);
    assert_eq!(r.outputs, Some(int_inputs(7)));
}

#[tokio::test]
async fn duration_keeps_the_task_running() {
    let r = create_then_get(&Echo::default(), &[("duration_ms", Kind::NumberValue(60_000.0))]).await;
    assert_eq!(r.phase, Phase::Running as i32);
    assert!(r.outputs.is_none());
}

#[tokio::test]
async fn fail_with_fails_the_task_with_the_message() {
    let r =
        create_then_get(&Echo::default(), &[("fail_with", Kind::StringValue("disk on fire".into()))]).await;
    assert_eq!(r.phase, Phase::Failed as i32);
    assert_eq!(r.message, "disk on fire");
}

#[test]
fn mistyped_options_name_the_field() {
    let e = Options::from_template(Some(&template(&[("duration_ms", Kind::StringValue("5".into()))])))
        .unwrap_err();
    assert!(e.to_string().contains("custom.duration_ms"), "{e}");
    let e = Options::from_template(Some(&template(&[("fail_with", Kind::NumberValue(1.0))]))).unwrap_err();
    assert!(e.to_string().contains("custom.fail_with"), "{e}");
}

#[tokio::test]
async fn inputs_too_large_for_resource_meta_are_refused_at_create() {
    let echo = Echo::with_max_inline_bytes(4);
    let e = echo
        .create(&call(), admin::CreateTaskRequest { inputs: Some(int_inputs(1 << 40)), ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(e, PluginError::InvalidArgument(_)));
    assert!(e.to_string().contains("limit of 4 bytes"), "{e}");
}

#[tokio::test]
async fn inputs_whose_meta_would_not_fit_a_default_grpc_message_are_refused_at_create() {
    let blob = |n: usize| {
        let lit = Literal {
            value: Some(literal::Value::Scalar(Box::new(Scalar {
                value: Some(scalar::Value::Binary(flotilla_sdk::proto::core::Binary {
                    value: vec![7; n],
                    ..Default::default()
                })),
            }))),
            ..Default::default()
        };
        LiteralMap { literals: [("b".to_owned(), lit)].into() }
    };
    // Exactly the default inline limit: base64 takes the meta past 4 MiB.
    let inputs = blob(DEFAULT_MAX_INLINE_BYTES - 64);
    assert!(inputs.encoded_len() <= DEFAULT_MAX_INLINE_BYTES);
    let e = Echo::default()
        .create(&call(), admin::CreateTaskRequest { inputs: Some(inputs), ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(e, PluginError::InvalidArgument(_)), "{e:?}");
    assert!(e.to_string().contains("4 MiB"), "{e}");
    // Half of that fits, and its meta is within the bound.
    let ok = Echo::default()
        .create(
            &call(),
            admin::CreateTaskRequest {
                inputs: Some(blob(DEFAULT_MAX_INLINE_BYTES / 2)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(ok.resource_meta.len() <= MAX_META_BYTES);
}

#[tokio::test]
async fn garbage_resource_meta_is_invalid_argument() {
    let e = Echo::default()
        .get(&call(), admin::GetTaskRequest { resource_meta: b"{nope".to_vec(), ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(e, PluginError::InvalidArgument(_)), "{e:?}");
}
