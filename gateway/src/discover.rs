//! Discovery: keeps each plugin's set of replica addresses current and feeds
//! the changes to its balancer as tower [`Change`](tower::discover::Change)s.
//!
//! - `static://a,b` is resolved once.
//! - `dns://name:port` looks up A/AAAA records; `srv://name` looks up SRV
//!   records, then each target's addresses. Both go through hickory-resolver,
//!   with the plugin's nameserver or the system's.
//! - Lookups repeat when the answer's TTL runs out, kept between
//!   `dns_ttl_floor` and `dns_ttl_ceiling`. A failed or empty lookup keeps the
//!   last good set and is retried with backoff: a DNS hiccup never empties a
//!   plugin. Nothing here ever yields an error into the balancer, for which any
//!   error is fatal.

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

use hickory_resolver::{
    Resolver, TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::rr::{RData, Record},
};

use crate::{
    backend::Endpoints,
    config::{Plugin, Target},
};

/// First retry delay after a failed lookup; doubles up to the TTL ceiling.
const RETRY_START: Duration = Duration::from_millis(250);

/// What one lookup found.
#[derive(Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Every replica address.
    pub addrs: BTreeSet<SocketAddr>,
    /// How long the answer may be trusted (the records' TTL; `None` for static lists).
    pub ttl: Option<Duration>,
}

/// Resolves one plugin's target.
pub struct Lookup {
    target: Target,
    resolver: Option<TokioResolver>,
}

impl Lookup {
    /// A lookup for `plugin`'s target through its nameserver (or the system's).
    ///
    /// # Errors
    /// When the system resolver configuration cannot be read.
    pub fn new(plugin: &Plugin) -> Result<Self, String> {
        let resolver = match (&plugin.target, plugin.nameserver) {
            (Target::Static(_), _) => None,
            (_, Some(ns)) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = ns.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = ns.port();
                let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(
                    ns.ip(),
                    true,
                    vec![udp, tcp],
                )]);
                let mut builder = Resolver::builder_with_config(config, TokioRuntimeProvider::default());
                tune(builder.options_mut());
                Some(builder.build().map_err(|e| format!("building a resolver for {ns}: {e}"))?)
            }
            (_, None) => {
                let mut builder = TokioResolver::builder_tokio()
                    .map_err(|e| format!("reading the system resolver configuration: {e}"))?;
                tune(builder.options_mut());
                Some(builder.build().map_err(|e| format!("building the system resolver: {e}"))?)
            }
        };
        Ok(Self { target: plugin.target.clone(), resolver })
    }

    /// Looks the target up once.
    ///
    /// # Errors
    /// The resolver's error, in words.
    pub async fn resolve(&self) -> Result<Resolved, String> {
        let resolver = match (&self.target, &self.resolver) {
            (Target::Static(addrs), _) => {
                return Ok(Resolved { addrs: addrs.iter().copied().collect(), ttl: None });
            }
            (_, Some(r)) => r,
            (_, None) => return Err("no resolver".to_owned()),
        };
        match &self.target {
            Target::Static(_) => unreachable!("handled above"),
            Target::Dns { host, port } => {
                let answer = resolver.lookup_ip(host.as_str()).await.map_err(|e| e.to_string())?;
                let ttl = min_ttl(answer.as_lookup().answers());
                Ok(Resolved {
                    addrs: answer.iter().map(|ip| SocketAddr::new(ip, *port)).collect(),
                    ttl: Some(ttl),
                })
            }
            Target::Srv { name } => {
                let answer = resolver.srv_lookup(name.as_str()).await.map_err(|e| e.to_string())?;
                let mut ttl = min_ttl(answer.answers());
                let mut addrs = BTreeSet::new();
                let targets: Vec<(String, u16)> = answer
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::SRV(srv) => Some((srv.target.to_utf8(), srv.port)),
                        _ => None,
                    })
                    .collect();
                for (target, port) in targets {
                    match resolver.lookup_ip(target.as_str()).await {
                        Ok(ips) => {
                            ttl = ttl.min(min_ttl(ips.as_lookup().answers()));
                            addrs.extend(ips.iter().map(|ip| SocketAddr::new(ip, port)));
                        }
                        // One target that does not resolve does not hide the others.
                        Err(e) => {
                            tracing::warn!(srv = %name, %target, error = %e, "SRV target does not resolve")
                        }
                    }
                }
                Ok(Resolved { addrs, ttl: Some(ttl) })
            }
        }
    }
}

/// The smallest TTL among `records` (the records as the server sent them; our cache is short).
fn min_ttl(records: &[Record]) -> Duration {
    Duration::from_secs(records.iter().map(|r| u64::from(r.ttl)).min().unwrap_or(0))
}

fn tune(opts: &mut hickory_resolver::config::ResolverOpts) {
    // Each lookup is bounded; the discovery loop does its own retrying with backoff.
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    // We schedule re-resolution from the records' TTL ourselves (within the
    // floor and ceiling); a cache holding answers longer would hide changes.
    opts.positive_max_ttl = Some(Duration::from_millis(100));
    opts.negative_max_ttl = Some(Duration::from_millis(100));
}

/// Keeps `endpoints` in step with `lookup` until `shutdown`.
pub async fn run(
    lookup: Lookup,
    endpoints: Arc<Endpoints>,
    floor: Duration,
    ceiling: Duration,
    shutdown: flotilla_telemetry::Shutdown,
) {
    let mut retry = RETRY_START;
    let mut have_good = false;
    loop {
        let outcome = lookup.resolve().await;
        endpoints.metrics().discovery_refreshes.with_label_values(&[endpoints.plugin()]).inc();
        let wait = match outcome {
            Ok(resolved) if !resolved.addrs.is_empty() => {
                retry = RETRY_START;
                have_good = true;
                endpoints.update(&resolved.addrs);
                match resolved.ttl {
                    None => return, // static: nothing will change
                    Some(ttl) => ttl.clamp(floor, ceiling),
                }
            }
            other => {
                endpoints.metrics().discovery_errors.with_label_values(&[endpoints.plugin()]).inc();
                let why = match other {
                    Ok(_) => "the lookup found no addresses".to_owned(),
                    Err(e) => e,
                };
                if have_good {
                    tracing::warn!(plugin = %endpoints.plugin(), target = %endpoints.target(), error = %why, retry_in = ?retry, "Discovery failed; keeping the last known replicas");
                } else {
                    tracing::warn!(plugin = %endpoints.plugin(), target = %endpoints.target(), error = %why, retry_in = ?retry, "Discovery found no replicas yet");
                }
                let wait = retry;
                retry = (retry * 2).min(ceiling.max(RETRY_START));
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.wait() => return,
        }
    }
}
