use super::*;

fn inputs(pairs: &[(&str, Input)]) -> Vec<(String, Input)> {
    pairs.iter().map(|(n, v)| ((*n).to_owned(), v.clone())).collect()
}

fn b(kind: &'static str, value: &str) -> Binding {
    Binding { kind, value: value.to_owned() }
}

#[test]
fn pyformat_placeholders_become_positional_bindings() {
    let p = prepare(
        "SELECT * FROM t WHERE id = %(id)s AND name = %(name)s AND ok = %(ok)s AND x > %(x)s",
        &inputs(&[
            ("name", Input::Str("o'brien".into())),
            ("id", Input::Int(42)),
            ("ok", Input::Bool(true)),
            ("x", Input::Float(1.5)),
        ]),
    )
    .unwrap();
    assert_eq!(p.statement, "SELECT * FROM t WHERE id = ? AND name = ? AND ok = ? AND x > ?");
    assert_eq!(
        p.bindings,
        vec![b("FIXED", "42"), b("TEXT", "o'brien"), b("BOOLEAN", "true"), b("REAL", "1.5")]
    );
    assert_eq!(
        p.bindings_json().unwrap(),
        json!({
            "1": {"type": "FIXED", "value": "42"},
            "2": {"type": "TEXT", "value": "o'brien"},
            "3": {"type": "BOOLEAN", "value": "true"},
            "4": {"type": "REAL", "value": "1.5"},
        })
    );
}

#[test]
fn go_template_placeholders_in_every_spelling() {
    let ins = inputs(&[("day", Input::Datetime("2024-01-02T00:00:00Z".into())), ("n", Input::Int(3))]);
    for sql in [
        "SELECT {{ .inputs.n }}",
        "SELECT {{.inputs.n}}",
        "SELECT {{ .Inputs.n }}",
        "SELECT {{ $inputs.n }}",
        "SELECT {{   .INPUTS.n   }}",
    ] {
        let p = prepare(sql, &ins).unwrap();
        assert_eq!(p.statement, "SELECT ?", "{sql}");
        assert_eq!(p.bindings, vec![b("FIXED", "3")], "{sql}");
    }
}

#[test]
fn a_placeholder_filling_a_whole_literal_drops_the_quotes() {
    let p = prepare(
        "SELECT * FROM t WHERE d = '{{ .inputs.day }}' AND s = 'x'",
        &inputs(&[("day", Input::Datetime("2024-01-02T00:00:00Z".into()))]),
    )
    .unwrap();
    assert_eq!(p.statement, "SELECT * FROM t WHERE d = ? AND s = 'x'");
    assert_eq!(p.bindings, vec![b("TEXT", "2024-01-02T00:00:00Z")]);
}

#[test]
fn a_placeholder_inside_a_longer_literal_becomes_a_concatenation() {
    let p = prepare("SELECT 'day_{{ .inputs.n }}_x', 'it''s'", &inputs(&[("n", Input::Int(7))])).unwrap();
    assert_eq!(p.statement, "SELECT 'day_' || ? || '_x', 'it''s'");
    assert_eq!(p.bindings, vec![b("FIXED", "7")]);
}

#[test]
fn an_escaped_quote_right_after_the_placeholder_keeps_the_literal() {
    let p = prepare("SELECT '{{ .inputs.n }}'''", &inputs(&[("n", Input::Int(7))])).unwrap();
    assert_eq!(p.statement, "SELECT '' || ? || ''''");
}

#[test]
fn lists_expand_to_one_placeholder_per_element() {
    let p = prepare(
        "SELECT * FROM t WHERE id IN (%(ids)s)",
        &inputs(&[("ids", Input::List(vec![Input::Int(1), Input::Int(2), Input::Int(3)]))]),
    )
    .unwrap();
    assert_eq!(p.statement, "SELECT * FROM t WHERE id IN (?, ?, ?)");
    assert_eq!(p.bindings, vec![b("FIXED", "1"), b("FIXED", "2"), b("FIXED", "3")]);
}

#[test]
fn empty_and_nested_lists_are_refused_by_name() {
    let e = prepare("SELECT %(ids)s", &inputs(&[("ids", Input::List(vec![]))])).unwrap_err();
    assert!(e.0.contains("\"ids\"") && e.0.contains("empty list"), "{e}");
    let e =
        prepare("SELECT %(ids)s", &inputs(&[("ids", Input::List(vec![Input::List(vec![])]))])).unwrap_err();
    assert!(e.0.contains("list of lists"), "{e}");
}

#[test]
fn an_unknown_placeholder_names_the_input_and_the_known_ones() {
    let e = prepare("SELECT %(nope)s", &inputs(&[("a", Input::Int(1))])).unwrap_err();
    assert!(e.0.contains("\"nope\"") && e.0.contains("its inputs: a"), "{e}");
    let e = prepare("SELECT {{ .inputs.nope }}", &[]).unwrap_err();
    assert!(e.0.contains("its inputs: none"), "{e}");
}

#[test]
fn percent_escapes_follow_pyformat_only_when_there_are_inputs() {
    let p = prepare("SELECT '100%%' LIKE 'a%', %(n)s", &inputs(&[("n", Input::Int(1))])).unwrap();
    assert_eq!(p.statement, "SELECT '100%' LIKE 'a%', ?");
    // Without inputs upstream sends the text verbatim, and so do we.
    let p = prepare("SELECT '100%%'", &[]).unwrap();
    assert_eq!(p.statement, "SELECT '100%%'");
    assert!(p.bindings_json().is_none());
}

#[test]
fn comments_and_other_templates_are_left_alone() {
    let sql = "SELECT 1 -- uses %(n)s\n/* {{ .inputs.n }} */ , {{ .outputPrefix }}, %(n)s // {{.inputs.n}}";
    let p = prepare(sql, &inputs(&[("n", Input::Int(5))])).unwrap();
    assert_eq!(
        p.statement,
        "SELECT 1 -- uses %(n)s\n/* {{ .inputs.n }} */ , {{ .outputPrefix }}, ? // {{.inputs.n}}"
    );
    assert_eq!(p.bindings.len(), 1);
}

#[test]
fn malformed_placeholders_are_plain_text() {
    let sql = "SELECT '%(' , '{{ .inputs. }}', '{{ .inputs.a', %(a b)s";
    let p = prepare(sql, &inputs(&[("a", Input::Int(1))])).unwrap();
    assert_eq!(p.statement, sql);
    assert!(p.bindings.is_empty());
}

#[test]
fn special_floats_and_text_kinds() {
    let p = prepare(
        "SELECT %(a)s, %(b)s, %(c)s, %(d)s",
        &inputs(&[
            ("a", Input::Float(f64::NAN)),
            ("b", Input::Float(f64::NEG_INFINITY)),
            ("c", Input::Float(3.0)),
            ("d", Input::Duration("90s".into())),
        ]),
    )
    .unwrap();
    assert_eq!(p.bindings, vec![b("REAL", "NaN"), b("REAL", "-inf"), b("REAL", "3.0"), b("TEXT", "90s")]);
}

#[test]
fn non_ascii_text_survives() {
    let p = prepare("SELECT 'żółw', %(n)s -- ünïcode", &inputs(&[("n", Input::Str("ß".into()))])).unwrap();
    assert_eq!(p.statement, "SELECT 'żółw', ? -- ünïcode");
}

#[test]
fn a_backslash_escaped_quote_does_not_end_the_literal() {
    let p = prepare("SELECT * FROM t WHERE a = 'it\\'s' AND b = %(x)s", &inputs(&[("x", Input::Int(1))]))
        .unwrap();
    assert_eq!(p.statement, "SELECT * FROM t WHERE a = 'it\\'s' AND b = ?");
    assert_eq!(p.bindings, vec![b("FIXED", "1")]);
}

#[test]
fn an_escaped_percent_sign_is_read_as_pyformat_reads_it() {
    let p =
        prepare("SELECT 'a' LIKE 'x\\%%' ESCAPE '\\\\', %(x)s", &inputs(&[("x", Input::Int(1))])).unwrap();
    assert_eq!(p.statement, "SELECT 'a' LIKE 'x\\%' ESCAPE '\\\\', ?");
    // Without inputs nothing is pyformat-read, as upstream runs the query as it is.
    let p = prepare("SELECT 'x\\%%'", &[]).unwrap();
    assert_eq!(p.statement, "SELECT 'x\\%%'");
}

#[test]
fn an_escaped_backslash_at_the_end_of_a_literal_closes_it() {
    let p = prepare("SELECT 'a\\\\' = %(x)s", &inputs(&[("x", Input::Int(1))])).unwrap();
    assert_eq!(p.statement, "SELECT 'a\\\\' = ?");
    assert_eq!(p.bindings, vec![b("FIXED", "1")]);
}

#[test]
fn a_backslash_escapes_whatever_follows_it() {
    // Escaped placeholder openers and non-ASCII characters are copied as they are.
    let sql = "SELECT 'ż\\ż\\%(x)s\\{{ .inputs.x }}\\n', '{{ .inputs.x }}\\''";
    let p = prepare(sql, &inputs(&[("x", Input::Int(1))])).unwrap();
    assert_eq!(p.statement, "SELECT 'ż\\ż\\%(x)s\\{{ .inputs.x }}\\n', '' || ? || '\\''");
    assert_eq!(p.bindings, vec![b("FIXED", "1")]);
}

#[test]
fn quoted_identifiers_are_copied_verbatim() {
    let ins = inputs(&[("s", Input::Str("x".into()))]);
    for (sql, want) in [
        ("SELECT \"O'Brien\" FROM t WHERE x = %(s)s", "SELECT \"O'Brien\" FROM t WHERE x = ?"),
        ("SELECT \"a--b\" FROM t WHERE x = %(s)s", "SELECT \"a--b\" FROM t WHERE x = ?"),
        ("SELECT \"a//b/*\" FROM t WHERE x = %(s)s", "SELECT \"a//b/*\" FROM t WHERE x = ?"),
        (
            "SELECT \"say \"\"%(s)s\"\" {{ .inputs.s }} 100%%\" FROM t WHERE x = %(s)s",
            // `%%` is `%` in identifiers too, as upstream's pyformat reads the whole text.
            "SELECT \"say \"\"%(s)s\"\" {{ .inputs.s }} 100%\" FROM t WHERE x = ?",
        ),
    ] {
        let p = prepare(sql, &ins).unwrap();
        assert_eq!(p.statement, want, "{sql}");
        assert_eq!(p.bindings, vec![b("TEXT", "x")], "{sql}");
    }
}

#[test]
fn a_placeholder_inside_a_dollar_quoted_constant_becomes_a_concatenation() {
    let p = prepare("SELECT $$it's {{ .inputs.s }}$$", &inputs(&[("s", Input::Str("x".into()))])).unwrap();
    assert_eq!(p.statement, "SELECT $$it's $$ || ? || $$$$");
    assert_eq!(p.bindings, vec![b("TEXT", "x")]);

    let p = prepare("SELECT $$a 'b' \\ -- %(n)s 100%% $$, %(n)s", &inputs(&[("n", Input::Int(2))])).unwrap();
    assert_eq!(p.statement, "SELECT $$a 'b' \\ -- $$ || ? || $$ 100% $$, ?");
    assert_eq!(p.bindings, vec![b("FIXED", "2"), b("FIXED", "2")]);
}

#[test]
fn a_placeholder_filling_a_whole_dollar_quoted_constant_is_bare() {
    let p =
        prepare("SELECT $${{ .inputs.s }}$$, $$%(s)s$$ || 'x'", &inputs(&[("s", Input::Str("x".into()))]))
            .unwrap();
    assert_eq!(p.statement, "SELECT ?, ? || 'x'");
    assert_eq!(p.bindings, vec![b("TEXT", "x"), b("TEXT", "x")]);
}

#[test]
fn dollars_inside_identifiers_do_not_open_a_constant() {
    let p =
        prepare("SELECT a$$b, $1, $$x$$ FROM t WHERE c = %(n)s", &inputs(&[("n", Input::Int(1))])).unwrap();
    assert_eq!(p.statement, "SELECT a$$b, $1, $$x$$ FROM t WHERE c = ?");
}

#[test]
fn unterminated_quotes_and_comments_run_to_the_end_without_panicking() {
    let ins = inputs(&[("n", Input::Int(1))]);
    for (sql, want, bound) in [
        ("SELECT %(n)s, \"abc %(n)s", "SELECT ?, \"abc %(n)s", 1),
        ("SELECT %(n)s, $$abc %(n)s", "SELECT ?, $$abc $$ || ? || $$", 2),
        ("SELECT %(n)s, $$", "SELECT ?, $$", 1),
        ("SELECT %(n)s, '\\", "SELECT ?, '\\", 1),
        ("SELECT %(n)s, 'ab\\", "SELECT ?, 'ab\\", 1),
        ("SELECT %(n)s, '%(n)s", "SELECT ?, '' || ? || '", 2),
        ("SELECT %(n)s, \"", "SELECT ?, \"", 1),
        ("SELECT %(n)s /* %(n)s", "SELECT ? /* %(n)s", 1),
        ("SELECT %(n)s -- %(n)s", "SELECT ? -- %(n)s", 1),
        ("SELECT %(n)s, $", "SELECT ?, $", 1),
    ] {
        let p = prepare(sql, &ins).unwrap();
        assert_eq!(p.statement, want, "{sql}");
        assert_eq!(p.bindings.len(), bound, "{sql}");
    }
}
