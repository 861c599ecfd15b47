//! The task's `resource_meta`: `{"databricks_instance": "...", "run_id": "..."}`,
//! the field names upstream's connector uses, so a run created by upstream's
//! agent can be polled and cancelled by this service and the other way round.
//! Upstream's newer connector also stores the bearer token (`auth_token`) there;
//! this service never writes it and ignores it when reading.

use serde::{Deserialize, Deserializer, Serialize};

/// What `get` and `delete` need to find a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The workspace host (no scheme), as upstream stores it.
    pub databricks_instance: String,
    /// The run id, as a decimal string (upstream's type); a number is accepted too.
    #[serde(deserialize_with = "string_or_number")]
    pub run_id: String,
    /// How the run was authorized when not with the personal access token
    /// (`oauth_m2m`), so `get` and `delete` authenticate the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_type: Option<String>,
    /// The OAuth service principal, with `auth_type = oauth_m2m` (an id, not a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        N(u64),
    }
    match Id::deserialize(d)? {
        Id::S(s) => Ok(s),
        Id::N(n) => Ok(n.to_string()),
    }
}

impl Meta {
    /// The bytes stored by propeller.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("strings always serialize")
    }

    /// Reads `resource_meta`. The error never quotes the bytes (upstream's
    /// metas may hold a token).
    ///
    /// # Errors
    /// A message saying what is wrong, without the content.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.is_empty() {
            return Err("resource_meta is empty".to_owned());
        }
        let meta: Self = serde_json::from_slice(bytes).map_err(|e| {
            // Valid JSON of the wrong shape: name the field (serde's own message may quote a value).
            if let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice::<serde_json::Value>(bytes) {
                match (fields.get("databricks_instance"), fields.get("run_id")) {
                    (None, _) => return "resource_meta has no databricks_instance: not a Databricks run's".into(),
                    (_, None) => return "resource_meta has no run_id: not a Databricks run's".into(),
                    (Some(v), _) if !v.is_string() => return "resource_meta.databricks_instance is not a string".into(),
                    (_, Some(v)) if !v.is_string() && !v.is_u64() => {
                        return "resource_meta.run_id is neither a string nor a whole number".into();
                    }
                    _ => {}
                }
            }
            format!(
                "resource_meta is not a Databricks run's (expected JSON with string fields databricks_instance \
                 and run_id): {:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            )
        })?;
        if meta.databricks_instance.is_empty() {
            return Err("resource_meta.databricks_instance is empty".to_owned());
        }
        if meta.run_id.is_empty() || !meta.run_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err("resource_meta.run_id is not a decimal run id".to_owned());
        }
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_upstream_field_names() {
        let m = Meta {
            databricks_instance: "a.cloud.databricks.com".into(),
            run_id: "42".into(),
            ..Meta::default()
        };
        let bytes = m.encode();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
            serde_json::json!({ "databricks_instance": "a.cloud.databricks.com", "run_id": "42" })
        );
        assert_eq!(Meta::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn reads_upstream_metas_and_drops_their_token() {
        let upstream = br#"{"databricks_instance": "h", "run_id": "7", "auth_token": "dapi-secret"}"#;
        let m = Meta::decode(upstream).unwrap();
        assert_eq!(m, Meta { databricks_instance: "h".into(), run_id: "7".into(), ..Meta::default() });
        assert!(!String::from_utf8(m.encode()).unwrap().contains("dapi"));
        assert_eq!(Meta::decode(br#"{"databricks_instance":"h","run_id":8}"#).unwrap().run_id, "8");
    }

    #[test]
    fn bad_metas_are_named_without_their_content() {
        for (bytes, want) in [
            (&b""[..], "empty"),
            (b"{", "not a Databricks run's"),
            (br#"{"databricks_instance":"h","run_id":"dapi-secret"}"#, "not a decimal"),
            (br#"{"databricks_instance":"","run_id":"1"}"#, "databricks_instance is empty"),
            (br#"{"databricks_instance":"dapi-secret","run_id":true}"#, "run_id is neither a string nor"),
            (br#"{}"#, "has no databricks_instance"),
            (br#"{"databricks_instance":"h"}"#, "has no run_id"),
            (br#"{"databricks_instance":7,"run_id":"1"}"#, "databricks_instance is not a string"),
            (br#"[1]"#, "not a Databricks run's"),
        ] {
            let e = Meta::decode(bytes).unwrap_err();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("dapi"), "{e}");
        }
    }
}
