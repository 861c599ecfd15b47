//! Steady load while a replica dies: 32 concurrent create-get-delete loops for
//! 10 s through the gateway in front of three real `flotilla-echo` processes;
//! one is SIGKILLed a few seconds in. No GetTask, DeleteTask or ListAgents call
//! may fail, and no CreateTask may run twice (the gateway retries a create
//! only when it provably never reached a replica). The test reports how many
//! creates failed; the goal is none.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use flotilla_proto::admin;
use flotilla_testkit::metric;

use crate::support::*;

/// A `flotilla-echo` process on loopback; killed on drop.
struct EchoProcess {
    child: Child,
    addr: SocketAddr,
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn echo_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    let bin = dir.join("flotilla-echo");
    assert!(bin.exists(), "{} is missing: run `cargo build --bins` first", bin.display());
    bin
}

/// Starts `flotilla-echo` on free loopback ports and reads its gRPC address from its log.
fn spawn_echo_process() -> EchoProcess {
    let mut child = Command::new(echo_binary())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log", "info"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flotilla-echo starts");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && let Some(rest) = line.split("grpc=").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default().to_owned();
                sent = tx.send(addr).is_ok();
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(10)).expect("flotilla-echo logs its address within 10 s");
    EchoProcess { child, addr: addr.parse().expect("a socket address in the log") }
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn count<T>(&self, r: &Result<T, tonic::Status>, what: &str) {
        match r {
            Ok(_) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                eprintln!("{what} failed: {:?} {}", e.code(), e.message());
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_replicas_under_load_fails_no_idempotent_call() {
    let mut replicas: Vec<EchoProcess> = (0..3).map(|_| spawn_echo_process()).collect();
    let targets: Vec<String> = replicas.iter().map(|r| r.addr.to_string()).collect();
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", targets.join(",")))], |_| {}).await;

    let (creates, gets, deletes, lists) = (
        Arc::new(Tally::default()),
        Arc::new(Tally::default()),
        Arc::new(Tally::default()),
        Arc::new(Tally::default()),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..32 {
        let (mut async_client, mut meta_client) = (gw.async_client(), gw.metadata_client());
        let (creates, gets, deletes, lists, stop) =
            (creates.clone(), gets.clone(), deletes.clone(), lists.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let created = async_client
                    .create_task(admin::CreateTaskRequest {
                        inputs: Some(inputs(i64::try_from(round).unwrap_or_default())),
                        template: Some(echo_template("echo", &[])),
                        ..Default::default()
                    })
                    .await;
                creates.count(&created, "CreateTask");
                let Ok(created) = created else { continue };
                let meta = created.into_inner().resource_meta;
                let got = async_client
                    .get_task(admin::GetTaskRequest {
                        resource_meta: meta.clone(),
                        task_category: category("echo"),
                        ..Default::default()
                    })
                    .await;
                gets.count(&got, "GetTask");
                let deleted = async_client
                    .delete_task(admin::DeleteTaskRequest {
                        resource_meta: meta,
                        task_category: category("echo"),
                        ..Default::default()
                    })
                    .await;
                deletes.count(&deleted, "DeleteTask");
                if (round + w).is_multiple_of(10) {
                    lists.count(&meta_client.list_agents(admin::ListAgentsRequest {}).await, "ListAgents");
                }
            }
        }));
    }

    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await; // steady load before the kill: the point of the test
    let victim = replicas.remove(0);
    drop(victim); // SIGKILL, then reap
    let killed_at = started.elapsed();
    tokio::time::sleep(Duration::from_secs(7)).await; // load after the kill: 10 s in all
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }

    let create_retries_not_connect = metric(
        gw.admin,
        "flotilla_gateway_retries_total{method=\"CreateTask\",plugin=\"echo\",reason=\"error\"}",
    )
    .await
        + metric(
            gw.admin,
            "flotilla_gateway_retries_total{method=\"CreateTask\",plugin=\"echo\",reason=\"unavailable\"}",
        )
        .await;
    let load = |t: &Tally| (t.ok.load(Ordering::Relaxed), t.failed.load(Ordering::Relaxed));
    println!(
        "killed a replica at {killed_at:?} of {:?}; ok/failed: CreateTask {:?}, GetTask {:?}, DeleteTask {:?}, \
         ListAgents {:?}; CreateTask retries after a failure that might have reached a replica: {create_retries_not_connect}",
        started.elapsed(),
        load(&creates),
        load(&gets),
        load(&deletes),
        load(&lists)
    );
    assert!(load(&gets).0 > 1000, "the load was too light to show anything: {:?}", load(&gets));
    assert_eq!(load(&gets).1, 0, "GetTask calls failed");
    assert_eq!(load(&deletes).1, 0, "DeleteTask calls failed");
    assert_eq!(load(&lists).1, 0, "ListAgents calls failed");
    assert_eq!(
        create_retries_not_connect, 0.0,
        "a CreateTask was retried after it may have reached a replica"
    );
}
