//! The loopback floor, measured with `flotilla-compare` as the far end.

use std::{path::Path, process::Command, time::Duration};

use flotilla_benches::floor::{ROLE_ENV, loopback_rtt};

const COMPARE: &str = env!("CARGO_BIN_EXE_flotilla-compare");

#[test]
fn a_ping_pong_direct_and_through_a_relay_measures_ordered_percentiles() {
    for relay in [false, true] {
        let floor = loopback_rtt(Path::new(COMPARE), 200, relay).unwrap();
        assert_eq!(floor.samples, 200);
        assert!(floor.p50 > Duration::ZERO && floor.p50 <= floor.p99, "relay {relay}: {floor:?}");
        assert_eq!(floor.relay_cpu.is_some(), relay, "{floor:?}");
    }
}

#[test]
fn no_round_trips_is_an_error_not_a_panic() {
    let err = loopback_rtt(Path::new(COMPARE), 0, false).unwrap_err();
    assert!(err.to_string().contains("at least one round trip"), "{err}");
}

#[test]
fn an_unknown_role_fails_naming_it() {
    let out = Command::new(COMPARE).env(ROLE_ENV, "sideways").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"sideways\"") && stderr.contains("relay:<port>"), "{stderr}");
}

#[test]
fn a_binary_that_does_not_play_the_roles_is_named_in_the_error() {
    // `true` prints nothing and exits: no port.
    let err = loopback_rtt(Path::new("/bin/true"), 10, false).unwrap_err();
    assert!(err.to_string().contains("serve_role_if_asked"), "{err}");
}
