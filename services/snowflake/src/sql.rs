//! Turning a Snowflake task's query and inputs into a SQL API request: every input placeholder
//! becomes a positional `?` with its value in `bindings`, never text spliced into the SQL.
//!
//! Two placeholder forms are read, as users of upstream write them:
//! - pyformat `%(name)s`, which upstream's agent hands to the Python connector as parameters
//!   (with inputs present, `%%` is a literal `%` there, so it is here too);
//! - Flyte's Go-template form `{{ .inputs.name }}` (case-insensitive, `.` or `$`), which the
//!   Flyte docs show and Flyte's older in-core plugin rendered as text.
//!
//! The text is read with Snowflake's lexical rules, so that only code and string constants get
//! placeholders substituted:
//! - a single-quoted literal `'...'` ends at a `'` that is neither doubled (`''`) nor escaped by a
//!   backslash (`\'`; a backslash escapes whatever character follows it, which is copied as it is
//!   and never ends the literal nor starts a placeholder; `\%%` is still `\%`);
//! - a dollar-quoted constant `$$...$$` has no escapes and ends at the next `$$` (a `$$` right
//!   after a letter, digit, `_` or `$` is part of an identifier such as `a$$b`, not a quote);
//! - a double-quoted identifier `"..."` (`""` for a `"` inside) is copied verbatim: no
//!   placeholders, strings or comments in it (only `%%` becomes `%`, as everywhere);
//! - comments (`--` and `//` to the end of the line, `/* ... */`) are copied verbatim too.
//!
//! A placeholder that fills a whole string constant (`'{{ .inputs.day }}'`, `$${{ .inputs.day }}$$`)
//! becomes a bare `?`; one inside a longer constant (`'day_{{ .inputs.n }}'`) splits it into a
//! concatenation, closing and reopening with the constant's own delimiter (`'day_' || ? || ''`,
//! `$$day_$$ || ? || $$$$`). A list input expands to one placeholder per element
//! (`IN (%(ids)s)` → `IN (?, ?, ?)`), as the Python connector renders lists.

use std::fmt;

use serde_json::{Map, Value, json};

/// An input value, as the task's interface types it.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// `INTEGER`.
    Int(i64),
    /// `FLOAT`.
    Float(f64),
    /// `STRING`.
    Str(String),
    /// `BOOLEAN`.
    Bool(bool),
    /// `DATETIME`, as text (`2024-01-02 03:04:05+00:00`, as the Python connector renders it).
    Datetime(String),
    /// `DURATION`, as text (`00:01:30`, as the Python connector renders it).
    Duration(String),
    /// A collection of the above.
    List(Vec<Input>),
    /// `None`: the SQL `NULL` literal, as the Python connector renders it (no binding).
    Null,
}

/// One SQL API binding: `{"type": ..., "value": ...}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    /// The Snowflake binding type (`FIXED`, `REAL`, `TEXT`, `BOOLEAN`).
    pub kind: &'static str,
    /// The value, as text (the SQL API takes every value as a string).
    pub value: String,
}

/// A statement with `?` placeholders and the bindings for them, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prepared {
    /// The SQL text to send.
    pub statement: String,
    /// One binding per `?`, first to last.
    pub bindings: Vec<Binding>,
}

impl Prepared {
    /// The `bindings` object of the SQL API request (`{"1": {...}, "2": {...}}`), or `None`
    /// when there are none.
    pub fn bindings_json(&self) -> Option<Value> {
        if self.bindings.is_empty() {
            return None;
        }
        let map: Map<String, Value> = self
            .bindings
            .iter()
            .enumerate()
            .map(|(i, b)| ((i + 1).to_string(), json!({"type": b.kind, "value": b.value})))
            .collect();
        Some(Value::Object(map))
    }
}

/// Why a statement could not be prepared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareError(pub String);

impl fmt::Display for PrepareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PrepareError {}

/// Where the scanner is in the SQL text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    Code,
    /// Inside a string constant; `start` is the byte offset of the output where it opened.
    Quoted {
        start: usize,
        quote: Quote,
    },
    /// Inside a `"..."` identifier.
    Identifier,
    LineComment,
    BlockComment,
}

/// How a string constant is quoted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quote {
    /// `'...'`, with `''` and backslash escapes.
    Single,
    /// `$$...$$`, without escapes.
    Dollar,
}

impl Quote {
    /// The text that opens and closes the constant.
    fn delimiter(self) -> &'static str {
        match self {
            Quote::Single => "'",
            Quote::Dollar => "$$",
        }
    }

    /// Whether `s` starts with the end of the constant (for `'`, not an escaped `''`).
    fn closes(self, s: &str) -> bool {
        match self {
            Quote::Single => s.starts_with('\'') && !s.starts_with("''"),
            Quote::Dollar => s.starts_with("$$"),
        }
    }
}

/// Rewrites `statement`'s placeholders as bindings of `inputs`.
///
/// # Errors
/// A placeholder names no input, or an input's value cannot be bound (an empty or nested list).
pub fn prepare(statement: &str, inputs: &[(String, Input)]) -> Result<Prepared, PrepareError> {
    let lookup = |name: &str| {
        inputs.iter().find(|(n, _)| n == name).map(|(_, v)| v).ok_or_else(|| {
            let known: Vec<&str> = inputs.iter().map(|(n, _)| n.as_str()).collect();
            PrepareError(format!(
                "the query uses the placeholder for input {name:?}, but the task has no such input \
                 (its inputs: {})",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            ))
        })
    };
    let bytes = statement.as_bytes();
    let mut out = String::with_capacity(statement.len());
    let mut bindings = Vec::new();
    let mut ctx = Context::Code;
    let mut i = 0;
    while i < bytes.len() {
        let rest = &statement[i..];
        match ctx {
            Context::LineComment => {
                if bytes[i] == b'\n' {
                    ctx = Context::Code;
                }
            }
            Context::BlockComment => {
                if rest.starts_with("*/") {
                    out.push_str("*/");
                    i += 2;
                    ctx = Context::Code;
                    continue;
                }
            }
            Context::Identifier => {
                if rest.starts_with("\"\"") {
                    out.push_str("\"\"");
                    i += 2;
                    continue;
                }
                // Upstream's pyformat runs over the whole text, identifiers too: `%%` is `%` here as well.
                if !inputs.is_empty() && rest.starts_with("%%") {
                    out.push('%');
                    i += 2;
                    continue;
                }
                if bytes[i] == b'"' {
                    ctx = Context::Code;
                }
            }
            Context::Quoted { quote: Quote::Single, .. } if bytes[i] == b'\\' => {
                // `\%%` is `\%` to upstream's pyformat, which reads the text before Snowflake
                // reads the escape (a LIKE pattern's escaped `%`, say).
                if !inputs.is_empty() && rest[1..].starts_with("%%") {
                    out.push_str("\\%");
                    i += 3;
                    continue;
                }
                // The backslash and the character it escapes (if any: the text may end here).
                let len = 1 + rest[1..].chars().next().map_or(0, char::len_utf8);
                out.push_str(&rest[..len]);
                i += len;
                continue;
            }
            Context::Code | Context::Quoted { .. } => {
                if let Some((name, len)) = placeholder(rest) {
                    let value = lookup(name)?;
                    let marks = bind(name, value, &mut bindings)?;
                    match ctx {
                        Context::Quoted { start, quote } => {
                            let delimiter = quote.delimiter();
                            let whole = out.len() == start + delimiter.len() && quote.closes(&rest[len..]);
                            if whole {
                                // `'<placeholder>'` or `$$<placeholder>$$`: drop the quotes, bind the bare value.
                                out.truncate(start);
                                out.push_str(&marks);
                                i += len + delimiter.len();
                                ctx = Context::Code;
                                continue;
                            }
                            out.push_str(delimiter);
                            out.push_str(" || ");
                            out.push_str(&marks);
                            out.push_str(" || ");
                            out.push_str(delimiter);
                        }
                        _ => out.push_str(&marks),
                    }
                    i += len;
                    continue;
                }
                if !inputs.is_empty() && rest.starts_with("%%") {
                    out.push('%');
                    i += 2;
                    continue;
                }
                match ctx {
                    Context::Quoted { quote, .. } => {
                        if quote == Quote::Single && rest.starts_with("''") {
                            out.push_str("''");
                            i += 2;
                            continue;
                        }
                        if quote.closes(rest) {
                            out.push_str(quote.delimiter());
                            i += quote.delimiter().len();
                            ctx = Context::Code;
                            continue;
                        }
                    }
                    _ if bytes[i] == b'\'' => {
                        ctx = Context::Quoted { start: out.len(), quote: Quote::Single };
                    }
                    _ if rest.starts_with("$$") && !ends_in_word(&statement[..i]) => {
                        ctx = Context::Quoted { start: out.len(), quote: Quote::Dollar };
                        out.push_str("$$");
                        i += 2;
                        continue;
                    }
                    _ if bytes[i] == b'"' => ctx = Context::Identifier,
                    _ if rest.starts_with("--") || rest.starts_with("//") => {
                        ctx = Context::LineComment;
                    }
                    _ if rest.starts_with("/*") => {
                        out.push_str("/*");
                        i += 2;
                        ctx = Context::BlockComment;
                        continue;
                    }
                    _ => {}
                }
            }
        }
        let ch = rest.chars().next().expect("i is below the length, on a char boundary");
        out.push(ch);
        i += ch.len_utf8();
    }
    Ok(Prepared { statement: out, bindings })
}

/// Recognises a placeholder at the start of `s`: the input's name and the placeholder's length.
fn placeholder(s: &str) -> Option<(&str, usize)> {
    if let Some(rest) = s.strip_prefix("%(") {
        let end = rest.find(")s")?;
        let name = &rest[..end];
        return is_ident(name).then_some((name, 2 + end + 2));
    }
    let rest = s.strip_prefix("{{")?;
    let trimmed = rest.trim_start();
    let mut consumed = 2 + (rest.len() - trimmed.len());
    let after_sigil = trimmed.strip_prefix('.').or_else(|| trimmed.strip_prefix('$'))?;
    consumed += 1;
    let word = after_sigil.get(..7)?;
    if !word.eq_ignore_ascii_case("inputs.") {
        return None;
    }
    consumed += 7;
    let tail = &after_sigil[7..];
    let name_len = tail.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_').count();
    let name = &tail[..name_len];
    if name.is_empty() {
        return None;
    }
    let after_name = &tail[name_len..];
    let closing = after_name.trim_start();
    consumed += name_len + (after_name.len() - closing.len());
    closing.starts_with("}}").then_some((name, consumed + 2))
}

/// Whether `s` ends in a character that can continue an unquoted identifier (a letter, digit, `_`
/// or `$`), so that a `$$` after it belongs to that identifier rather than opening a constant.
fn ends_in_word(s: &str) -> bool {
    s.chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$')
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Appends the bindings for one placeholder and returns the `?` marks that stand for them.
fn bind(name: &str, value: &Input, bindings: &mut Vec<Binding>) -> Result<String, PrepareError> {
    match value {
        Input::List(items) => {
            if items.is_empty() {
                return Err(PrepareError(format!(
                    "input {name:?} is an empty list, which cannot be bound as SQL values"
                )));
            }
            let mut marks = Vec::with_capacity(items.len());
            for item in items {
                if matches!(item, Input::List(_)) {
                    return Err(PrepareError(format!(
                        "input {name:?} is a list of lists, which cannot be bound as SQL values"
                    )));
                }
                marks.push(mark(item, bindings));
            }
            Ok(marks.join(", "))
        }
        other => Ok(mark(other, bindings).to_owned()),
    }
}

/// `?` with its binding appended, or `NULL` for None (a literal of our own, not the input's text).
fn mark(value: &Input, bindings: &mut Vec<Binding>) -> &'static str {
    if matches!(value, Input::Null) {
        return "NULL";
    }
    bindings.push(scalar(value));
    "?"
}

fn scalar(value: &Input) -> Binding {
    let (kind, value) = match value {
        Input::Int(n) => ("FIXED", n.to_string()),
        Input::Float(f) => ("REAL", real(*f)),
        Input::Str(s) => ("TEXT", s.clone()),
        Input::Bool(b) => ("BOOLEAN", b.to_string()),
        // Text, so Snowflake converts it to whatever the expression needs (DATE,
        // TIMESTAMP_NTZ/LTZ/TZ) under the session's rules, as a literal would be.
        Input::Datetime(s) | Input::Duration(s) => ("TEXT", s.clone()),
        Input::List(_) | Input::Null => unreachable!("lists and None are expanded by bind()"),
    };
    Binding { kind, value }
}

fn real(f: f64) -> String {
    if f.is_nan() {
        "NaN".to_owned()
    } else if f.is_infinite() {
        if f > 0.0 { "inf".to_owned() } else { "-inf".to_owned() }
    } else {
        format!("{f:?}")
    }
}

#[cfg(test)]
mod tests;
