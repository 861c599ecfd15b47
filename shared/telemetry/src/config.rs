//! Configuration loading shared by every binary: defaults → TOML file →
//! `FLOTILLA_*` environment overrides → command-line flags. Each binary owns
//! its serde struct; this module owns reading, overriding and reporting.

use std::{fmt, net::SocketAddr, path::Path, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, de::DeserializeOwned};

/// Environment variable overriding `listen`.
pub const ENV_LISTEN: &str = "FLOTILLA_LISTEN";
/// Environment variable overriding `admin_listen`.
pub const ENV_ADMIN_LISTEN: &str = "FLOTILLA_ADMIN_LISTEN";

/// Every problem found in a configuration, reported together.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// Where the configuration came from (a file path or "defaults").
    pub source_name: String,
    /// One line per problem, each naming the key.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({}):", self.source_name)?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// A lookup of environment variables; tests pass a map instead of the process environment.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment as an [`Env`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Reads `path` (or the defaults when `None`) into `T`.
///
/// # Errors
/// A [`ConfigError`] naming the file and what could not be read or parsed.
pub fn read_file<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let source_name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        source_name: source_name.clone(),
        problems: vec![format!("cannot read the file: {e}")],
    })?;
    toml::from_str(&text).map_err(|e| ConfigError {
        source_name,
        problems: vec![e.to_string().trim_end().replace('\n', "\n    ")],
    })
}

/// Applies environment variable `name`, parsed as `V`, to `slot`; records a problem when it does not parse.
pub fn override_from_env<V: FromStr>(env: Env<'_>, name: &str, slot: &mut V, problems: &mut Vec<String>)
where
    V::Err: fmt::Display,
{
    if let Some(raw) = env(name) {
        match raw.trim().parse() {
            Ok(v) => *slot = v,
            Err(e) => problems.push(format!("{name}={raw:?}: {e}")),
        }
    }
}

/// Listen addresses every server binary has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listeners {
    /// gRPC.
    pub listen: SocketAddr,
    /// Admin HTTP.
    pub admin_listen: SocketAddr,
}

impl Listeners {
    /// Applies `FLOTILLA_LISTEN` / `FLOTILLA_ADMIN_LISTEN`, then the flags, which win.
    pub fn resolve(&mut self, env: Env<'_>, flags: &crate::CommonArgs, problems: &mut Vec<String>) {
        for (name, slot) in [(ENV_LISTEN, &mut self.listen), (ENV_ADMIN_LISTEN, &mut self.admin_listen)] {
            if let Some(raw) = env(name) {
                match parse_listen_addr(&raw) {
                    Ok(addr) => *slot = addr,
                    Err(e) => problems.push(format!("{name}={raw:?}: {e}")),
                }
            }
        }
        if let Some(a) = flags.listen {
            self.listen = a;
        }
        if let Some(a) = flags.admin_listen {
            self.admin_listen = a;
        }
    }
}

/// A listen address as flags, variables and files may write it: `IP:PORT`
/// (`0.0.0.0:8000`, `[::]:8000`), `:PORT` for every IPv4 interface, or
/// `HOST:PORT` with a name that resolves (`localhost:8000`; its first IPv4
/// address, else its first). Port 0 picks a free port.
///
/// # Errors
/// Says which forms are accepted, or that the name did not resolve.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Some(port) = text.strip_prefix(':') {
        return port
            .parse::<u16>()
            .map(|p| SocketAddr::from(([0, 0, 0, 0], p)))
            .map_err(|_| format!("{port:?} is not a port number"));
    }
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let forms = "use IP:PORT (0.0.0.0:8000), :PORT or HOST:PORT";
    let Some((host, port)) = text.rsplit_once(':') else { return Err(format!("no port: {forms}")) };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("not a listen address: {forms}"));
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(text)
        .map_err(|e| format!("{host:?} does not resolve ({e}): {forms}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{host:?} resolves to no address"))
}

/// Deserializes a listen address written as [`parse_listen_addr`] accepts.
///
/// # Errors
/// As [`parse_listen_addr`].
pub fn deserialize_listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_listen_addr(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

/// A duration written the human way in config files (`"5s"`, `"250ms"`, `"1m 30s"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = humantime::DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s).map(HumanDuration)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration like \"5s\" or \"250ms\": {e}"))
        })
    }
}

impl serde::Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn listen_addresses_take_ip_port_colon_port_and_host_port() {
        assert_eq!(parse_listen_addr("0.0.0.0:8000").unwrap(), SocketAddr::from(([0, 0, 0, 0], 8000)));
        assert_eq!(parse_listen_addr(" [::]:9090 ").unwrap().port(), 9090);
        assert_eq!(parse_listen_addr(":9090").unwrap(), SocketAddr::from(([0, 0, 0, 0], 9090)));
        assert_eq!(parse_listen_addr(":0").unwrap().port(), 0);
        let local = parse_listen_addr("localhost:8000").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 8000, "{local}");
        for bad in ["8000", ":http", "localhost", "0.0.0.0:99999", ":"] {
            let e = parse_listen_addr(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(parse_listen_addr("8000").unwrap_err().contains(":PORT"));
    }

    #[test]
    fn bad_env_value_is_reported_with_its_name() {
        let vars = HashMap::from([(ENV_LISTEN.to_owned(), "not-an-addr".to_owned())]);
        let env = |k: &str| vars.get(k).cloned();
        let mut addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut problems = Vec::new();
        override_from_env(&env, ENV_LISTEN, &mut addr, &mut problems);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("FLOTILLA_LISTEN=\"not-an-addr\""), "{problems:?}");
        assert_eq!(addr, "127.0.0.1:1".parse().unwrap());
    }

    #[test]
    fn durations_read_the_human_way() {
        assert_eq!("250ms".parse::<HumanDuration>().unwrap().0, Duration::from_millis(250));
        assert!("five seconds".parse::<HumanDuration>().is_err());
    }
}
