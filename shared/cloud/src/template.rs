//! Reading what flytekit's plugins put in a `TaskTemplate`, and building the outputs and log
//! links upstream's agents answer with.

use std::collections::BTreeMap;

use flotilla_proto::core::{
    self, Literal, LiteralMap, StructuredDataset, StructuredDatasetMetadata, TaskLog, TaskTemplate, literal,
    literal_type, primitive, scalar,
};
use prost_types::{Struct, value::Kind};
use serde_json::{Map, Number, Value};

/// A `google.protobuf.Struct` as JSON. Struct numbers are all doubles on the wire (flytekit's
/// `num_workers: 2` arrives as `2.0`); integral ones become JSON integers, which every REST API
/// we call accepts where it expects an integer.
pub fn struct_to_json(s: &Struct) -> Value {
    Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect::<Map<_, _>>())
}

/// A `google.protobuf.Value` as JSON (see [`struct_to_json`] for numbers).
pub fn value_to_json(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => number(*n),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
    }
}

fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        Value::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

/// The template's `custom` struct as a JSON object (empty when unset).
pub fn custom_json(template: &TaskTemplate) -> Map<String, Value> {
    match template.custom.as_ref().map(struct_to_json) {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// An input as a plain value, for query parameters and bindings.
#[derive(Clone, Debug, PartialEq)]
pub enum Native {
    /// `int`.
    Int(i64),
    /// `float`.
    Float(f64),
    /// `str`.
    Str(String),
    /// `bool`.
    Bool(bool),
    /// `datetime` (UTC).
    Datetime(prost_types::Timestamp),
    /// `timedelta`.
    Duration(prost_types::Duration),
    /// `list` of any of these.
    List(Vec<Native>),
    /// `None` (an `Optional` input left unset).
    Null,
}

impl Native {
    /// The value as text (datetimes as `YYYY-MM-DDTHH:MM:SS.ffffff`, UTC; durations in seconds).
    pub fn to_text(&self) -> String {
        match self {
            Self::Int(i) => i.to_string(),
            Self::Float(f) => f.to_string(),
            Self::Str(s) => s.clone(),
            Self::Bool(b) => b.to_string(),
            Self::Datetime(t) => format_datetime(t),
            Self::Duration(d) => format!("{}", d.seconds as f64 + f64::from(d.nanos) / 1e9),
            Self::List(items) => {
                format!("[{}]", items.iter().map(Self::to_text).collect::<Vec<_>>().join(", "))
            }
            Self::Null => "NULL".to_owned(),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffff` in UTC (the form BigQuery's client sends datetimes in).
pub fn format_datetime(t: &prost_types::Timestamp) -> String {
    let days = t.seconds.div_euclid(86_400);
    let secs = t.seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        t.nanos.max(0) / 1000
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The inputs as plain values, by name (sorted).
///
/// # Errors
/// Names an input that is not a primitive or a list of primitives (files, dataframes, structs).
pub fn native_inputs(inputs: Option<&LiteralMap>) -> Result<BTreeMap<String, Native>, String> {
    let mut out = BTreeMap::new();
    for (name, literal) in inputs.map(|m| &m.literals).into_iter().flatten() {
        let value = native(literal).map_err(|kind| {
            format!("input `{name}` is {kind}; only int, float, str, bool, datetime, timedelta, None and lists of them can be bound")
        })?;
        out.insert(name.clone(), value);
    }
    Ok(out)
}

fn native(literal: &Literal) -> Result<Native, &'static str> {
    match &literal.value {
        Some(literal::Value::Scalar(s)) => match &s.value {
            Some(scalar::Value::Primitive(p)) => match &p.value {
                Some(primitive::Value::Integer(i)) => Ok(Native::Int(*i)),
                Some(primitive::Value::FloatValue(f)) => Ok(Native::Float(*f)),
                Some(primitive::Value::StringValue(s)) => Ok(Native::Str(s.clone())),
                Some(primitive::Value::Boolean(b)) => Ok(Native::Bool(*b)),
                Some(primitive::Value::Datetime(t)) => Ok(Native::Datetime(*t)),
                Some(primitive::Value::Duration(d)) => Ok(Native::Duration(*d)),
                None => Err("an empty primitive"),
            },
            Some(scalar::Value::Union(u)) => u.value.as_deref().map_or(Err("an empty union"), native),
            Some(scalar::Value::Blob(_)) => Err("a file or directory (blob)"),
            Some(scalar::Value::StructuredDataset(_) | scalar::Value::Schema(_)) => Err("a dataframe"),
            Some(scalar::Value::Generic(_) | scalar::Value::Binary(_)) => Err("a struct or dataclass"),
            Some(scalar::Value::NoneType(_)) => Ok(Native::Null),
            Some(scalar::Value::Error(_)) => Err("an error"),
            None => Err("an empty scalar"),
        },
        Some(literal::Value::Collection(c)) => {
            c.literals.iter().map(native).collect::<Result<Vec<_>, _>>().map(Native::List)
        }
        Some(literal::Value::Map(_)) => Err("a dict"),
        Some(literal::Value::OffloadedMetadata(_)) => Err("offloaded (too large to pass inline)"),
        None => Err("empty"),
    }
}

/// The template's SQL statement (`TaskTemplate.sql.statement`), trimmed; `None` when there is
/// none or it is blank.
pub fn sql_statement(template: &TaskTemplate) -> Option<&str> {
    match &template.target {
        Some(core::task_template::Target::Sql(sql)) => Some(sql.statement.trim()).filter(|s| !s.is_empty()),
        _ => None,
    }
}

/// The template's container, if its target is one.
pub fn container(template: &TaskTemplate) -> Option<&core::Container> {
    match &template.target {
        Some(core::task_template::Target::Container(c)) => Some(c),
        _ => None,
    }
}

/// Whether the template's interface declares the output `name`.
pub fn has_output(template: &TaskTemplate, name: &str) -> bool {
    template
        .interface
        .as_ref()
        .and_then(|i| i.outputs.as_ref())
        .is_some_and(|o| o.variables.contains_key(name))
}

/// The outputs `{name: StructuredDataset(uri)}`, with the dataset type the interface declares for
/// `name` (columns and format), as flytekit's type engine would write it.
pub fn structured_dataset_output(template: &TaskTemplate, name: &str, uri: String) -> LiteralMap {
    let declared = template
        .interface
        .as_ref()
        .and_then(|i| i.outputs.as_ref())
        .and_then(|o| o.variables.get(name))
        .and_then(|v| v.r#type.as_ref())
        .and_then(|t| match &t.r#type {
            Some(literal_type::Type::StructuredDatasetType(s)) => Some(s.clone()),
            _ => None,
        });
    let dataset = StructuredDataset {
        uri,
        metadata: Some(StructuredDatasetMetadata {
            structured_dataset_type: Some(declared.unwrap_or_default()),
        }),
    };
    let literal = Literal {
        value: Some(literal::Value::Scalar(Box::new(core::Scalar {
            value: Some(scalar::Value::StructuredDataset(dataset)),
        }))),
        ..Default::default()
    };
    LiteralMap { literals: [(name.to_owned(), literal)].into_iter().collect() }
}

/// A log link as upstream's agents return them.
pub fn log_link(name: &str, uri: String) -> TaskLog {
    TaskLog { uri, name: name.to_owned(), ..Default::default() }
}

/// 32 random hex characters, for idempotency keys and job ids.
pub fn random_id() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).expect("the system random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_numbers_that_are_integral_become_integers() {
        let s = Struct {
            fields: [
                ("num_workers".to_owned(), prost_types::Value { kind: Some(Kind::NumberValue(2.0)) }),
                ("ratio".to_owned(), prost_types::Value { kind: Some(Kind::NumberValue(0.5)) }),
                ("name".to_owned(), prost_types::Value { kind: Some(Kind::StringValue("x".into())) }),
            ]
            .into_iter()
            .collect(),
        };
        assert_eq!(struct_to_json(&s), serde_json::json!({"num_workers": 2, "ratio": 0.5, "name": "x"}));
    }

    #[test]
    fn datetimes_format_in_utc() {
        let t = prost_types::Timestamp { seconds: 1_700_000_000, nanos: 123_456_789 };
        assert_eq!(format_datetime(&t), "2023-11-14T22:13:20.123456");
        let t = prost_types::Timestamp { seconds: -1, nanos: 0 };
        assert_eq!(format_datetime(&t), "1969-12-31T23:59:59.000000");
        let t = prost_types::Timestamp { seconds: 951_782_400, nanos: 0 }; // a leap day
        assert_eq!(format_datetime(&t), "2000-02-29T00:00:00.000000");
    }

    #[test]
    fn inputs_that_cannot_be_bound_are_named() {
        let blob = Literal {
            value: Some(literal::Value::Scalar(Box::new(core::Scalar {
                value: Some(scalar::Value::Blob(core::Blob::default())),
            }))),
            ..Default::default()
        };
        let map = LiteralMap { literals: [("f".to_owned(), blob)].into_iter().collect() };
        let e = native_inputs(Some(&map)).unwrap_err();
        assert!(e.contains("input `f` is a file or directory"), "{e}");
    }

    #[test]
    fn random_ids_differ() {
        let (a, b) = (random_id(), random_id());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
