//! The routing key: which task category a request addresses, read straight
//! from the protobuf bytes of the request message without decoding anything
//! else and without copying; and the route table from categories to plugins.
//!
//! Field paths (PROTOCOL.md §1.2):
//! - CreateTaskRequest: `template`(2) → `type`(2), `task_type_version`(7)
//! - ExecuteTaskSyncRequest: `header`(1) → `template`(1) → the same
//! - Get/Delete/Metrics/Logs: `task_category` (3, 3, 7, 5) → `name`(1), `version`(2),
//!   else the deprecated `task_type`(1) at version 0.

use std::{collections::HashMap, fmt};

use flotilla_sdk::Category;

/// Why the routing key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The bytes are not a valid protobuf message.
    #[error("the request is not a valid {message}: {reason}")]
    Malformed {
        /// The message type expected.
        message: &'static str,
        /// What was wrong.
        reason: &'static str,
    },
    /// The message is valid but names no task type.
    #[error("{0}")]
    Missing(&'static str),
}

/// A borrowed routing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key<'a> {
    /// Task type name.
    pub name: &'a str,
    /// Task type version.
    pub version: i32,
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} v{}", self.name, self.version)
    }
}

/// A protobuf field as the scanner sees it.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Other,
}

/// Iterates over the top-level fields of one message, validating structure as it goes.
struct Fields<'a> {
    buf: &'a [u8],
    message: &'static str,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8], message: &'static str) -> Self {
        Self { buf, message }
    }

    fn malformed(&self, reason: &'static str) -> KeyError {
        KeyError::Malformed { message: self.message, reason }
    }

    fn varint(&mut self) -> Result<u64, KeyError> {
        let mut value = 0u64;
        for i in 0..10 {
            let Some((&b, rest)) = self.buf.split_first() else {
                return Err(self.malformed("truncated varint"));
            };
            self.buf = rest;
            if i == 9 && b > 1 {
                return Err(self.malformed("varint longer than 64 bits"));
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.malformed("varint longer than 64 bits"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], KeyError> {
        if self.buf.len() < n {
            return Err(self.malformed("a field runs past the end of the message"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next field's number and value, or `None` at the end.
    fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, KeyError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let (number, wire) = self.tag()?;
        if wire == END_GROUP {
            return Err(self.malformed("a group ends that never started"));
        }
        Ok(Some((number, self.value(number, wire, 0)?)))
    }

    /// A field's number and wire type.
    fn tag(&mut self) -> Result<(u32, u64), KeyError> {
        let tag = self.varint()?;
        let number = tag >> 3;
        if number == 0 || number > (1 << 29) - 1 {
            return Err(self.malformed("invalid field number"));
        }
        Ok((number as u32, tag & 7))
    }

    /// The value of field `number`, of wire type `wire`. A group (proto2's
    /// encoding of a nested message, which decoders still skip as an unknown
    /// field) is skipped to its end; `depth` is how many groups enclose it.
    fn value(&mut self, number: u32, wire: u64, depth: u32) -> Result<Value<'a>, KeyError> {
        Ok(match wire {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Other
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| self.malformed("length overflows"))?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Other
            }
            START_GROUP => {
                if depth >= MAX_GROUP_DEPTH {
                    return Err(self.malformed("groups nested too deep"));
                }
                loop {
                    if self.buf.is_empty() {
                        return Err(self.malformed("a group runs past the end of the message"));
                    }
                    let (n, w) = self.tag()?;
                    if w == END_GROUP {
                        if n != number {
                            return Err(self.malformed("a group ends with another field's number"));
                        }
                        break Value::Other;
                    }
                    self.value(n, w, depth + 1)?;
                }
            }
            _ => return Err(self.malformed("invalid wire type")),
        })
    }
}

/// Wire types of a group's start and end tags.
const START_GROUP: u64 = 3;
const END_GROUP: u64 = 4;
/// How deeply groups may nest (prost's recursion limit is 100).
const MAX_GROUP_DEPTH: u32 = 64;

/// Calls `visit` on each occurrence of the submessage `field` of `buf`, in
/// order, and says whether there was one. A submessage that occurs more than
/// once is one message to a decoder, the occurrences merged (its scalar
/// fields: the last one wins), so folding the key fields over every
/// occurrence reads what the plugin's full decode will.
fn each_message<'a>(
    buf: &'a [u8],
    message: &'static str,
    field: u32,
    mut visit: impl FnMut(&'a [u8]) -> Result<(), KeyError>,
) -> Result<bool, KeyError> {
    let mut fields = Fields::new(buf, message);
    let mut seen = false;
    while let Some((n, v)) = fields.next_field()? {
        if n == field {
            match v {
                Value::Bytes(b) => {
                    seen = true;
                    visit(b)?;
                }
                _ => return Err(fields.malformed("a message field has the wrong wire type")),
            }
        }
    }
    Ok(seen)
}

fn utf8<'a>(b: &'a [u8], message: &'static str) -> Result<&'a str, KeyError> {
    std::str::from_utf8(b).map_err(|_| KeyError::Malformed { message, reason: "a string field is not UTF-8" })
}

/// `TaskTemplate.type` and `task_type_version`, folded over every occurrence of the template.
#[derive(Default)]
struct TemplateKey<'a> {
    name: &'a str,
    version: i32,
}

impl<'a> TemplateKey<'a> {
    fn merge(&mut self, template: &'a [u8]) -> Result<(), KeyError> {
        const M: &str = "TaskTemplate";
        let mut fields = Fields::new(template, M);
        while let Some((n, v)) = fields.next_field()? {
            match (n, v) {
                (2, Value::Bytes(b)) => self.name = utf8(b, M)?,
                (7, Value::Varint(x)) => self.version = x as i32, // int32 is sign-extended to 64 bits on the wire
                (2 | 7, _) => {
                    return Err(fields.malformed("type or task_type_version has the wrong wire type"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Key<'a>, KeyError> {
        if self.name.is_empty() {
            return Err(KeyError::Missing("template.type is required"));
        }
        Ok(Key { name: self.name, version: self.version })
    }
}

/// The key of a CreateTaskRequest.
pub fn create_key(body: &[u8]) -> Result<Key<'_>, KeyError> {
    let mut key = TemplateKey::default();
    if !each_message(body, "CreateTaskRequest", 2, |t| key.merge(t))? {
        return Err(KeyError::Missing("template is required"));
    }
    key.finish()
}

/// The key of the first (header) ExecuteTaskSyncRequest. Its `header`(1) and
/// `inputs`(2) are one oneof (`part`): an `inputs` clears the header read so
/// far, as it does for a decoder, and a `header` after it starts afresh.
pub fn execute_sync_key(body: &[u8]) -> Result<Key<'_>, KeyError> {
    const M: &str = "ExecuteTaskSyncRequest";
    let mut fields = Fields::new(body, M);
    let mut key = TemplateKey::default();
    let (mut header, mut templates) = (false, false);
    while let Some((n, v)) = fields.next_field()? {
        match (n, v) {
            (1, Value::Bytes(h)) => {
                header = true;
                templates |= each_message(h, "CreateRequestHeader", 1, |t| key.merge(t))?;
            }
            (2, Value::Bytes(_)) => (key, header, templates) = (TemplateKey::default(), false, false),
            (1 | 2, _) => return Err(fields.malformed("a message field has the wrong wire type")),
            _ => {}
        }
    }
    if !header {
        return Err(KeyError::Missing("the first ExecuteTaskSync message must be the header"));
    }
    if !templates {
        return Err(KeyError::Missing("header.template is required"));
    }
    key.finish()
}

/// The key of a Get/Delete/GetTaskMetrics/GetTaskLogs request whose
/// `task_category` is field `category_field`.
pub fn category_key<'a>(
    body: &'a [u8],
    message: &'static str,
    category_field: u32,
) -> Result<Key<'a>, KeyError> {
    const M: &str = "TaskCategory";
    let mut fields = Fields::new(body, message);
    let mut task_type = "";
    // `task_category`'s fields, folded over every occurrence as a decoder merges them.
    let (mut name, mut version) = ("", 0i32);
    while let Some((n, v)) = fields.next_field()? {
        match (n, v) {
            (1, Value::Bytes(b)) => task_type = utf8(b, message)?,
            (n, Value::Bytes(category)) if n == category_field => {
                let mut fields = Fields::new(category, M);
                while let Some((n, v)) = fields.next_field()? {
                    match (n, v) {
                        (1, Value::Bytes(b)) => name = utf8(b, M)?,
                        (2, Value::Varint(x)) => version = x as i32,
                        (1 | 2, _) => return Err(fields.malformed("name or version has the wrong wire type")),
                        _ => {}
                    }
                }
            }
            (1, _) => return Err(fields.malformed("task_type has the wrong wire type")),
            (n, _) if n == category_field => {
                return Err(fields.malformed("task_category has the wrong wire type"));
            }
            _ => {}
        }
    }
    if !name.is_empty() {
        return Ok(Key { name, version });
    }
    if task_type.is_empty() {
        return Err(KeyError::Missing("task_category (or the deprecated task_type) is required"));
    }
    Ok(Key { name: task_type, version: 0 })
}

/// Validates that `body` is a well-formed message (used for requests the
/// gateway answers itself or forwards without a key).
pub fn validate(body: &[u8], message: &'static str) -> Result<(), KeyError> {
    let mut fields = Fields::new(body, message);
    while fields.next_field()?.is_some() {}
    Ok(())
}

/// Which plugin serves each category. Rebuilt whole on every refresh and
/// swapped in atomically, so the request path never takes a lock.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Task type name → version → plugin index. Two levels so a borrowed
    /// `&str` from the request bytes looks up without allocating.
    routes: HashMap<String, HashMap<i32, usize>>,
}

impl RouteTable {
    /// A table from (category → index of the plugin in the config).
    pub fn new(routes: HashMap<Category, usize>) -> Self {
        let mut by_name: HashMap<String, HashMap<i32, usize>> = HashMap::new();
        for (c, i) in routes {
            by_name.entry(c.name).or_default().insert(c.version, i);
        }
        Self { routes: by_name }
    }

    /// The plugin index serving `key`.
    pub fn lookup(&self, key: Key<'_>) -> Option<usize> {
        self.routes.get(key.name)?.get(&key.version).copied()
    }

    /// Every known category, sorted, for error messages.
    pub fn known(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .routes
            .iter()
            .flat_map(|(name, versions)| {
                versions.keys().map(move |v| Category::new(name.clone(), *v).to_string())
            })
            .collect();
        all.sort();
        all
    }
}

#[cfg(test)]
mod tests;
