//! `flotilla-fakes`: every fake external API of flotilla-testkit on loopback, for tests written
//! in other languages (the Python interop suite). Prints one JSON line with each fake's base URL,
//! e.g. `{"bigquery": "http://127.0.0.1:41234", ...}`, then serves until stdin closes or
//! SIGINT/SIGTERM. Each fake lists the requests it received at `GET /_fake/requests`.
//!
//! The fakes accept credentials made from the test-only key in shared/testkit/keys; the
//! Databricks fake accepts the personal access token `dapi-test-token` and the OAuth service
//! principal `test-client-id` / `test-client-secret`.

use flotilla_testkit::{
    fakes::{
        bigquery::FakeBigQuery,
        databricks::FakeDatabricks,
        snowflake::{Identity, SnowflakeFake},
    },
    jwt::TEST_PUBLIC_KEY_DER,
};
use tokio::io::AsyncReadExt as _;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if std::env::args().nth(1).is_some_and(|a| a == "--help" || a == "-h") {
        println!(
            "flotilla-fakes: fake BigQuery, Databricks and Snowflake APIs on 127.0.0.1 for tests.\n\n\
             Prints one JSON line of base URLs, then serves until stdin closes or a signal.\n\
             Credentials: the test-only key pair in shared/testkit/keys."
        );
        return;
    }
    let bigquery = FakeBigQuery::start(TEST_PUBLIC_KEY_DER.to_vec()).await;
    let databricks_model = FakeDatabricks::new("dapi-test-token");
    databricks_model.oauth_client("test-client-id", "test-client-secret");
    let databricks = databricks_model.start().await;
    let snowflake = SnowflakeFake::start(Identity::any_user_of_test_key()).await;
    let urls = serde_json::json!({
        "bigquery": bigquery.url(),
        "databricks": databricks.url(),
        "snowflake": snowflake.url(),
    });
    println!("{urls}");

    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 256];
    let stdin_closed = async move { while stdin.read(&mut sink).await.is_ok_and(|n| n > 0) {} };
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        () = stdin_closed => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
