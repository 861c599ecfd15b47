//! `flotilla-bigquery`: the BigQuery plugin as its own service.

fn main() -> std::process::ExitCode {
    flotilla_sdk::main(
        "flotilla-bigquery",
        "The BigQuery plugin service: task type `bigquery_query_job_task` (flytekitplugins-bigquery's \
         BigQueryTask), run as BigQuery query jobs through the BigQuery v2 REST API.\n\n\
         Credentials, the first found of: a credentials file named by FLOTILLA_BIGQUERY_CREDENTIALS_FILE, \
         [plugin] credentials_file or GOOGLE_APPLICATION_CREDENTIALS; gcloud's own (`gcloud auth \
         application-default login`, under $CLOUDSDK_CONFIG or ~/.config/gcloud); the GCE/GKE metadata \
         server. A file holds a service-account key or a user's credentials; its quota_project_id (or \
         GOOGLE_CLOUD_QUOTA_PROJECT) is billed. Settings in the config file's [plugin] \
         table or FLOTILLA_BIGQUERY_* variables: base_url, credentials_file, metadata_url, and \
         [plugin.http] timeouts.",
        flotilla_bigquery::BigQuery::from_config,
    )
}
