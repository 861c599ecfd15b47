//! TLS on a gRPC listener, for operators whose propeller dials with
//! `insecure: false` (PROTOCOL.md §2.3): TLS 1.2/1.3 with ALPN `h2`, a
//! certificate chain and key from PEM files, no client certificates.
//!
//! The files are re-read when they change (cert-manager and Kubernetes
//! secret volumes replace them in place), checked at most once per
//! [`RECHECK`] and only while handshakes come in: new connections get the new
//! certificate, open ones keep theirs. A replacement that does not load (half
//! written, or a key that does not match) is logged and the previous
//! certificate stays in use.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use flotilla_telemetry::config::Env;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, ServerConfig,
        crypto::CryptoProvider,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
        server::{ClientHello, ResolvesServerCert},
        sign::CertifiedKey,
    },
};

/// How often, at most, the files are checked for a change.
pub const RECHECK: Duration = Duration::from_secs(1);
/// Environment variable overriding `tls_cert_file`.
pub const ENV_TLS_CERT_FILE: &str = "FLOTILLA_TLS_CERT_FILE";
/// Environment variable overriding `tls_key_file`.
pub const ENV_TLS_KEY_FILE: &str = "FLOTILLA_TLS_KEY_FILE";

/// Applies [`ENV_TLS_CERT_FILE`] and [`ENV_TLS_KEY_FILE`] over a
/// configuration file's `tls_cert_file` and `tls_key_file` (set but empty
/// counts as unset, as a blank line in a compose file writes it).
pub fn override_from_env(env: Env<'_>, cert: &mut Option<PathBuf>, key: &mut Option<PathBuf>) {
    let var = |name| env(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(path) = var(ENV_TLS_CERT_FILE) {
        *cert = Some(path);
    }
    if let Some(path) = var(ENV_TLS_KEY_FILE) {
        *key = Some(path);
    }
}

/// Loads the `tls_cert_file` and `tls_key_file` of a configuration: `None`
/// (plaintext) when neither is set.
///
/// # Errors
/// One of the two set without the other, or what [`ServerTls::load`] finds wrong.
pub fn from_config(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<ServerTls>, String> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => ServerTls::load(cert, key).map(Some).map_err(|e| format!("tls: {e}")),
        (Some(_), None) => Err(format!(
            "tls_key_file ({ENV_TLS_KEY_FILE}): missing; tls_cert_file is set, and TLS needs both"
        )),
        (None, Some(_)) => Err(format!(
            "tls_cert_file ({ENV_TLS_CERT_FILE}): missing; tls_key_file is set, and TLS needs both"
        )),
    }
}

/// A listener's TLS: the acceptor handshakes run through. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    resolver: Arc<Reloading>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").field("files", &self.resolver.files).finish_non_exhaustive()
    }
}

impl fmt::Display for ServerTls {
    /// `certificate /path (2 in the chain), key /path`, for `--check-config`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chain = self.resolver.current().cert.len();
        let files = &self.resolver.files;
        write!(f, "certificate {} ({chain} in the chain), key {}", files.cert.display(), files.key.display())
    }
}

impl ServerTls {
    /// Loads the certificate chain (PEM, leaf first) and its private key
    /// (PEM: PKCS#8, PKCS#1 or SEC1).
    ///
    /// # Errors
    /// What is wrong, naming the file: unreadable, no certificate or key in
    /// it, a key type not supported, or a key that is not the certificate's.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, String> {
        let files = Files { cert: cert.to_owned(), key: key.to_owned() };
        let (loaded, stamp) = files.load()?;
        let resolver = Arc::new(Reloading {
            files,
            state: Mutex::new(State {
                key: Arc::new(loaded),
                stamp,
                checked: Instant::now(),
                rejected: None,
            }),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // gRPC clients (grpc-go since 1.67, grpcio) insist on h2 being negotiated.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { acceptor: TlsAcceptor::from(Arc::new(config)), resolver })
    }

    /// The acceptor a connection's handshake runs through.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
}

/// What a file looked like when it was read: a change to either means reload.
type Stamp = [(Option<SystemTime>, u64); 2];

impl Files {
    fn stamp(&self) -> Stamp {
        [&self.cert, &self.key]
            .map(|p| std::fs::metadata(p).map(|m| (m.modified().ok(), m.len())).unwrap_or((None, u64::MAX)))
    }

    /// Reads both files. The stamp is taken first, so that a change made
    /// while reading shows as a change at the next check.
    fn load(&self) -> Result<(CertifiedKey, Stamp), String> {
        let stamp = self.stamp();
        let (cert, key) = (&self.cert, &self.key);
        let cert_pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{}: no CERTIFICATE block in it", cert.display()));
        }
        let key_pem = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
        let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            format!("{}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1): {e}", key.display())
        })?;
        let loaded = CertifiedKey::from_der(chain, private, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                format!("{}: this key is not the key of the certificate in {}", key.display(), cert.display())
            }
            e => format!("{}: {e}", key.display()),
        })?;
        Ok((loaded, stamp))
    }
}

/// Hands every handshake the current certificate, reloading it when its files change.
#[derive(Debug)]
struct Reloading {
    files: Files,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    key: Arc<CertifiedKey>,
    stamp: Stamp,
    checked: Instant,
    /// Files that changed but did not load: not tried (or warned about) again until they change again.
    rejected: Option<Stamp>,
}

impl Reloading {
    fn current(&self) -> Arc<CertifiedKey> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).key.clone()
    }

    /// The certificate for a new handshake, after reloading it if the files
    /// changed and the last check is [`RECHECK`] old.
    fn certificate(&self, now: Instant) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now.saturating_duration_since(state.checked) >= RECHECK {
            state.checked = now;
            let stamp = self.files.stamp();
            if stamp != state.stamp && Some(stamp) != state.rejected {
                match self.files.load() {
                    Ok((key, stamp)) => {
                        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                        state.key = Arc::new(key);
                        state.stamp = stamp;
                        state.rejected = None;
                    }
                    // Half written, perhaps: looked at again once the files change again.
                    Err(error) => {
                        tracing::warn!(%error, "TLS certificate files changed but do not load; the previous \
                                                 certificate stays in use");
                        state.rejected = Some(stamp);
                    }
                }
            }
        }
        state.key.clone()
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certificate(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key, written as `<name>.crt` and `<name>.key`.
    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        (cert, key, made.cert.der().clone())
    }

    fn leaf(tls: &ServerTls, now: Instant) -> CertificateDer<'static> {
        tls.resolver.certificate(now).cert[0].clone()
    }

    #[test]
    fn a_matching_pair_loads_and_says_where_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, der) = write_pair(dir.path(), "a");
        let tls = ServerTls::load(&cert, &key).unwrap();
        assert_eq!(leaf(&tls, Instant::now()), der);
        let shown = tls.to_string();
        assert!(shown.contains("a.crt (1 in the chain)") && shown.contains("a.key"), "{shown}");
    }

    #[test]
    fn a_bad_pair_is_refused_naming_the_file_and_the_fault() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = write_pair(dir.path(), "a");
        let (_, other_key, _) = write_pair(dir.path(), "b");
        let missing = dir.path().join("missing.crt");
        let err = |cert: &Path, key: &Path| ServerTls::load(cert, key).unwrap_err();

        let e = err(&missing, &key);
        assert!(e.starts_with(&missing.display().to_string()), "{e}");
        // The key file where the certificate should be, and the other way round.
        let e = err(&key, &key);
        assert!(e.contains("a.key") && e.contains("no CERTIFICATE"), "{e}");
        let e = err(&cert, &cert);
        assert!(e.contains("a.crt") && e.contains("no PEM private key"), "{e}");
        let e = err(&cert, &other_key);
        assert!(e.contains("b.key: this key is not the key of the certificate in"), "{e}");
    }

    #[test]
    fn the_configuration_needs_both_files_or_neither() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = write_pair(dir.path(), "a");
        assert!(from_config(None, None).unwrap().is_none());
        assert!(from_config(Some(&cert), Some(&key)).unwrap().is_some());
        let e = from_config(Some(&cert), None).unwrap_err();
        assert!(e.starts_with("tls_key_file (FLOTILLA_TLS_KEY_FILE): missing"), "{e}");
        let e = from_config(None, Some(&key)).unwrap_err();
        assert!(e.starts_with("tls_cert_file (FLOTILLA_TLS_CERT_FILE): missing"), "{e}");

        let (mut c, mut k) = (Some(PathBuf::from("file.crt")), None);
        let env = |name: &str| match name {
            ENV_TLS_CERT_FILE => Some("  ".to_owned()),
            ENV_TLS_KEY_FILE => Some("/etc/tls/tls.key".to_owned()),
            _ => None,
        };
        override_from_env(&env, &mut c, &mut k);
        assert_eq!((c, k), (Some("file.crt".into()), Some("/etc/tls/tls.key".into())), "empty is unset");
    }

    #[test]
    fn replaced_files_are_loaded_at_the_next_check_and_broken_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, first) = write_pair(dir.path(), "a");
        let tls = ServerTls::load(&cert, &key).unwrap();
        let start = Instant::now();

        // Half written: the new key is there, the certificate not yet.
        let (new_cert, new_key, second) = write_pair(dir.path(), "b");
        std::fs::copy(&new_key, &key).unwrap();
        assert_eq!(leaf(&tls, start), first, "not checked before RECHECK");
        let later = start + RECHECK;
        assert_eq!(leaf(&tls, later), first, "a key without its certificate is not taken");

        std::fs::copy(&new_cert, &cert).unwrap();
        assert_eq!(leaf(&tls, later), first, "checked at most once per RECHECK");
        assert_eq!(leaf(&tls, later + RECHECK), second, "the complete pair is");

        // Garbage in place of the certificate: the last good one stays.
        std::fs::write(&cert, "not a certificate").unwrap();
        assert_eq!(leaf(&tls, later + RECHECK * 2), second);
    }
}
