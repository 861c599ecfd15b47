//! Proves our `.proto` files are wire-identical to upstream flyteidl.
//!
//! `upstream_descriptors.py` dumps the descriptors shipped in the `flyteidl`
//! PyPI package (the version in [`UPSTREAM_VERSION`]); this test walks every
//! message and enum reachable from the three agent services in both sets and
//! fails on any difference in names, numbers, types, labels, oneofs, reserved
//! ranges, map entries or streaming shape. Every difference is listed at once.
//!
//! It needs a Python with that package: `FLOTILLA_PYTHON`, or else the
//! workspace's `.venv/bin/python` that `scripts/setup-python` creates.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
};

use prost::Message;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorSet,
    field_descriptor_proto::{Label, Type},
};

const UPSTREAM_VERSION: &str = "1.16.8";
const SERVICES: &[&str] = &[
    ".flyteidl.service.AsyncAgentService",
    ".flyteidl.service.SyncAgentService",
    ".flyteidl.service.AgentMetadataService",
];

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FLOTILLA_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with flyteidl=={UPSTREAM_VERSION}: run scripts/setup-python \
         (creates .venv) or set FLOTILLA_PYTHON"
    );
    venv
}

fn upstream() -> FileDescriptorSet {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/upstream_descriptors.py");
    let out = Command::new(python()).arg(script).arg(UPSTREAM_VERSION).output().expect("python starts");
    assert!(
        out.status.success(),
        "dumping upstream descriptors failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    FileDescriptorSet::decode(out.stdout.as_slice()).expect("upstream descriptor set decodes")
}

/// Every message and enum of a descriptor set by full name (`.pkg.Outer.Inner`), and the services.
#[derive(Default)]
struct Index {
    messages: BTreeMap<String, DescriptorProto>,
    enums: BTreeMap<String, EnumDescriptorProto>,
    services: BTreeMap<String, prost_types::ServiceDescriptorProto>,
}

impl Index {
    fn new(set: &FileDescriptorSet) -> Self {
        let mut index = Index::default();
        for file in &set.file {
            let prefix = format!(".{}", file.package());
            for m in &file.message_type {
                index.add_message(&prefix, m);
            }
            for e in &file.enum_type {
                index.enums.insert(format!("{prefix}.{}", e.name()), e.clone());
            }
            for s in &file.service {
                index.services.insert(format!("{prefix}.{}", s.name()), s.clone());
            }
        }
        index
    }

    fn add_message(&mut self, prefix: &str, m: &DescriptorProto) {
        let name = format!("{prefix}.{}", m.name());
        for nested in &m.nested_type {
            self.add_message(&name, nested);
        }
        for e in &m.enum_type {
            self.enums.insert(format!("{name}.{}", e.name()), e.clone());
        }
        self.messages.insert(name, m.clone());
    }

    /// Names of the messages and enums reachable from the agent services' methods.
    fn reachable(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut messages = BTreeSet::new();
        let mut enums = BTreeSet::new();
        let mut todo: Vec<String> = Vec::new();
        for service in SERVICES {
            let s = self.services.get(*service).unwrap_or_else(|| panic!("{service} missing"));
            for m in &s.method {
                todo.push(m.input_type().to_owned());
                todo.push(m.output_type().to_owned());
            }
        }
        while let Some(name) = todo.pop() {
            if self.enums.contains_key(&name) {
                enums.insert(name);
                continue;
            }
            if !messages.insert(name.clone()) {
                continue;
            }
            let Some(m) = self.messages.get(&name) else {
                continue; // reported by the comparison as missing
            };
            todo.extend(m.field.iter().filter(|f| f.type_name.is_some()).map(|f| f.type_name().to_owned()));
        }
        (messages, enums)
    }
}

/// The wire-relevant facts of a field, in a form that compares and prints.
fn field_facts(m: &DescriptorProto, f: &FieldDescriptorProto) -> String {
    let oneof = f.oneof_index.map(|i| m.oneof_decl[i as usize].name().to_owned()).unwrap_or_default();
    format!(
        "name={} label={:?} type={:?} type_name={} oneof={oneof} proto3_optional={} json_name={} deprecated={}",
        f.name(),
        Label::try_from(f.label.unwrap_or_default()).ok(),
        Type::try_from(f.r#type.unwrap_or_default()).ok(),
        f.type_name(),
        f.proto3_optional(),
        f.json_name(),
        f.options.as_ref().is_some_and(|o| o.deprecated()),
    )
}

fn compare_message(name: &str, ours: &DescriptorProto, theirs: &DescriptorProto, diffs: &mut Vec<String>) {
    let facts = |m: &DescriptorProto| -> BTreeMap<i32, String> {
        m.field.iter().map(|f| (f.number(), field_facts(m, f))).collect()
    };
    let (o, t) = (facts(ours), facts(theirs));
    for number in o.keys().chain(t.keys()).collect::<BTreeSet<_>>() {
        match (o.get(number), t.get(number)) {
            (Some(a), Some(b)) if a == b => {}
            (a, b) => diffs.push(format!("{name} field {number}: ours [{a:?}] upstream [{b:?}]")),
        }
    }
    let oneofs = |m: &DescriptorProto| m.oneof_decl.iter().map(|o| o.name().to_owned()).collect::<Vec<_>>();
    if oneofs(ours) != oneofs(theirs) {
        diffs.push(format!("{name} oneofs: ours {:?} upstream {:?}", oneofs(ours), oneofs(theirs)));
    }
    let reserved = |m: &DescriptorProto| {
        let ranges: BTreeSet<_> = m.reserved_range.iter().map(|r| (r.start(), r.end())).collect();
        let names: BTreeSet<_> = m.reserved_name.iter().cloned().collect();
        (ranges, names)
    };
    if reserved(ours) != reserved(theirs) {
        diffs.push(format!("{name} reserved: ours {:?} upstream {:?}", reserved(ours), reserved(theirs)));
    }
    let map_entry = |m: &DescriptorProto| m.options.as_ref().is_some_and(|o| o.map_entry());
    if map_entry(ours) != map_entry(theirs) {
        diffs.push(format!("{name} map_entry: ours {} upstream {}", map_entry(ours), map_entry(theirs)));
    }
}

fn compare_enum(
    name: &str,
    ours: &EnumDescriptorProto,
    theirs: &EnumDescriptorProto,
    diffs: &mut Vec<String>,
) {
    let values = |e: &EnumDescriptorProto| {
        e.value.iter().map(|v| (v.name().to_owned(), v.number())).collect::<Vec<_>>()
    };
    if values(ours) != values(theirs) {
        diffs.push(format!("enum {name}: ours {:?} upstream {:?}", values(ours), values(theirs)));
    }
}

#[test]
fn agent_protocol_is_wire_identical_to_upstream_flyteidl() {
    let ours = Index::new(
        &FileDescriptorSet::decode(flotilla_proto::FILE_DESCRIPTOR_SET).expect("our descriptor set decodes"),
    );
    let theirs = Index::new(&upstream());
    let mut diffs = Vec::new();

    for service in SERVICES {
        let shape = |i: &Index| {
            i.services.get(*service).map(|s| {
                s.method
                    .iter()
                    .map(|m| {
                        (
                            m.name().to_owned(),
                            m.input_type().to_owned(),
                            m.output_type().to_owned(),
                            m.client_streaming(),
                            m.server_streaming(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        };
        if shape(&ours) != shape(&theirs) {
            diffs.push(format!("service {service}: ours {:?} upstream {:?}", shape(&ours), shape(&theirs)));
        }
    }

    let (their_messages, their_enums) = theirs.reachable();
    let (our_messages, our_enums) = ours.reachable();
    for name in their_messages.symmetric_difference(&our_messages) {
        diffs.push(format!("message {name} is reachable in only one of the two sets"));
    }
    for name in their_enums.symmetric_difference(&our_enums) {
        diffs.push(format!("enum {name} is reachable in only one of the two sets"));
    }
    for name in &their_messages {
        if let (Some(o), Some(t)) = (ours.messages.get(name), theirs.messages.get(name)) {
            compare_message(name, o, t, &mut diffs);
        }
    }
    for name in &their_enums {
        if let (Some(o), Some(t)) = (ours.enums.get(name), theirs.enums.get(name)) {
            compare_enum(name, o, t, &mut diffs);
        }
    }
    // Enums nested in messages that are not themselves reachable (TaskExecution.Phase, ...)
    // still carry their enclosing message's name on the wire descriptors.

    assert!(
        diffs.is_empty(),
        "{} differences from flyteidl {UPSTREAM_VERSION}:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    // Sanity: the walk really covered the surface (112 messages and 22 enums in 1.16.8).
    assert_eq!((their_messages.len(), their_enums.len()), (112, 22), "upstream surface changed size");
}
