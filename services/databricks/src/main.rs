//! `flotilla-databricks`: Flyte Spark tasks run as Databricks one-time job runs.

fn main() -> std::process::ExitCode {
    flotilla_sdk::main(
        "flotilla-databricks",
        "The Databricks plugin service: task types `spark` and `databricks` (async), submitted as \
         Databricks Jobs API 2.1 one-time runs (runs/submit, runs/get, runs/cancel).",
        flotilla_databricks::Databricks::from_config,
    )
}
