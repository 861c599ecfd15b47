//! `flotilla-bigquery`: the BigQuery plugin as its own service.

fn main() -> std::process::ExitCode {
    flotilla_sdk::main(
        "flotilla-bigquery",
        "The BigQuery plugin service: task type `bigquery_query_job_task` (flytekitplugins-bigquery's \
         BigQueryTask), run as BigQuery query jobs through the BigQuery v2 REST API.\n\n\
         Credentials: a service-account key file named by GOOGLE_APPLICATION_CREDENTIALS (or [plugin] \
         credentials_file), else the GCE/GKE metadata server. Settings in the config file's [plugin] \
         table or FLOTILLA_BIGQUERY_* variables: base_url, credentials_file, metadata_url, and \
         [plugin.http] timeouts.",
        flotilla_bigquery::BigQuery::from_config,
    )
}
