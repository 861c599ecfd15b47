//! What Flotilla's cloud plugin services (BigQuery, Databricks, Snowflake) share:
//!
//! - [`api`]: one external REST API, called with a bounded budget per gRPC call: transient
//!   failures (429, 5xx, refused or reset connections) are retried with jittered backoff until
//!   the caller's deadline, and every failure becomes an [`api::ApiError`] that names the API
//!   and the operation, never a credential.
//! - [`secret`]: credentials read where flytekit's agents read them (`_FSEC_<KEY>` or `<KEY>`
//!   environment variables, then files under `/etc/secrets`), held in a type that never prints.
//! - [`jwt`]: RS256-signed JSON Web Tokens from a PEM private key (Google service-account
//!   assertions, Snowflake key-pair authentication).
//! - [`template`]: reading `TaskTemplate` fields (`custom` structs, inputs as native values) and
//!   building the outputs and log links upstream's agents answer with.

#![warn(missing_docs)]

pub mod api;
pub mod jwt;
pub mod secret;
pub mod template;

/// Installs ring as the process-wide rustls crypto provider, which the HTTPS client needs.
/// Idempotent: a provider installed earlier (by this or anyone else) stays.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
