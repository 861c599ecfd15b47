//! `flotilla-echo`: the echo plugin as its own service.

fn main() -> std::process::ExitCode {
    flotilla_sdk::main(
        "flotilla-echo",
        "The echo plugin service: task type `echo` (async: outputs = inputs, with `duration_ms` and \
         `fail_with` options) and `echo_sync` (sync).",
        flotilla_echo::Echo::from_config,
    )
}
