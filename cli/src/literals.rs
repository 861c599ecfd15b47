//! Plain JSON values ↔ Flyte literals, for task files and printed outputs.

use std::fmt::Write as _;

use anyhow::bail;
use flotilla_proto::core::{
    Literal, LiteralCollection, LiteralMap, Primitive, Scalar, literal, primitive, scalar,
};
use serde_json::Value;

/// A JSON object of inputs → a `LiteralMap`.
pub(crate) fn to_literal_map(inputs: &serde_json::Map<String, Value>) -> anyhow::Result<LiteralMap> {
    let mut literals = std::collections::HashMap::new();
    for (name, value) in inputs {
        literals.insert(name.clone(), to_literal(value).map_err(|e| anyhow::anyhow!("inputs.{name}: {e}"))?);
    }
    Ok(LiteralMap { literals })
}

fn primitive(value: primitive::Value) -> Literal {
    Literal {
        value: Some(literal::Value::Scalar(Box::new(Scalar {
            value: Some(scalar::Value::Primitive(Primitive { value: Some(value) })),
        }))),
        ..Default::default()
    }
}

fn to_literal(value: &Value) -> anyhow::Result<Literal> {
    Ok(match value {
        Value::Bool(b) => primitive(primitive::Value::Boolean(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => primitive(primitive::Value::Integer(i)),
            // A whole number past i64 would silently become an approximate float.
            None if n.is_u64() => bail!(
                "{n} does not fit a Flyte integer (64-bit, at most {}); quote it to send a string",
                i64::MAX
            ),
            None => primitive(primitive::Value::FloatValue(n.as_f64().unwrap_or(f64::NAN))),
        },
        Value::String(s) => primitive(primitive::Value::StringValue(s.clone())),
        Value::Array(items) => Literal {
            value: Some(literal::Value::Collection(LiteralCollection {
                literals: items.iter().map(to_literal).collect::<anyhow::Result<_>>()?,
            })),
            ..Default::default()
        },
        Value::Object(map) => {
            Literal { value: Some(literal::Value::Map(to_literal_map(map)?)), ..Default::default() }
        }
        // YAML's .nan and .inf arrive here as null too: JSON numbers are finite.
        Value::Null => {
            bail!("null (or .nan/.inf, which a task file cannot carry) is not a value a Flyte input can hold")
        }
    })
}

/// A `LiteralMap` as `name = value` lines, sorted by name.
pub(crate) fn render(map: &LiteralMap) -> String {
    let mut names: Vec<&String> = map.literals.keys().collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        let _ = writeln!(out, "  {name} = {}", render_literal(&map.literals[name]));
    }
    out
}

fn render_literal(l: &Literal) -> String {
    match &l.value {
        Some(literal::Value::Scalar(s)) => match &s.value {
            Some(scalar::Value::Primitive(p)) => match &p.value {
                Some(primitive::Value::Integer(i)) => i.to_string(),
                Some(primitive::Value::FloatValue(f)) => format!("{f:?}"),
                Some(primitive::Value::StringValue(s)) => format!("{s:?}"),
                Some(primitive::Value::Boolean(b)) => b.to_string(),
                Some(primitive::Value::Datetime(t)) => format!("datetime({}s)", t.seconds),
                Some(primitive::Value::Duration(d)) => format!("duration({}s)", d.seconds),
                None => "(empty primitive)".to_owned(),
            },
            Some(scalar::Value::Blob(b)) => format!("blob {}", b.uri),
            Some(scalar::Value::StructuredDataset(d)) => format!("structured dataset {}", d.uri),
            Some(scalar::Value::Schema(s)) => format!("schema {}", s.uri),
            Some(scalar::Value::NoneType(_)) => "none".to_owned(),
            Some(scalar::Value::Binary(b)) => format!("binary ({} bytes, tag {:?})", b.value.len(), b.tag),
            Some(scalar::Value::Generic(s)) => format!("struct with {} fields", s.fields.len()),
            Some(scalar::Value::Error(e)) => format!("error {:?}", e.message),
            Some(scalar::Value::Union(u)) => {
                u.value.as_deref().map_or_else(|| "union (empty)".to_owned(), render_literal)
            }
            None => "(empty scalar)".to_owned(),
        },
        Some(literal::Value::Collection(c)) => {
            format!("[{}]", c.literals.iter().map(render_literal).collect::<Vec<_>>().join(", "))
        }
        Some(literal::Value::Map(m)) => {
            let mut names: Vec<&String> = m.literals.keys().collect();
            names.sort();
            let parts: Vec<String> =
                names.iter().map(|n| format!("{n}: {}", render_literal(&m.literals[*n]))).collect();
            format!("{{{}}}", parts.join(", "))
        }
        Some(literal::Value::OffloadedMetadata(o)) => format!("offloaded {} ({} bytes)", o.uri, o.size_bytes),
        None => "(empty)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_inputs_become_literals_and_render_back() {
        let v: Value =
            serde_json::json!({"n": 3, "f": 1.5, "s": "hi", "b": true, "l": [1, 2], "m": {"k": "v"}});
        let map = to_literal_map(v.as_object().unwrap()).unwrap();
        assert_eq!(
            render(&map),
            "  b = true\n  f = 1.5\n  l = [1, 2]\n  m = {k: \"v\"}\n  n = 3\n  s = \"hi\"\n"
        );
    }

    #[test]
    fn integers_past_64_bits_are_refused_not_rounded() {
        let v: Value =
            serde_json::from_str(r#"{"big": 12345678901234567890, "ok": 9223372036854775807}"#).unwrap();
        let e = to_literal_map(v.as_object().unwrap()).unwrap_err().to_string();
        assert!(e.contains("inputs.big") && e.contains("does not fit a Flyte integer"), "{e}");
        let v: Value =
            serde_json::from_str(r#"{"ok": 9223372036854775807, "neg": -9223372036854775808}"#).unwrap();
        assert!(to_literal_map(v.as_object().unwrap()).is_ok());
    }

    #[test]
    fn null_inputs_are_refused_by_name() {
        let v: Value = serde_json::json!({"x": null});
        let e = to_literal_map(v.as_object().unwrap()).unwrap_err();
        assert!(e.to_string().starts_with("inputs.x:"), "{e}");
    }
}
