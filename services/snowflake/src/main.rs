//! `flotilla-snowflake`: the Snowflake plugin as its own service.

fn main() -> std::process::ExitCode {
    flotilla_sdk::main(
        "flotilla-snowflake",
        "The Snowflake plugin service: task type `snowflake` (SQL API v2, key-pair JWT from the secret \
         `snowflake_private_key`).",
        flotilla_snowflake::Snowflake::from_config,
    )
}
