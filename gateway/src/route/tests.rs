use flotilla_sdk::proto::{admin, core};
use prost::Message;

use super::*;

fn template(kind: &str, version: i32) -> core::TaskTemplate {
    core::TaskTemplate {
        r#type: kind.to_owned(),
        task_type_version: version,
        config: [("k".to_owned(), "v".to_owned())].into(),
        ..Default::default()
    }
}

#[test]
fn create_key_reads_type_and_version() {
    let req = admin::CreateTaskRequest {
        template: Some(template("bigquery_query_job_task", 3)),
        output_prefix: "s3://bucket/x".into(),
        ..Default::default()
    };
    let bytes = req.encode_to_vec();
    assert_eq!(create_key(&bytes).unwrap(), Key { name: "bigquery_query_job_task", version: 3 });
}

#[test]
fn negative_versions_survive_sign_extension() {
    let req = admin::CreateTaskRequest { template: Some(template("echo", -2)), ..Default::default() };
    assert_eq!(create_key(&req.encode_to_vec()).unwrap().version, -2);
}

#[test]
fn execute_sync_key_reads_the_header_template() {
    let req = admin::ExecuteTaskSyncRequest {
        part: Some(admin::execute_task_sync_request::Part::Header(admin::CreateRequestHeader {
            template: Some(template("echo_sync", 0)),
            ..Default::default()
        })),
    };
    assert_eq!(execute_sync_key(&req.encode_to_vec()).unwrap(), Key { name: "echo_sync", version: 0 });
    let inputs_first = admin::ExecuteTaskSyncRequest {
        part: Some(admin::execute_task_sync_request::Part::Inputs(core::LiteralMap::default())),
    };
    assert!(matches!(execute_sync_key(&inputs_first.encode_to_vec()), Err(KeyError::Missing(_))));
}

#[test]
#[allow(deprecated)]
fn category_wins_over_the_deprecated_task_type() {
    let req = admin::GetTaskRequest {
        task_type: "old".into(),
        task_category: Some(admin::TaskCategory { name: "new".into(), version: 1 }),
        resource_meta: b"{}".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        category_key(&req.encode_to_vec(), "GetTaskRequest", 3).unwrap(),
        Key { name: "new", version: 1 }
    );
    let old_only = admin::DeleteTaskRequest { task_type: "old".into(), ..Default::default() };
    assert_eq!(
        category_key(&old_only.encode_to_vec(), "DeleteTaskRequest", 3).unwrap(),
        Key { name: "old", version: 0 }
    );
    let neither = admin::DeleteTaskRequest::default();
    assert!(matches!(
        category_key(&neither.encode_to_vec(), "DeleteTaskRequest", 3),
        Err(KeyError::Missing(_))
    ));
}

#[test]
fn unknown_fields_are_skipped() {
    let mut bytes = admin::CreateTaskRequest { template: Some(template("echo", 0)), ..Default::default() }
        .encode_to_vec();
    // field 99, length-delimited, 3 bytes; and field 100 as a fixed64
    bytes.extend_from_slice(&[0x9a, 0x06, 3, b'a', b'b', b'c', 0xa1, 0x06, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(create_key(&bytes).unwrap().name, "echo");
}

/// Groups (proto2's encoding of a nested message) in unknown fields are skipped, as decoders skip them.
#[test]
fn unknown_groups_are_skipped_as_decoders_skip_them() {
    let request = admin::CreateTaskRequest { template: Some(template("echo", 3)), ..Default::default() };
    // Field 99 as a group holding a varint, field 100 as a nested group with a string, and the end.
    let group = [0x9b, 0x06, 0x08, 0x01, 0xa3, 0x06, 0x0a, 0x01, b'x', 0xa4, 0x06, 0x9c, 0x06];
    for bytes in
        [[&group[..], &request.encode_to_vec()].concat(), [request.encode_to_vec(), group.to_vec()].concat()]
    {
        admin::CreateTaskRequest::decode(bytes.as_slice()).expect("prost skips the group too");
        assert_eq!(create_key(&bytes).unwrap(), Key { name: "echo", version: 3 });
    }
    let mut deep = Vec::new();
    for _ in 0..100 {
        deep.extend_from_slice(&[0x9b, 0x06]);
    }
    for broken in [
        &[0x9b, 0x06, 0x08, 0x01][..], // never ends
        &[0x9b, 0x06, 0xa4, 0x06],     // ends with another field's number
        &[0x9c, 0x06],                 // ends without starting
        &deep,
    ] {
        assert!(matches!(create_key(broken), Err(KeyError::Malformed { .. })), "{broken:?}");
    }
}

#[test]
fn garbage_is_malformed_not_a_panic() {
    for garbage in [&b"\xff\xff\xff\xff\x0f"[..], b"\x12\x05ab", b"\x0b", b"\x12\x80", b"\x00"] {
        assert!(matches!(create_key(garbage), Err(KeyError::Malformed { .. })), "{garbage:?}");
    }
}

/// Concatenated encodings are one message to a decoder, merged: a repeated
/// submessage's fields combine, the last of each scalar winning.
#[test]
fn a_submessage_sent_in_parts_is_read_merged_as_a_decoder_reads_it() {
    let first = admin::CreateTaskRequest { template: Some(template("echo", 0)), ..Default::default() };
    let second = admin::CreateTaskRequest {
        template: Some(core::TaskTemplate { task_type_version: 2, ..Default::default() }),
        ..Default::default()
    };
    let bytes = [first.encode_to_vec(), second.encode_to_vec()].concat();
    let decoded = admin::CreateTaskRequest::decode(bytes.as_slice()).unwrap().template.unwrap();
    assert_eq!((decoded.r#type.as_str(), decoded.task_type_version), ("echo", 2));
    assert_eq!(create_key(&bytes).unwrap(), Key { name: "echo", version: 2 });
    // And the last type wins.
    let third = admin::CreateTaskRequest { template: Some(template("other", 0)), ..Default::default() };
    let bytes = [bytes, third.encode_to_vec()].concat();
    assert_eq!(create_key(&bytes).unwrap(), Key { name: "other", version: 2 });

    let header = |t: core::TaskTemplate| admin::ExecuteTaskSyncRequest {
        part: Some(admin::execute_task_sync_request::Part::Header(admin::CreateRequestHeader {
            template: Some(t),
            ..Default::default()
        })),
    };
    let bytes = [
        header(template("echo_sync", 0)).encode_to_vec(),
        header(core::TaskTemplate { task_type_version: 4, ..Default::default() }).encode_to_vec(),
    ]
    .concat();
    assert_eq!(execute_sync_key(&bytes).unwrap(), Key { name: "echo_sync", version: 4 });
    // `header` and `inputs` are a oneof: inputs clear the header, and a header after them starts afresh.
    let inputs = admin::ExecuteTaskSyncRequest {
        part: Some(admin::execute_task_sync_request::Part::Inputs(core::LiteralMap::default())),
    }
    .encode_to_vec();
    let reset = [
        header(template("echo_sync", 1)).encode_to_vec(),
        inputs.clone(),
        header(template("other", 0)).encode_to_vec(),
    ]
    .concat();
    let decoded = admin::ExecuteTaskSyncRequest::decode(reset.as_slice()).unwrap();
    let Some(admin::execute_task_sync_request::Part::Header(h)) = decoded.part else { panic!("a header") };
    let t = h.template.unwrap();
    assert_eq!((t.r#type.as_str(), t.task_type_version), ("other", 0));
    assert_eq!(execute_sync_key(&reset).unwrap(), Key { name: "other", version: 0 });
    let inputs_last = [header(template("echo_sync", 0)).encode_to_vec(), inputs].concat();
    assert!(matches!(execute_sync_key(&inputs_last), Err(KeyError::Missing(_))));

    let category = |name: &str, version| admin::GetTaskRequest {
        task_category: Some(admin::TaskCategory { name: name.into(), version }),
        ..Default::default()
    };
    let bytes = [category("echo", 0).encode_to_vec(), category("", 3).encode_to_vec()].concat();
    assert_eq!(category_key(&bytes, "GetTaskRequest", 3).unwrap(), Key { name: "echo", version: 3 });
}
