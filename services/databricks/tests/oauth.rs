//! OAuth machine-to-machine authentication (`databricksAuthType = oauth_m2m`):
//! the service principal's token comes from the workspace's token endpoint,
//! is reused while valid, and is replaced when the API refuses it.

mod support;

use flotilla_testkit::fakes::databricks::{GET, SUBMIT, TOKEN as TOKEN_PATH};
use serde_json::{Value, json};
use support::*;
use tonic::Code;

const CLIENT_ID: &str = "6f1c-service-principal";
const CLIENT_SECRET: &str = "dose-very-secret-client-value";

fn oauth_custom() -> Value {
    let mut c = classic_custom();
    c["databricksAuthType"] = json!("oauth_m2m");
    c["databricksClientId"] = json!(CLIENT_ID);
    c
}

async fn rig() -> Rig {
    let rig = Rig::with_secrets(&[("DATABRICKS_CLIENT_SECRET", CLIENT_SECRET)], |_| {}).await;
    rig.model.oauth_client(CLIENT_ID, CLIENT_SECRET);
    rig
}

#[tokio::test]
async fn a_service_principal_token_is_fetched_reused_and_renewed() {
    let mut rig = rig().await;
    let meta = rig.create("spark", oauth_custom()).await.unwrap();
    let stored: Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(
        stored,
        json!({ "databricks_instance": INSTANCE, "run_id": "1001", "auth_type": "oauth_m2m", "client_id": CLIENT_ID })
    );

    let token_requests = rig.fake.requests_to(TOKEN_PATH);
    assert_eq!(token_requests.len(), 1);
    let form: std::collections::BTreeMap<_, _> = token_requests[0].form().into_iter().collect();
    assert_eq!(form.get("grant_type").map(String::as_str), Some("client_credentials"));
    assert_eq!(form.get("scope").map(String::as_str), Some("all-apis"));
    assert_eq!(form.get("client_id").map(String::as_str), Some(CLIENT_ID));
    assert_eq!(form.get("client_secret").map(String::as_str), Some(CLIENT_SECRET));
    assert_eq!(rig.fake.requests_to(SUBMIT)[0].bearer(), Some("oauth-access-1"));

    rig.get(&meta).await.unwrap();
    assert_eq!(rig.fake.requests_to(TOKEN_PATH).len(), 1, "the cached token is reused");
    assert_eq!(rig.fake.requests_to(GET)[0].bearer(), Some("oauth-access-1"));

    rig.model.revoke_issued_tokens();
    rig.get(&meta).await.expect("a refused token is replaced within the call");
    assert_eq!(rig.fake.requests_to(TOKEN_PATH).len(), 2);
    assert_eq!(rig.fake.requests_to(GET).last().unwrap().bearer(), Some("oauth-access-2"));
    rig.delete(&meta).await.unwrap();
    assert!(rig.model.run(1001).unwrap().cancelled);
}

#[tokio::test]
async fn missing_or_refused_client_credentials_are_named_without_the_secret() {
    let mut rig = Rig::with_secrets(&[], |_| {}).await;
    let e = rig.create("spark", oauth_custom()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("DATABRICKS_CLIENT_SECRET"), "{}", e.message());

    let mut rig = Rig::with_secrets(&[("DATABRICKS_CLIENT_SECRET", CLIENT_SECRET)], |_| {}).await;
    rig.model.oauth_client(CLIENT_ID, "another-secret");
    let e = rig.create("spark", oauth_custom()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("invalid_client"), "{}", e.message());
    assert!(!e.message().contains(CLIENT_SECRET), "{}", e.message());

    let mut no_client = oauth_custom();
    no_client.as_object_mut().unwrap().remove("databricksClientId");
    let e = rig.create("spark", no_client).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("DATABRICKS_CLIENT_ID"), "{}", e.message());

    let mut oidc = classic_custom();
    oidc["databricksAuthType"] = json!("oidc_federation");
    let e = rig.create("spark", oidc).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("oidc_federation"), "{}", e.message());
    assert!(rig.fake.requests_to(SUBMIT).is_empty());
}

#[tokio::test]
async fn the_service_can_default_every_task_to_oauth() {
    let mut rig = Rig::with_secrets(&[("DATABRICKS_CLIENT_SECRET", CLIENT_SECRET)], |s| {
        s.auth_type = Some("oauth_m2m".into());
        s.client_id = Some(CLIENT_ID.into());
    })
    .await;
    rig.model.oauth_client(CLIENT_ID, CLIENT_SECRET);
    let meta = rig.create("spark", classic_custom()).await.unwrap();
    assert_eq!(rig.fake.requests_to(SUBMIT)[0].bearer(), Some("oauth-access-1"));
    let stored: Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(stored["auth_type"], json!("oauth_m2m"));
}
