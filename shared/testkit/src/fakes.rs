//! Fakes of the external APIs the cloud plugin services call, each a model of the API's public
//! documents (paths, bodies, auth headers, response and error shapes) served by
//! [`crate::fake_http::FakeHttp`].

pub mod bigquery;
pub mod databricks;
pub mod snowflake;
