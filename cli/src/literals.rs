//! Task file values → Flyte literals, and literals → plain JSON for printed outputs.

use std::fmt::Write as _;

use anyhow::bail;
use flotilla_proto::core::{
    Literal, LiteralCollection, LiteralMap, Primitive, Scalar, literal, primitive, scalar,
};
use serde_json::Value;

/// How deeply lists and maps may nest in an input. Each level is two protobuf
/// messages (a literal and its collection or map), and the services' decoder
/// stops at 100 nested messages, a few of them the request's own: deeper
/// inputs are refused here, with a short error, rather than there.
const MAX_NESTING: usize = 40;

/// A task file's `inputs` (YAML, or JSON read into the same form) → a `LiteralMap`.
pub(crate) fn to_literal_map(inputs: &serde_yaml::Mapping) -> anyhow::Result<LiteralMap> {
    literal_map(inputs, 0)
}

fn literal_map(inputs: &serde_yaml::Mapping, depth: usize) -> anyhow::Result<LiteralMap> {
    let mut literals = std::collections::HashMap::new();
    for (key, value) in inputs {
        let serde_yaml::Value::String(name) = key else {
            bail!("inputs: the key {key:?} is not a name");
        };
        let literal = to_literal(value, depth).map_err(|e| anyhow::anyhow!("inputs.{name}: {e}"))?;
        literals.insert(name.clone(), literal);
    }
    Ok(LiteralMap { literals })
}

fn scalar_literal(value: scalar::Value) -> Literal {
    Literal {
        value: Some(literal::Value::Scalar(Box::new(Scalar { value: Some(value) }))),
        ..Default::default()
    }
}

fn primitive(value: primitive::Value) -> Literal {
    scalar_literal(scalar::Value::Primitive(Primitive { value: Some(value) }))
}

/// A float as a JSON number, or as text where JSON has none (NaN, infinities).
fn number(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}

fn to_literal(value: &serde_yaml::Value, depth: usize) -> anyhow::Result<Literal> {
    use serde_yaml::Value as Y;
    if matches!(value, Y::Sequence(_) | Y::Mapping(_)) && depth >= MAX_NESTING {
        bail!("lists and maps nest more than {MAX_NESTING} deep, more than a Flyte request can carry");
    }
    Ok(match value {
        Y::Bool(b) => primitive(primitive::Value::Boolean(*b)),
        Y::Number(n) => match n.as_i64() {
            Some(i) => primitive(primitive::Value::Integer(i)),
            // A whole number past i64 would silently become an approximate float.
            None if n.is_u64() => bail!(
                "{n} does not fit a Flyte integer (64-bit, at most {}); quote it to send a string",
                i64::MAX
            ),
            // YAML's .nan and .inf included: a Flyte float holds them.
            None => primitive(primitive::Value::FloatValue(n.as_f64().unwrap_or(f64::NAN))),
        },
        Y::String(s) => primitive(primitive::Value::StringValue(s.clone())),
        Y::Sequence(items) => Literal {
            value: Some(literal::Value::Collection(LiteralCollection {
                literals: items
                    .iter()
                    .map(|item| to_literal(item, depth + 1))
                    .collect::<anyhow::Result<_>>()?,
            })),
            ..Default::default()
        },
        Y::Mapping(map) => {
            Literal { value: Some(literal::Value::Map(literal_map(map, depth + 1)?)), ..Default::default() }
        }
        // An unset Optional input, as flytekit sends one.
        Y::Null => scalar_literal(scalar::Value::NoneType(flotilla_proto::core::Void {})),
        Y::Tagged(t) => bail!("a YAML tag ({}) is not a value a Flyte input can hold", t.tag),
    })
}

/// A `LiteralMap` as `name = value` lines, sorted by name, each value as
/// [`to_json`] gives it.
pub(crate) fn render(map: &LiteralMap) -> String {
    let mut names: Vec<&String> = map.literals.keys().collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        let _ = writeln!(out, "  {name} = {}", to_json(&map.literals[name]));
    }
    out
}

/// A `LiteralMap` as a JSON object.
pub(crate) fn map_to_json(map: &LiteralMap) -> Value {
    Value::Object(map.literals.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
}

/// A literal as plain JSON, the reverse of the task file's inputs where there
/// is one: numbers, strings, booleans, lists and maps as themselves; a datetime
/// as RFC 3339 text, a duration as text (`90s`); None as null; a float JSON
/// cannot hold (NaN, infinity) as text; references to data as `{"blob": uri}`,
/// `{"structured_dataset": uri}` and the like.
pub(crate) fn to_json(l: &Literal) -> Value {
    use serde_json::json;
    match &l.value {
        Some(literal::Value::Scalar(s)) => match &s.value {
            Some(scalar::Value::Primitive(p)) => match &p.value {
                Some(primitive::Value::Integer(i)) => json!(i),
                Some(primitive::Value::FloatValue(f)) => number(*f),
                Some(primitive::Value::StringValue(s)) => json!(s),
                Some(primitive::Value::Boolean(b)) => json!(b),
                Some(primitive::Value::Datetime(t)) => json!(t.to_string()),
                Some(primitive::Value::Duration(d)) => json!(d.to_string()),
                None => Value::Null,
            },
            Some(scalar::Value::Blob(b)) => json!({"blob": b.uri}),
            Some(scalar::Value::StructuredDataset(d)) => json!({"structured_dataset": d.uri}),
            Some(scalar::Value::Schema(s)) => json!({"schema": s.uri}),
            Some(scalar::Value::NoneType(_)) | None => Value::Null,
            Some(scalar::Value::Binary(b)) => {
                use base64::Engine as _;
                json!({"binary": base64::engine::general_purpose::STANDARD.encode(&b.value), "tag": b.tag})
            }
            Some(scalar::Value::Generic(s)) => struct_to_json(s),
            Some(scalar::Value::Error(e)) => json!({"error": e.message, "failed_node_id": e.failed_node_id}),
            Some(scalar::Value::Union(u)) => u.value.as_deref().map_or(Value::Null, to_json),
        },
        Some(literal::Value::Collection(c)) => Value::Array(c.literals.iter().map(to_json).collect()),
        Some(literal::Value::Map(m)) => map_to_json(m),
        Some(literal::Value::OffloadedMetadata(o)) => json!({"offloaded": o.uri, "size_bytes": o.size_bytes}),
        None => Value::Null,
    }
}

fn struct_to_json(s: &prost_types::Struct) -> Value {
    Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect())
}

fn value_to_json(v: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &v.kind {
        Some(Kind::NullValue(_)) | None => Value::Null,
        Some(Kind::NumberValue(n)) => number(*n),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task file's inputs, as the task file parser reads them.
    fn inputs(text: &str) -> serde_yaml::Mapping {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn inputs_nest_as_deep_as_a_request_can_carry_and_no_deeper() {
        let nested = |depth: usize| format!("x: {}1{}", "[".repeat(depth), "]".repeat(depth));
        let map = to_literal_map(&inputs(&nested(MAX_NESTING))).unwrap();
        // What a service decodes: the whole CreateTask request, within prost's recursion limit.
        let request = flotilla_proto::admin::CreateTaskRequest { inputs: Some(map), ..Default::default() };
        let bytes = prost::Message::encode_to_vec(&request);
        assert_eq!(
            <flotilla_proto::admin::CreateTaskRequest as prost::Message>::decode(bytes.as_slice()).unwrap(),
            request
        );
        let refused = to_literal_map(&inputs(&nested(MAX_NESTING + 1))).unwrap_err().to_string();
        assert!(refused.starts_with("inputs.x: ") && refused.contains("more than 40 deep"), "{refused}");
        let maps = format!("x: {}1{}", "{a: ".repeat(MAX_NESTING + 1), "}".repeat(MAX_NESTING + 1));
        assert!(to_literal_map(&inputs(&maps)).is_err());
    }

    #[test]
    fn json_inputs_become_literals_and_render_back() {
        let v: Value =
            serde_json::json!({"n": 3, "f": 1.5, "s": "hi", "b": true, "l": [1, 2], "m": {"k": "v"}});
        let map = to_literal_map(&inputs(&v.to_string())).unwrap();
        assert_eq!(
            render(&map),
            "  b = true\n  f = 1.5\n  l = [1,2]\n  m = {\"k\":\"v\"}\n  n = 3\n  s = \"hi\"\n"
        );
        // As JSON, the task file's inputs come back as they were written.
        assert_eq!(map_to_json(&map), v);
    }

    #[test]
    fn outputs_that_no_task_file_writes_have_a_json_form() {
        let scalar = scalar_literal;
        let at = prost_types::Timestamp { seconds: 1_704_164_645, nanos: 0 };
        let took = prost_types::Duration { seconds: 90, nanos: 0 };
        let sd = flotilla_proto::core::StructuredDataset { uri: "bq://p:d.t".into(), metadata: None };
        let cases = [
            (primitive(primitive::Value::Datetime(at)), serde_json::json!("2024-01-02T03:04:05Z")),
            (primitive(primitive::Value::Duration(took)), serde_json::json!("90s")),
            (primitive(primitive::Value::FloatValue(f64::NAN)), serde_json::json!("NaN")),
            (
                scalar(scalar::Value::StructuredDataset(sd)),
                serde_json::json!({"structured_dataset": "bq://p:d.t"}),
            ),
            (scalar(scalar::Value::NoneType(flotilla_proto::core::Void {})), Value::Null),
        ];
        for (literal, json) in cases {
            assert_eq!(to_json(&literal), json);
        }
    }

    #[test]
    fn integers_past_64_bits_are_refused_not_rounded() {
        let e = to_literal_map(&inputs(r#"{"big": 12345678901234567890, "ok": 9223372036854775807}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("inputs.big") && e.contains("does not fit a Flyte integer"), "{e}");
        assert!(
            to_literal_map(&inputs(r#"{"ok": 9223372036854775807, "neg": -9223372036854775808}"#)).is_ok()
        );
    }

    #[test]
    fn null_is_none_and_yamls_nan_and_inf_are_floats() {
        let map = to_literal_map(&inputs("opt: null\nalso: ~\nnan: .nan\ninf: -.inf\n")).unwrap();
        let none = literal::Value::Scalar(Box::new(Scalar {
            value: Some(scalar::Value::NoneType(flotilla_proto::core::Void {})),
        }));
        assert_eq!(map.literals["opt"].value, Some(none.clone()));
        assert_eq!(map.literals["also"].value, Some(none));
        assert_eq!(to_json(&map.literals["nan"]), serde_json::json!("NaN"));
        assert_eq!(to_json(&map.literals["inf"]), serde_json::json!("-inf"));
        // Keys are names.
        let e = to_literal_map(&inputs("1: x\n")).unwrap_err();
        assert!(e.to_string().contains("not a name"), "{e}");
        let e = to_literal_map(&inputs("t: !weird 3\n")).unwrap_err();
        assert!(e.to_string().contains("inputs.t") && e.to_string().contains("tag"), "{e}");
    }
}
