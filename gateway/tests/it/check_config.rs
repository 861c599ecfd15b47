//! `flotilla-gateway --check-config`, run as the binary: what it says of the
//! plugin list it would serve.

use std::process::{Command, Output};

fn check(config: Option<&std::path::Path>, plugins: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-gateway"));
    cmd.arg("--check-config").env_remove("FLOTILLA_PLUGINS").env("NO_COLOR", "1");
    if let Some(path) = config {
        cmd.arg("--config").arg(path);
    }
    if let Some(list) = plugins {
        cmd.env("FLOTILLA_PLUGINS", list);
    }
    cmd.output().expect("flotilla-gateway runs")
}

#[test]
fn check_config_notes_an_empty_plugin_list_and_a_blank_variable_keeps_the_files() {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    // Nothing configured: valid, with a note saying what that means.
    let none = check(None, None);
    assert_eq!(none.status.code(), Some(0), "{}", text(&none.stderr));
    assert!(text(&none.stderr).contains("no plugin services are configured"), "{}", text(&none.stderr));

    // A file's plugin survives a blank FLOTILLA_PLUGINS (as a compose file's `FLOTILLA_PLUGINS=` sets it).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "[[plugins]]\nname = \"echo\"\ndiscovery = \"static://127.0.0.1:8001\"\n").unwrap();
    let kept = check(Some(&file), Some(""));
    assert_eq!(kept.status.code(), Some(0), "{}", text(&kept.stderr));
    assert!(text(&kept.stdout).contains("static://127.0.0.1:8001"), "{}", text(&kept.stdout));
    assert!(!text(&kept.stderr).contains("no plugin services"), "{}", text(&kept.stderr));
}
