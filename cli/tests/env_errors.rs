//! A value that clap refuses names its environment variable when it came from one.

use std::process::Command;

fn stderr_of(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .env_remove("FLOTILLA_GATEWAY")
        .env_remove("FLOTILLA_TLS")
        .env_remove("FLOTILLA_TLS_CA")
        .env_remove("FLOTILLA_TOKEN")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("flotilla runs");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_bad_value_from_the_environment_is_named_as_such() {
    let (code, err) = stderr_of(&["agents"], &[("FLOTILLA_GATEWAY", "no port")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("invalid value 'no port' for '--gateway <HOST:PORT>'"), "{err}");
    assert!(err.contains("tip: the value came from the environment variable FLOTILLA_GATEWAY"), "{err}");

    // The same value on the command line is the command line's fault.
    let (code, err) = stderr_of(&["agents", "--gateway", "no port"], &[("FLOTILLA_GATEWAY", "no port")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains("environment variable"), "{err}");
}

#[test]
fn a_log_filter_that_does_not_parse_is_refused_by_name() {
    let (code, err) = stderr_of(&["up", "--log", "foo=["], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--log") && err.contains("not a log filter"), "{err}");
    let (code, err) = stderr_of(&["up"], &[("RUST_LOG", "foo=[")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("RUST_LOG"), "{err}");
}

#[test]
fn flotilla_tls_takes_the_usual_spellings_of_true() {
    // Nothing listens on port 1: the call fails, but after parsing, and as a TLS call.
    for yes in ["1", "true", "yes", "on"] {
        let (code, err) =
            stderr_of(&["agents", "--gateway", "127.0.0.1:1", "--timeout", "2"], &[("FLOTILLA_TLS", yes)]);
        assert_eq!(code, Some(1), "FLOTILLA_TLS={yes}: {err}");
        assert!(err.contains("is it serving TLS"), "FLOTILLA_TLS={yes}: {err}");
    }
    let (code, err) =
        stderr_of(&["agents", "--gateway", "127.0.0.1:1", "--timeout", "2"], &[("FLOTILLA_TLS", "0")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is `flotilla up` running?"), "{err}");
}

#[test]
fn up_refuses_a_bad_gateway_or_service_setting_by_its_variable() {
    for (name, value, said) in [
        ("FLOTILLA_SHUTDOWN_GRACE", "abc", "FLOTILLA_SHUTDOWN_GRACE"),
        ("FLOTILLA_MAX_REQUEST_BYTES", "12", "below the minimum of 1024"),
        ("FLOTILLA_CONNECT_TIMEOUT", "soon", "FLOTILLA_CONNECT_TIMEOUT"),
        (
            "FLOTILLA_CONNECT_TIMEOUT",
            "0s",
            "connect_timeout (FLOTILLA_CONNECT_TIMEOUT): must be more than zero",
        ),
        ("FLOTILLA_AUTH_TOKEN_FILE", "/nonexistent/tokens", "(FLOTILLA_AUTH_TOKEN_FILE): cannot read"),
    ] {
        let (code, err) =
            stderr_of(&["up", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"], &[(name, value)]);
        assert_eq!(code, Some(64), "{name}={value}: {err}");
        assert!(err.contains(said) && err.contains("invalid configuration"), "{name}={value}: {err}");
    }
}

#[test]
fn one_address_for_both_listeners_is_named_as_the_mistake() {
    let (code, err) =
        stderr_of(&["up", "--listen", "127.0.0.1:42555", "--admin-listen", "127.0.0.1:42555"], &[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("both set to 127.0.0.1:42555") && err.contains("--admin-listen"), "{err}");
}

#[test]
fn tls_options_that_cannot_work_are_named_before_any_call() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let ca = not_pem.display().to_string();
    let (code, err) = stderr_of(&["agents", "--gateway", "127.0.0.1:1", "--tls-ca", &ca], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--tls-ca") && err.contains("no PEM certificate"), "{err}");
    let (code, err) = stderr_of(&["agents", "--tls-server-name", ""], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--tls-server-name"), "{err}");
}
