//! Gateway configuration: [`GatewayConfig`] is what the TOML file and the
//! `FLOTILLA_*` variables say; [`Config`] is the validated value the gateway runs on.
//!
//! ```toml
//! listen = "0.0.0.0:8000"
//! admin_listen = "0.0.0.0:9090"
//! max_request_bytes = 16777216
//! refresh_interval = "10s"      # how often each plugin's ListAgents is polled
//! connect_timeout = "1s"
//! shutdown_grace = "30s"
//! dns_ttl_floor = "1s"          # re-resolve no sooner than this, whatever the records' TTL
//! dns_ttl_ceiling = "30s"       # and no later than this (Docker's DNS says 600 s)
//! auth_token_file = "/etc/secrets/flotilla-tokens"  # optional: callers must send `authorization: Bearer <token>`
//! tls_cert_file = "/etc/tls/tls.crt"  # optional, with tls_key_file: TLS (ALPN h2) instead of plaintext h2c,
//! tls_key_file = "/etc/tls/tls.key"   # for propeller's `insecure: false`; reloaded when the files change
//!
//! [[plugins]]
//! name = "echo"
//! discovery = "static://127.0.0.1:8001,127.0.0.1:8002"   # or dns://echo:8000, srv://_grpc._tcp.echo.service.consul
//! nameserver = "127.0.0.1:8600"  # optional, for dns:// and srv:// (ignored by static://); default: the system resolver
//! timeout = "5s"                # cap on every call to this plugin (the caller's deadline may be shorter)
//! timeouts = { GetTask = "3s" } # per-method caps, overriding `timeout`
//! categories = ["echo:0"]       # optional pins, for services whose ListAgents is missing
//! ```

use std::{
    collections::HashMap,
    fmt,
    net::{SocketAddr, ToSocketAddrs},
    path::PathBuf,
    time::Duration,
};

use flotilla_sdk::{Category, tls, tls::ServerTls};

use crate::auth::{Auth, Secret};
use flotilla_telemetry::{
    CommonArgs,
    config::{self, ConfigError, Env, HumanDuration, Listeners},
};
use serde::Deserialize;

/// The variables overriding `max_request_bytes` and `shutdown_grace`: the
/// plugin services' names for the same settings.
pub use flotilla_sdk::{ENV_MAX_REQUEST_BYTES, ENV_SHUTDOWN_GRACE};
/// Environment variable overriding `refresh_interval`.
pub const ENV_REFRESH_INTERVAL: &str = "FLOTILLA_REFRESH_INTERVAL";
/// Environment variable overriding `connect_timeout`.
pub const ENV_CONNECT_TIMEOUT: &str = "FLOTILLA_CONNECT_TIMEOUT";
/// Environment variable overriding `dns_ttl_floor`.
pub const ENV_DNS_TTL_FLOOR: &str = "FLOTILLA_DNS_TTL_FLOOR";
/// Environment variable overriding `dns_ttl_ceiling`.
pub const ENV_DNS_TTL_CEILING: &str = "FLOTILLA_DNS_TTL_CEILING";
/// Environment variable overriding `auth_token_file`.
pub const ENV_AUTH_TOKEN_FILE: &str = "FLOTILLA_AUTH_TOKEN_FILE";
/// Environment variable holding one more accepted token (see [`crate::auth`]);
/// there is no file key for it, so that tokens stay out of configuration files.
pub const ENV_AUTH_TOKEN: &str = crate::auth::FROM_ENV;
/// Environment variables overriding `tls_cert_file` and `tls_key_file`.
pub use flotilla_sdk::tls::{ENV_TLS_CERT_FILE, ENV_TLS_KEY_FILE};
/// Environment variable replacing the whole `[[plugins]]` list:
/// `name=discovery;name=discovery` (for example `echo=static://127.0.0.1:8001`).
pub const ENV_PLUGINS: &str = "FLOTILLA_PLUGINS";

/// The variables `flotilla-gateway --help` lists, each with the key it overrides.
pub const ENV_HELP: &str = "Environment (each over its configuration file key; flags win over both):
  FLOTILLA_PLUGINS              the whole plugin list: name=discovery;name=discovery
  FLOTILLA_LISTEN               listen
  FLOTILLA_ADMIN_LISTEN         admin_listen
  FLOTILLA_MAX_REQUEST_BYTES    max_request_bytes
  FLOTILLA_REFRESH_INTERVAL     refresh_interval
  FLOTILLA_CONNECT_TIMEOUT      connect_timeout
  FLOTILLA_SHUTDOWN_GRACE       shutdown_grace
  FLOTILLA_DNS_TTL_FLOOR        dns_ttl_floor
  FLOTILLA_DNS_TTL_CEILING      dns_ttl_ceiling
  FLOTILLA_AUTH_TOKEN_FILE      auth_token_file: bearer tokens callers must send, one per line
  FLOTILLA_AUTH_TOKEN           one more accepted token (no file key)
  FLOTILLA_TLS_CERT_FILE        tls_cert_file: serve TLS with this certificate chain (PEM)
  FLOTILLA_TLS_KEY_FILE         tls_key_file: its private key (PEM)";

/// The gateway's configuration file, as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// gRPC listen address.
    #[serde(deserialize_with = "flotilla_telemetry::config::deserialize_listen_addr")]
    pub listen: SocketAddr,
    /// Admin HTTP listen address.
    #[serde(deserialize_with = "flotilla_telemetry::config::deserialize_listen_addr")]
    pub admin_listen: SocketAddr,
    /// Largest request message accepted.
    pub max_request_bytes: usize,
    /// How often each plugin service's `ListAgents` is polled.
    pub refresh_interval: HumanDuration,
    /// How long connecting to a plugin replica may take.
    pub connect_timeout: HumanDuration,
    /// How long in-flight calls may take to finish after shutdown starts.
    pub shutdown_grace: HumanDuration,
    /// DNS answers are re-resolved no sooner than this after a lookup.
    pub dns_ttl_floor: HumanDuration,
    /// DNS answers are re-resolved no later than this after a lookup.
    pub dns_ttl_ceiling: HumanDuration,
    /// A file of bearer tokens callers must present (one per line); unset:
    /// no authentication (see [`crate::auth`]).
    pub auth_token_file: Option<PathBuf>,
    /// One more accepted token, from `FLOTILLA_AUTH_TOKEN` only.
    #[serde(skip)]
    pub auth_token: Option<Secret>,
    /// TLS on the gRPC listener: the certificate chain (PEM, the gateway's
    /// own first); with `tls_key_file`. Unset: plaintext HTTP/2 (h2c).
    pub tls_cert_file: Option<PathBuf>,
    /// TLS on the gRPC listener: the certificate's private key (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// The plugin services behind the gateway.
    pub plugins: Vec<PluginConfig>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            admin_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            max_request_bytes: 16 * 1024 * 1024,
            refresh_interval: HumanDuration(Duration::from_secs(10)),
            connect_timeout: HumanDuration(Duration::from_secs(1)),
            shutdown_grace: HumanDuration(Duration::from_secs(30)),
            dns_ttl_floor: HumanDuration(Duration::from_secs(1)),
            dns_ttl_ceiling: HumanDuration(Duration::from_secs(30)),
            auth_token_file: None,
            auth_token: None,
            tls_cert_file: None,
            tls_key_file: None,
            plugins: Vec::new(),
        }
    }
}

/// One plugin service, as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// A name for logs and metrics (`bigquery`).
    pub name: String,
    /// Where its replicas are: `static://host:port[,host:port…]`, `dns://name:port`
    /// (A/AAAA records) or `srv://_grpc._tcp.name` (SRV records).
    pub discovery: String,
    /// DNS server (`ip` or `ip:port`) for `dns://` and `srv://` discovery; default: the system resolver.
    #[serde(default)]
    pub nameserver: Option<String>,
    /// Cap on every call to this plugin.
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// Per-method caps (`CreateTask`, `GetTask`, `DeleteTask`, `ExecuteTaskSync`, ...), overriding `timeout`.
    #[serde(default)]
    pub timeouts: HashMap<String, HumanDuration>,
    /// Categories routed to this plugin whatever its `ListAgents` says (`"name:version"`).
    #[serde(default)]
    pub categories: Vec<String>,
}

/// Where a plugin's replicas are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A fixed list of addresses.
    Static(Vec<SocketAddr>),
    /// Every A/AAAA record of `host`, at `port`.
    Dns {
        /// The name to look up.
        host: String,
        /// The port every replica listens on.
        port: u16,
    },
    /// Every SRV record of `name`, each target's addresses at the record's port.
    Srv {
        /// The SRV name (`_grpc._tcp.echo.service.consul`).
        name: String,
    },
}

/// The methods a per-method timeout may name.
pub const METHODS: [&str; 8] = [
    "CreateTask",
    "GetTask",
    "DeleteTask",
    "GetTaskMetrics",
    "GetTaskLogs",
    "ExecuteTaskSync",
    "ListAgents",
    "GetAgent",
];

/// A validated plugin service.
#[derive(Clone, Debug)]
pub struct Plugin {
    /// Its name.
    pub name: String,
    /// Its discovery target as written, for messages.
    pub target_text: String,
    /// Its discovery target.
    pub target: Target,
    /// DNS server for `dns://` and `srv://`; `None` is the system resolver.
    pub nameserver: Option<SocketAddr>,
    /// Cap on every call.
    pub timeout: Option<Duration>,
    /// Per-method caps, by method name.
    pub timeouts: HashMap<String, Duration>,
    /// Pinned categories.
    pub pins: Vec<Category>,
}

impl Plugin {
    /// The cap on a call to `method`: its own timeout, else the plugin's.
    pub fn timeout_for(&self, method: &str) -> Option<Duration> {
        self.timeouts.get(method).copied().or(self.timeout)
    }
}

/// The validated gateway configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Admin HTTP listen address.
    pub admin_listen: SocketAddr,
    /// Largest request message accepted.
    pub max_request_bytes: usize,
    /// How often `ListAgents` is polled.
    pub refresh_interval: Duration,
    /// How long connecting to a replica may take.
    pub connect_timeout: Duration,
    /// How long in-flight calls may take to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// Earliest re-resolution after a DNS lookup.
    pub dns_ttl_floor: Duration,
    /// Latest re-resolution after a DNS lookup.
    pub dns_ttl_ceiling: Duration,
    /// Who may call, when authentication is on.
    pub auth: Option<Auth>,
    /// Where the tokens came from (file and/or environment), for `--check-config`.
    pub auth_sources: String,
    /// TLS on the gRPC listener; `None`: plaintext HTTP/2.
    pub tls: Option<ServerTls>,
    /// The plugin services.
    pub plugins: Vec<Plugin>,
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "listen = {}\nadmin_listen = {}", self.listen, self.admin_listen)?;
        writeln!(f, "max_request_bytes = {}", self.max_request_bytes)?;
        writeln!(f, "refresh_interval = {}", HumanDuration(self.refresh_interval))?;
        writeln!(f, "connect_timeout = {}", HumanDuration(self.connect_timeout))?;
        writeln!(f, "shutdown_grace = {}", HumanDuration(self.shutdown_grace))?;
        writeln!(f, "dns_ttl_floor = {}", HumanDuration(self.dns_ttl_floor))?;
        writeln!(f, "dns_ttl_ceiling = {}", HumanDuration(self.dns_ttl_ceiling))?;
        match &self.auth {
            Some(auth) => {
                writeln!(f, "auth = bearer, {} token(s) from {}", auth.tokens(), self.auth_sources)?
            }
            None => writeln!(f, "auth = off")?,
        }
        match &self.tls {
            Some(tls) => writeln!(f, "tls = on, {tls}")?,
            None => writeln!(f, "tls = off (plaintext HTTP/2)")?,
        }
        for p in &self.plugins {
            write!(f, "plugin {:?}: {}", p.name, p.target_text)?;
            if let Some(ns) = p.nameserver {
                write!(f, ", nameserver {ns}")?;
            }
            if let Some(t) = p.timeout {
                write!(f, ", timeout {}", HumanDuration(t))?;
            }
            let mut per_method: Vec<String> =
                p.timeouts.iter().map(|(m, t)| format!("{m} {}", HumanDuration(*t))).collect();
            per_method.sort();
            if !per_method.is_empty() {
                write!(f, ", timeouts {}", per_method.join(", "))?;
            }
            if !p.pins.is_empty() {
                let pins: Vec<String> = p.pins.iter().map(ToString::to_string).collect();
                write!(f, ", pinned {}", pins.join(", "))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Parses a discovery target.
///
/// # Errors
/// What is wrong with it, in words an operator can act on.
pub fn parse_target(text: &str) -> Result<Target, String> {
    if let Some(list) = text.strip_prefix("static://") {
        let mut addrs = Vec::new();
        for part in list.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(format!("{text:?}: empty address in the list"));
            }
            match part.parse::<SocketAddr>() {
                Ok(a) if a.port() == 0 => return Err(format!("{part:?}: port 0 is not a port to dial")),
                Ok(a) => addrs.push(a),
                Err(_) => {
                    let resolved = part
                        .to_socket_addrs()
                        .map_err(|e| format!("{part:?} is not a host:port that resolves: {e}"))?;
                    let first =
                        resolved.into_iter().next().ok_or_else(|| format!("{part:?} resolves to nothing"))?;
                    if first.port() == 0 {
                        return Err(format!("{part:?}: port 0 is not a port to dial"));
                    }
                    addrs.push(first);
                }
            }
        }
        return Ok(Target::Static(addrs));
    }
    if let Some(rest) = text.strip_prefix("dns://") {
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| {
            format!("{text:?}: expected dns://name:port (the port every replica listens on)")
        })?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{text:?}: {port:?} is not a port number (1-65535)"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{text:?}: the name is empty"));
        }
        if host.parse::<std::net::IpAddr>().is_err() && !dns_name(host) {
            return Err(format!(
                "{text:?}: {host:?} is not a DNS name (letters, digits, '-', '_' and dots between labels)"
            ));
        }
        return Ok(Target::Dns { host: host.to_owned(), port });
    }
    if let Some(name) = text.strip_prefix("srv://") {
        if !dns_name(name) {
            return Err(format!(
                "{text:?}: expected srv://_service._proto.name (ports come from the records)"
            ));
        }
        return Ok(Target::Srv { name: name.to_owned() });
    }
    Err(format!(
        "{text:?} is not a discovery target: expected static://host:port[,host:port…], dns://name:port or \
         srv://_grpc._tcp.name"
    ))
}

/// Whether `name` can be looked up: dot-separated labels of letters, digits,
/// `-` and `_` (SRV names start with `_service._proto`), a trailing dot allowed.
pub fn dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A nameserver: `ip:port`, or `ip` for port 53.
fn parse_nameserver(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{text:?} is not an ip or ip:port"))
}

/// `NAME:VERSION` (`NAME` alone is version 0): a task type name without
/// colons or white space, and a version from 0 up.
fn parse_category(text: &str) -> Result<Category, String> {
    let (name, version) = match text.split_once(':') {
        Some((_, v)) if v.contains(':') => {
            return Err(format!("{text:?}: more than one ':' (NAME:VERSION; task type names have no ':')"));
        }
        Some((n, v)) => {
            // Digits only: no sign, no spaces.
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "{text:?}: the version {v:?} is not a whole number from 0 up (NAME:VERSION)"
                ));
            }
            let version = v
                .parse()
                .map_err(|_| format!("{text:?}: the version {v} is more than the largest, {}", i32::MAX))?;
            (n, version)
        }
        None => (text, 0),
    };
    if name.is_empty() {
        return Err(format!("{text:?}: the task type name is empty (NAME:VERSION)"));
    }
    if let Some(c) = name.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{text:?}: the task type name holds {c:?}; task types have no white space"));
    }
    Ok(Category::new(name, version))
}

/// Reads `FLOTILLA_PLUGINS` (`name=target;name=target`).
fn plugins_from_env(raw: &str) -> Result<Vec<PluginConfig>, String> {
    raw.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|entry| {
            let (name, discovery) = entry
                .split_once('=')
                .ok_or_else(|| format!("{ENV_PLUGINS}: {entry:?} is not name=discovery"))?;
            Ok(PluginConfig {
                name: name.trim().to_owned(),
                discovery: discovery.trim().to_owned(),
                nameserver: None,
                timeout: None,
                timeouts: HashMap::new(),
                categories: Vec::new(),
            })
        })
        .collect()
}

impl GatewayConfig {
    /// Applies the `FLOTILLA_*` variables of every setting but the listeners,
    /// TLS and the plugin list: the limits, intervals, timeouts, the shutdown
    /// grace and the accepted tokens. A bad value becomes a problem naming the
    /// variable. `flotilla up`, which makes its own listeners and plugin list,
    /// takes these too.
    pub fn settings_from_env(&mut self, env: Env<'_>, problems: &mut Vec<String>) {
        config::override_from_env(env, ENV_MAX_REQUEST_BYTES, &mut self.max_request_bytes, problems);
        config::override_from_env(env, ENV_REFRESH_INTERVAL, &mut self.refresh_interval, problems);
        config::override_from_env(env, ENV_SHUTDOWN_GRACE, &mut self.shutdown_grace, problems);
        config::override_from_env(env, ENV_CONNECT_TIMEOUT, &mut self.connect_timeout, problems);
        config::override_from_env(env, ENV_DNS_TTL_FLOOR, &mut self.dns_ttl_floor, problems);
        config::override_from_env(env, ENV_DNS_TTL_CEILING, &mut self.dns_ttl_ceiling, problems);
        // Set but empty counts as unset, as a blank line in a compose file writes it.
        if let Some(path) = env(ENV_AUTH_TOKEN_FILE).filter(|p| !p.trim().is_empty()) {
            self.auth_token_file = Some(PathBuf::from(path.trim()));
        }
        // Read here, never through `override_from_env`: its errors quote the value.
        if let Some(token) = env(ENV_AUTH_TOKEN).filter(|t| !t.trim().is_empty()) {
            self.auth_token = Some(Secret(token));
        }
    }
}

impl Config {
    /// Loads defaults → `--config` file → `FLOTILLA_*` → flags, and validates it all.
    ///
    /// # Errors
    /// Every problem at once, each naming its key (`plugins[1].discovery: …`).
    pub fn load(flags: &CommonArgs, env: Env<'_>) -> Result<Self, ConfigError> {
        let mut raw: GatewayConfig = config::read_file(flags.config.as_deref())?;
        let mut problems = Vec::new();
        let mut listeners = Listeners { listen: raw.listen, admin_listen: raw.admin_listen };
        listeners.resolve(env, flags, &mut problems);
        (raw.listen, raw.admin_listen) = (listeners.listen, listeners.admin_listen);
        raw.settings_from_env(env, &mut problems);
        tls::override_from_env(env, &mut raw.tls_cert_file, &mut raw.tls_key_file);
        // Set but blank (or only `;`) counts as unset (a compose file's `FLOTILLA_PLUGINS=`): it would
        // otherwise empty the file's plugin list.
        if let Some(list) = env(ENV_PLUGINS).filter(|l| l.split(';').any(|entry| !entry.trim().is_empty())) {
            match plugins_from_env(&list) {
                Ok(p) => raw.plugins = p,
                Err(e) => problems.push(e),
            }
        }
        let source_name = flags
            .config
            .as_ref()
            .map_or_else(|| "defaults and environment".to_owned(), |p| p.display().to_string());
        Self::validate(raw, problems).map_err(|problems| ConfigError { source_name, problems })
    }

    /// Validates a raw configuration.
    ///
    /// # Errors
    /// Every problem found.
    pub fn validate(raw: GatewayConfig, mut problems: Vec<String>) -> Result<Self, Vec<String>> {
        if raw.max_request_bytes < 1024 {
            problems.push(format!(
                "max_request_bytes ({ENV_MAX_REQUEST_BYTES}): {} is below the minimum of 1024",
                raw.max_request_bytes
            ));
        }
        if raw.refresh_interval.0 < Duration::from_millis(100) {
            problems.push(format!(
                "refresh_interval ({ENV_REFRESH_INTERVAL}): {} is below the minimum of 100ms",
                raw.refresh_interval
            ));
        }
        if raw.dns_ttl_floor.0 > raw.dns_ttl_ceiling.0 {
            problems.push(format!(
                "dns_ttl_floor ({ENV_DNS_TTL_FLOOR}): {} is more than dns_ttl_ceiling ({ENV_DNS_TTL_CEILING}: {})",
                raw.dns_ttl_floor, raw.dns_ttl_ceiling
            ));
        }
        if raw.dns_ttl_floor.0 < Duration::from_millis(100) {
            problems.push(format!(
                "dns_ttl_floor ({ENV_DNS_TTL_FLOOR}): {} is below the minimum of 100ms",
                raw.dns_ttl_floor
            ));
        }
        if raw.connect_timeout.0.is_zero() {
            problems.push(format!("connect_timeout ({ENV_CONNECT_TIMEOUT}): must be more than zero"));
        }
        let auth = Auth::load(raw.auth_token_file.as_deref(), raw.auth_token.as_ref().map(|t| t.0.as_str()))
            .map_err(|e| problems.push(e))
            .ok()
            .flatten();
        let auth_sources = [
            raw.auth_token_file.as_ref().map(|p| p.display().to_string()),
            raw.auth_token.as_ref().map(|_| ENV_AUTH_TOKEN.to_owned()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" and ");
        let tls = tls::from_config(raw.tls_cert_file.as_deref(), raw.tls_key_file.as_deref())
            .map_err(|e| problems.push(e))
            .ok()
            .flatten();
        let mut names = HashMap::new();
        let mut pinned: HashMap<Category, String> = HashMap::new();
        let mut plugins = Vec::new();
        for (i, p) in raw.plugins.into_iter().enumerate() {
            if p.name.trim().is_empty() {
                problems.push(format!("plugins[{i}].name: must not be empty"));
            } else if let Some(j) = names.insert(p.name.clone(), i) {
                problems.push(format!("plugins[{i}].name: {:?} is already the name of plugins[{j}]", p.name));
            }
            let target =
                parse_target(&p.discovery).map_err(|e| problems.push(format!("plugins[{i}].discovery: {e}")));
            let nameserver = match p.nameserver.as_deref().map(parse_nameserver) {
                None => None,
                Some(Err(e)) => {
                    problems.push(format!("plugins[{i}].nameserver: {e}"));
                    None
                }
                // Harmless beside static addresses (switching a plugin from
                // srv:// to static:// need not mean deleting the line): ignored, said once.
                Some(Ok(ns)) if matches!(target, Ok(Target::Static(_))) => {
                    tracing::warn!(
                        plugin = %p.name,
                        %ns,
                        "plugins[{i}].nameserver is ignored: static:// discovery does not use DNS"
                    );
                    None
                }
                Some(Ok(ns)) => Some(ns),
            };
            let mut timeouts = HashMap::new();
            for (method, t) in &p.timeouts {
                if !METHODS.contains(&method.as_str()) {
                    problems.push(format!(
                        "plugins[{i}].timeouts: {method:?} is not a method; expected one of {}",
                        METHODS.join(", ")
                    ));
                } else if t.0.is_zero() {
                    problems.push(format!("plugins[{i}].timeouts.{method}: must be more than zero"));
                } else {
                    timeouts.insert(method.clone(), t.0);
                }
            }
            let mut pins = Vec::new();
            for c in &p.categories {
                match parse_category(c) {
                    Ok(c) => {
                        match pinned.insert(c.clone(), p.name.clone()) {
                            Some(other) if other == p.name => {
                                problems.push(format!("plugins[{i}].categories: {c} is listed twice"));
                            }
                            Some(other) => problems.push(format!(
                                "plugins[{i}].categories: {c} is pinned to both {other:?} and {:?}",
                                p.name
                            )),
                            None => {}
                        }
                        pins.push(c);
                    }
                    Err(e) => problems.push(format!("plugins[{i}].categories: {e}")),
                }
            }
            if p.timeout.is_some_and(|t| t.0.is_zero()) {
                problems.push(format!("plugins[{i}].timeout: must be more than zero"));
            }
            if let Ok(target) = target {
                plugins.push(Plugin {
                    name: p.name,
                    target_text: p.discovery,
                    target,
                    nameserver,
                    timeout: p.timeout.map(|t| t.0),
                    timeouts,
                    pins,
                });
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            listen: raw.listen,
            admin_listen: raw.admin_listen,
            max_request_bytes: raw.max_request_bytes,
            refresh_interval: raw.refresh_interval.0,
            connect_timeout: raw.connect_timeout.0,
            shutdown_grace: raw.shutdown_grace.0,
            dns_ttl_floor: raw.dns_ttl_floor.0,
            dns_ttl_ceiling: raw.dns_ttl_ceiling.0,
            auth,
            auth_sources,
            tls,
            plugins,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(toml_text: &str) -> GatewayConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let c = raw(r#"
            [[plugins]]
            name = "a"
            discovery = "ftp://x"
            [[plugins]]
            name = "a"
            discovery = "static://127.0.0.1:1"
            categories = ["echo:zero"]
        "#);
        let problems = Config::validate(c, vec![]).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems[0].starts_with("plugins[0].discovery"), "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("already the name of plugins[0]")));
        assert!(problems.iter().any(|p| p.contains("\"zero\" is not a whole number")), "{problems:#?}");
    }

    #[test]
    fn pins_are_a_name_and_a_version_from_0_up() {
        for (text, name, version) in [("echo", "echo", 0), ("echo:0", "echo", 0), ("sensor:12", "sensor", 12)]
        {
            let c = parse_category(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((c.name.as_str(), c.version), (name, version), "{text}");
        }
        for (text, why) in [
            ("echo:0:1", "more than one ':'"),
            ("echo:-3", "the version \"-3\""),
            ("echo:", "the version \"\""),
            ("echo: 1", "the version \" 1\""),
            ("echo:99999999999", "99999999999 is more than the largest, 2147483647"),
            (":1", "the task type name is empty"),
            (" echo:0", "holds ' '"),
            ("my task", "holds ' '"),
        ] {
            let e = parse_category(text).map(|c| format!("{c:?}")).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn dns_targets_parse_and_bad_ones_are_named() {
        assert_eq!(parse_target("dns://echo:8000").unwrap(), Target::Dns { host: "echo".into(), port: 8000 });
        assert_eq!(
            parse_target("srv://_grpc._tcp.echo.service.consul").unwrap(),
            Target::Srv { name: "_grpc._tcp.echo.service.consul".into() }
        );
        assert!(parse_target("dns://echo").unwrap_err().contains("dns://name:port"));
        assert!(parse_target("srv://x:1").is_err());
        // Names and ports that could never be dialled are refused here, not retried forever.
        assert!(parse_target("dns://bad name:80").unwrap_err().contains("is not a DNS name"));
        assert!(parse_target("dns://a..b:80").unwrap_err().contains("is not a DNS name"));
        assert!(parse_target("dns://echo:0").unwrap_err().contains("is not a port number"));
        assert!(parse_target("static://127.0.0.1:0").unwrap_err().contains("port 0"));
        assert!(parse_target("srv://_grpc._tcp.bad name").is_err());
        assert_eq!(parse_target("dns://[::1]:8000").unwrap(), Target::Dns { host: "::1".into(), port: 8000 });
        assert!(parse_target("dns://echo.flyte.svc.cluster.local.:8000").is_ok());
        let c = raw(r#"
            [[plugins]]
            name = "a"
            discovery = "static://127.0.0.1:1"
            nameserver = "127.0.0.1:8600"
            timeouts = { GetTsk = "1s" }
        "#);
        let problems = Config::validate(c, vec![]).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].contains("\"GetTsk\" is not a method"), "{problems:#?}");
        // A nameserver beside static addresses is ignored (not an error); a malformed one is named.
        let ok = |discovery: &str, ns: &str| {
            Config::validate(
                raw(&format!(
                    "[[plugins]]\nname = \"a\"\ndiscovery = \"{discovery}\"\nnameserver = \"{ns}\"\n"
                )),
                vec![],
            )
        };
        assert_eq!(ok("static://10.0.0.5:8000", "127.0.0.1:8600").unwrap().plugins[0].nameserver, None);
        assert_eq!(
            ok("dns://echo:8000", "127.0.0.1:8600").unwrap().plugins[0].nameserver,
            Some("127.0.0.1:8600".parse().unwrap())
        );
        let problems = ok("static://10.0.0.5:8000", "not an address").unwrap_err();
        assert!(problems[0].starts_with("plugins[0].nameserver: "), "{problems:#?}");
    }

    /// The flags with none given, as the binary would parse them.
    fn no_flags() -> CommonArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            common: CommonArgs,
        }
        <Cli as clap::Parser>::parse_from(["flotilla-gateway"]).common
    }

    #[test]
    fn the_environment_overrides_every_setting_and_tokens_are_never_shown() {
        let env = |name: &str| {
            Some(
                match name {
                    ENV_SHUTDOWN_GRACE => "7s",
                    ENV_CONNECT_TIMEOUT => "250ms",
                    ENV_DNS_TTL_FLOOR => "2s",
                    ENV_DNS_TTL_CEILING => "9s",
                    ENV_AUTH_TOKEN => "very-secret-token",
                    _ => return None,
                }
                .to_owned(),
            )
        };
        let c = Config::load(&no_flags(), &env).unwrap();
        assert_eq!(c.shutdown_grace, Duration::from_secs(7));
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!((c.dns_ttl_floor, c.dns_ttl_ceiling), (Duration::from_secs(2), Duration::from_secs(9)));
        let shown = format!("{c}\n{c:?}");
        assert!(shown.contains("auth = bearer, 1 token(s) from FLOTILLA_AUTH_TOKEN"), "{shown}");
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(format!("{}", Config::load(&no_flags(), &|_: &str| None).unwrap()).contains("auth = off"));
        // Set but empty: unset.
        let empty = |name: &str| [ENV_AUTH_TOKEN, ENV_AUTH_TOKEN_FILE].contains(&name).then(String::new);
        assert!(Config::load(&no_flags(), &empty).unwrap().auth.is_none());
        // A token that cannot be used is named by its variable, not quoted.
        let bad = |name: &str| (name == ENV_AUTH_TOKEN).then(|| "two words".to_owned());
        let e = Config::load(&no_flags(), &bad).unwrap_err().to_string();
        assert!(e.contains("FLOTILLA_AUTH_TOKEN") && !e.contains("two words"), "{e}");
    }

    #[test]
    fn tls_takes_both_files_from_the_file_or_the_environment_and_is_shown() {
        let ca = flotilla_testkit::tls::TestCa::new();
        let files = ca.issue("gateway");
        let text = format!("tls_cert_file = {:?}\ntls_key_file = {:?}\n", files.cert, files.key);
        let c = Config::validate(raw(&text), vec![]).unwrap();
        let shown = c.to_string();
        assert!(
            shown.contains(&format!("tls = on, certificate {} (1 in the chain)", files.cert.display())),
            "{shown}"
        );
        assert!(Config::validate(raw(""), vec![]).unwrap().to_string().contains("tls = off"));

        let only_cert = format!("tls_cert_file = {:?}\n", files.cert);
        let e = Config::validate(raw(&only_cert), vec![]).unwrap_err().join("\n");
        assert!(e.contains("tls_key_file (FLOTILLA_TLS_KEY_FILE): missing"), "{e}");

        let env = |name: &str| match name {
            ENV_TLS_CERT_FILE => Some(files.cert.display().to_string()),
            ENV_TLS_KEY_FILE => Some(files.key.display().to_string()),
            _ => None,
        };
        assert!(Config::load(&no_flags(), &env).unwrap().tls.is_some());
        let wrong = |name: &str| {
            (name == ENV_TLS_KEY_FILE || name == ENV_TLS_CERT_FILE).then(|| "/nonexistent/tls.pem".to_owned())
        };
        let e = Config::load(&no_flags(), &wrong).unwrap_err().to_string();
        assert!(e.contains("tls: /nonexistent/tls.pem: No such file"), "{e}");
    }

    #[test]
    fn the_help_names_every_variable() {
        let every = [
            ENV_PLUGINS,
            flotilla_telemetry::config::ENV_LISTEN,
            flotilla_telemetry::config::ENV_ADMIN_LISTEN,
            ENV_MAX_REQUEST_BYTES,
            ENV_REFRESH_INTERVAL,
            ENV_CONNECT_TIMEOUT,
            ENV_SHUTDOWN_GRACE,
            ENV_DNS_TTL_FLOOR,
            ENV_DNS_TTL_CEILING,
            ENV_AUTH_TOKEN_FILE,
            ENV_AUTH_TOKEN,
            ENV_TLS_CERT_FILE,
            ENV_TLS_KEY_FILE,
        ];
        for name in every {
            assert!(ENV_HELP.lines().any(|l| l.split_whitespace().next() == Some(name)), "{name}");
        }
        assert_eq!(ENV_HELP.lines().count(), every.len() + 1, "a variable listed that does not exist");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<GatewayConfig>("lisen = \"0.0.0.0:1\"").unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
    }

    #[test]
    fn plugins_come_from_the_environment() {
        let p = plugins_from_env("echo=static://127.0.0.1:1,127.0.0.1:2; bq=static://127.0.0.1:3").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            parse_target(&p[0].discovery).unwrap(),
            Target::Static(vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()])
        );
        assert!(plugins_from_env("nonsense").is_err());
    }

    #[test]
    fn a_blank_plugin_variable_leaves_the_files_plugins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, "[[plugins]]\nname = \"echo\"\ndiscovery = \"static://127.0.0.1:8001\"\n")
            .unwrap();
        let mut flags = no_flags();
        flags.config = Some(file);
        for blank in ["", "  ", ";", " ; "] {
            let env = |name: &str| (name == ENV_PLUGINS).then(|| blank.to_owned());
            let c = Config::load(&flags, &env).unwrap();
            assert_eq!(c.plugins.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["echo"], "{blank:?}");
        }
        let env = |name: &str| (name == ENV_PLUGINS).then(|| "bq=static://127.0.0.1:9".to_owned());
        let c = Config::load(&flags, &env).unwrap();
        assert_eq!(c.plugins.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["bq"]);
    }
}
