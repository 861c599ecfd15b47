//! DNS discovery against a real DNS server (dnsmasq on a loopback port):
//! calls spread over every replica the records name, a replica removed from
//! DNS gets no new calls, one added starts getting them; A and SRV alike.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use flotilla_echo::Echo;
use flotilla_sdk::ServeOptions;
use flotilla_telemetry::config::HumanDuration;
use flotilla_testkit::{
    RunningService,
    dns::{Dnsmasq, Srv, Zone},
    eventually, metric, spawn_plugin_at,
};

use crate::support::*;

const GET_OK: &str = "flyte_agent_requests_success_total{operation=\"get\",task_type=\"echo\"}";
const DISCOVERED: &str = "flotilla_gateway_endpoints{plugin=\"echo\",state=\"discovered\"}";

/// Three echo replicas on 127.0.0.2-4, all on one port (as pods behind a headless service).
async fn replicas_on_one_port() -> (Vec<RunningService>, u16) {
    for _ in 0..10 {
        let first =
            spawn_plugin_at(Echo::default(), "127.0.0.2:0".parse().unwrap(), ServeOptions::default()).await;
        let port = first.addr.port();
        let mut all = vec![first];
        for ip in ["127.0.0.3", "127.0.0.4"] {
            let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
            if std::net::TcpListener::bind(addr).is_err() {
                break; // taken on this address: try another port
            }
            all.push(spawn_plugin_at(Echo::default(), addr, ServeOptions::default()).await);
        }
        if all.len() == 3 {
            return (all, port);
        }
    }
    panic!("no port free on 127.0.0.2, .3 and .4 in 10 tries");
}

fn a_zone(replicas: &[&RunningService]) -> Zone {
    Zone {
        ttl_secs: 1,
        a: replicas.iter().map(|r| ("echo.flotilla.test".to_owned(), r.addr.ip())).collect(),
        srv: vec![],
    }
}

async fn counts(replicas: &[RunningService]) -> Vec<f64> {
    let mut out = Vec::new();
    for r in replicas {
        out.push(metric(r.admin, GET_OK).await);
    }
    out
}

async fn wait_discovered(gw: &RunningGateway, n: f64) {
    eventually(&format!("the gateway to discover {n} replicas"), Duration::from_secs(10), || async {
        (metric(gw.admin, DISCOVERED).await == n).then_some(())
    })
    .await;
}

async fn dns_gateway(discovery: String, dns: &Dnsmasq) -> RunningGateway {
    let mut p = plugin("echo", discovery);
    p.nameserver = Some(dns.addr().to_string());
    spawn_gateway(vec![p], |c| c.dns_ttl_floor = HumanDuration(Duration::from_millis(200))).await
}

#[tokio::test]
async fn a_records_spread_calls_and_follow_replicas_leaving_and_joining() {
    let (replicas, port) = replicas_on_one_port().await;
    let all: Vec<&RunningService> = replicas.iter().collect();
    let mut dns = Dnsmasq::start(&a_zone(&all)).await;
    let gw = dns_gateway(format!("dns://echo.flotilla.test:{port}"), &dns).await;
    wait_discovered(&gw, 3.0).await;
    let meta = create(&gw).await;

    // Every replica serves a share (in batches: a replica whose connection a loaded
    // machine is still setting up when the first calls go out is passed over until it is up).
    eventually("every replica to serve a share", Duration::from_secs(10), || async {
        gets(&gw, &meta, 90).await;
        counts(&replicas).await.iter().all(|&c| c > 0.0).then_some(())
    })
    .await;

    // The third replica leaves DNS: after the next refresh it gets no new calls.
    dns.set(&a_zone(&all[..2])).await;
    wait_discovered(&gw, 2.0).await;
    let before = counts(&replicas).await;
    gets(&gw, &meta, 60).await;
    let after = counts(&replicas).await;
    assert_eq!(after[2], before[2], "the removed replica still got calls: {before:?} → {after:?}");
    assert_eq!(after[0] + after[1], before[0] + before[1] + 60.0);

    // It joins again: it gets calls again.
    dns.set(&a_zone(&all)).await;
    wait_discovered(&gw, 3.0).await;
    eventually("the re-added replica to get calls again", Duration::from_secs(10), || async {
        gets(&gw, &meta, 60).await;
        (counts(&replicas).await[2] > after[2]).then_some(())
    })
    .await;
}

#[tokio::test]
async fn srv_records_and_their_targets_are_followed() {
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(
            spawn_plugin_at(Echo::default(), "127.0.0.1:0".parse().unwrap(), ServeOptions::default()).await,
        );
    }
    let zone = |n: usize| Zone {
        ttl_secs: 1,
        a: (0..n).map(|i| (format!("r{i}.flotilla.test"), replicas[i].addr.ip())).collect(),
        srv: (0..n)
            .map(|i| Srv {
                name: "_grpc._tcp.echo.flotilla.test".into(),
                target: format!("r{i}.flotilla.test"),
                port: replicas[i].addr.port(),
                priority: 0,
                weight: 1,
            })
            .collect(),
    };
    let mut dns = Dnsmasq::start(&zone(3)).await;
    let gw = dns_gateway("srv://_grpc._tcp.echo.flotilla.test".into(), &dns).await;
    wait_discovered(&gw, 3.0).await;
    let meta = create(&gw).await;
    gets(&gw, &meta, 90).await;
    let spread = counts(&replicas).await;
    assert!(spread.iter().all(|&c| c > 0.0), "every SRV target serves a share: {spread:?}");

    dns.set(&zone(2)).await;
    wait_discovered(&gw, 2.0).await;
    let before = counts(&replicas).await;
    gets(&gw, &meta, 40).await;
    assert_eq!(counts(&replicas).await[2], before[2], "the SRV target removed still got calls");
}

#[tokio::test]
async fn a_failed_lookup_keeps_the_last_good_replicas() {
    let (replicas, port) = replicas_on_one_port().await;
    let all: Vec<&RunningService> = replicas.iter().collect();
    let mut dns = Dnsmasq::start(&a_zone(&all)).await;
    let gw = dns_gateway(format!("dns://echo.flotilla.test:{port}"), &dns).await;
    wait_discovered(&gw, 3.0).await;
    let meta = create(&gw).await;

    // The name disappears (NXDOMAIN): the gateway keeps serving from what it knew.
    dns.set(&Zone {
        ttl_secs: 1,
        a: vec![("other.flotilla.test".into(), "127.0.0.9".parse().unwrap())],
        srv: vec![],
    })
    .await;
    eventually("a failed lookup", Duration::from_secs(10), || async {
        (metric(gw.admin, "flotilla_gateway_discovery_errors_total{plugin=\"echo\"}").await >= 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(metric(gw.admin, DISCOVERED).await, 3.0);
    gets(&gw, &meta, 30).await;
}

/// Established server-side TCP connections on `addr`, read from /proc/net/tcp.
fn established_to(addr: SocketAddr) -> usize {
    let SocketAddr::V4(v4) = addr else { panic!("{addr}: the replicas here listen on IPv4") };
    // The kernel prints the address as the in-memory u32 (so 127.0.0.3 is 0300007F), the port as a number.
    let local = format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port());
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp is readable");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"01") // 01: ESTABLISHED
        })
        .count()
}

#[tokio::test]
async fn shrinking_to_one_replica_closes_the_connection_to_the_one_that_left() {
    let (replicas, port) = replicas_on_one_port().await;
    let all: Vec<&RunningService> = replicas.iter().collect();
    let mut dns = Dnsmasq::start(&a_zone(&all[..2])).await;
    let gw = dns_gateway(format!("dns://echo.flotilla.test:{port}"), &dns).await;
    wait_discovered(&gw, 2.0).await;
    let meta = create(&gw).await;
    // Two replicas: calls go through the balancer, which connects to both.
    gets(&gw, &meta, 30).await;
    let leaving = replicas[1].addr;
    assert!(established_to(leaving) >= 1, "the gateway has no connection to {leaving}");

    // One is left: calls go to it directly, and nothing may keep the other's connection open.
    dns.set(&a_zone(&all[..1])).await;
    wait_discovered(&gw, 1.0).await;
    gets(&gw, &meta, 10).await;
    eventually(
        "the gateway to close its connection to the replica that left",
        Duration::from_secs(10),
        || async { (established_to(leaving) == 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn first_lookups_against_a_silent_nameserver_wait_together_not_in_turn() {
    // A nameserver that takes queries and never answers: each lookup waits out
    // the resolver's timeout (seconds). Three plugins must not wait three times.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let plugins: Vec<_> = ["one", "two", "three"]
        .into_iter()
        .map(|name| {
            let mut p = plugin(name, format!("dns://{name}.test:8000"));
            p.nameserver = Some(silent.local_addr().unwrap().to_string());
            p
        })
        .collect();
    let alone = {
        let started = Instant::now();
        let gw = spawn_gateway(plugins[..1].to_vec(), |_| {}).await;
        gw.shutdown.trigger();
        started.elapsed()
    };
    let started = Instant::now();
    let gw = spawn_gateway(plugins, |_| {}).await;
    let all = started.elapsed();
    gw.shutdown.trigger();
    println!("one plugin: {alone:?}, three: {all:?}");
    assert!(alone > Duration::from_millis(500), "the nameserver answered? one lookup took {alone:?}");
    assert!(all < alone * 2, "three plugins took {all:?} to start, one {alone:?}");
}
