//! TLS on a gRPC listener, for operators whose propeller dials with
//! `insecure: false` (PROTOCOL.md §2.3): TLS 1.2/1.3 with ALPN `h2`, a
//! certificate chain and key from PEM files, no client certificates.
//!
//! While a listener serves, a task of its own ([`ServerTls::watch`]) reads
//! the two files every [`RECHECK`] and loads them when their contents
//! change: a renewal by cert-manager, or a Kubernetes secret volume swapping
//! its `..data` link, reaches new connections without a restart (open ones
//! keep theirs). A replacement that does not load (half written, a key that
//! is not the certificate's) is logged once and the previous certificate
//! stays in use. Handshakes only clone the current certificate.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
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

/// Why a certificate and key do not make a listener's TLS. Each names its file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file is not PEM, or holds no certificate.
    #[error("{}: no PEM certificate chain in it ({detail})", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What the PEM parser found.
        detail: String,
    },
    /// The key file holds no private key rustls reads.
    #[error("{}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1): {detail}", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
        /// The PEM parser's complaint.
        detail: String,
    },
    /// The key is not the one of the certificate.
    #[error("{}: this key is not the key of the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// The key or certificate is of a kind rustls refuses (P-521, say).
    #[error("{}: {source}", path.display())]
    Unsupported {
        /// The key file.
        path: PathBuf,
        /// rustls's reason.
        #[source]
        source: rustls::Error,
    },
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
    /// (PEM: PKCS#8, PKCS#1 or SEC1; RSA, ECDSA P-256/P-384 or Ed25519).
    ///
    /// # Errors
    /// What is wrong, naming the file: unreadable, no certificate or key in
    /// it, a key type not supported, or a key that is not the certificate's.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let files = Files { cert: cert.to_owned(), key: key.to_owned() };
        let contents = files.read()?;
        let loaded = files.parse(&contents)?;
        let resolver = Arc::new(Reloading {
            files,
            current: RwLock::new(Arc::new(loaded)),
            seen: Mutex::new(Seen { loaded: contents, rejected: None, unreadable: None, loads: 1 }),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring's provider supports the default TLS versions")
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

    /// Starts re-reading the files every [`RECHECK`] (on the blocking pool),
    /// until the returned guard is dropped. Needs a Tokio runtime.
    pub fn watch(&self) -> Watch {
        let resolver = self.resolver.clone();
        Watch(tokio::spawn(async move {
            let mut every = tokio::time::interval(RECHECK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                let resolver = resolver.clone();
                let _ = tokio::task::spawn_blocking(move || resolver.check()).await;
            }
        }))
    }
}

/// Stops [`ServerTls::watch`]'s task when dropped.
#[derive(Debug)]
pub struct Watch(tokio::task::JoinHandle<()>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
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

/// The two files' bytes, certificate then key.
type Contents = (Vec<u8>, Vec<u8>);

impl Files {
    fn read(&self) -> Result<Contents, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
        };
        Ok((read(&self.cert)?, read(&self.key)?))
    }

    fn parse(&self, (cert_pem, key_pem): &Contents) -> Result<CertifiedKey, TlsError> {
        let (cert, key) = (&self.cert, &self.key);
        let no_chain = |detail| TlsError::NoCertificate { path: cert.clone(), detail };
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| no_chain(e.to_string()))?;
        if chain.is_empty() {
            return Err(no_chain("no CERTIFICATE block".to_owned()));
        }
        if key_pem.windows(9).any(|w| w == b"ENCRYPTED") {
            let detail = "it is encrypted: give the key decrypted (openssl pkey -in KEY -out KEY.plain)";
            return Err(TlsError::NoKey { path: key.clone(), detail: detail.to_owned() });
        }
        let private = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TlsError::NoKey { path: key.clone(), detail: e.to_string() })?;
        CertifiedKey::from_der(chain, private, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                TlsError::KeyMismatch { key: key.clone(), cert: cert.clone() }
            }
            source => TlsError::Unsupported { path: key.clone(), source },
        })
    }
}

/// Hands every handshake the current certificate; [`Reloading::check`] replaces it.
#[derive(Debug)]
struct Reloading {
    files: Files,
    current: RwLock<Arc<CertifiedKey>>,
    seen: Mutex<Seen>,
}

/// What the checks have seen of the files.
#[derive(Debug)]
struct Seen {
    /// The contents the current certificate came from.
    loaded: Contents,
    /// Contents that did not load: not tried (or warned about) again.
    rejected: Option<Contents>,
    /// The last read error, warned about once.
    unreadable: Option<String>,
    /// How many times contents were parsed, the first load included.
    loads: u32,
}

impl Reloading {
    fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Reads the files and, when their contents are new, loads them. Blocking
    /// (file reads); returns whether the certificate was replaced.
    fn check(&self) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let contents = match self.files.read() {
            Ok(c) => c,
            Err(error) => {
                let error = error.to_string();
                if seen.unreadable.as_ref() != Some(&error) {
                    tracing::warn!(%error, "TLS files cannot be read; the current certificate stays in use");
                    seen.unreadable = Some(error);
                }
                return false;
            }
        };
        seen.unreadable = None;
        if contents == seen.loaded || seen.rejected.as_ref() == Some(&contents) {
            return false;
        }
        seen.loads += 1;
        match self.files.parse(&contents) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
                seen.loaded = contents;
                seen.rejected = None;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                true
            }
            // Half written, perhaps: tried again once the files change again.
            Err(error) => {
                tracing::warn!(%error, "TLS files changed but do not load; the old certificate stays in use");
                seen.rejected = Some(contents);
                false
            }
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
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

    fn leaf(tls: &ServerTls) -> CertificateDer<'static> {
        tls.resolver.current().cert[0].clone()
    }

    fn loads(tls: &ServerTls) -> u32 {
        tls.resolver.seen.lock().unwrap().loads
    }

    #[test]
    fn a_matching_pair_loads_and_says_where_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, der) = write_pair(dir.path(), "a");
        let tls = ServerTls::load(&cert, &key).unwrap();
        assert_eq!(leaf(&tls), der);
        let shown = tls.to_string();
        assert!(shown.contains("a.crt (1 in the chain)") && shown.contains("a.key"), "{shown}");
    }

    #[test]
    fn a_bad_pair_is_refused_naming_the_file_and_the_fault() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = write_pair(dir.path(), "a");
        let (_, other_key, _) = write_pair(dir.path(), "b");
        let missing = dir.path().join("missing.crt");
        let err = |cert: &Path, key: &Path| ServerTls::load(cert, key).unwrap_err().to_string();

        let e = err(&missing, &key);
        assert!(e.starts_with(&missing.display().to_string()), "{e}");
        // The key file where the certificate should be, and the other way round.
        let e = err(&key, &key);
        assert!(e.contains("a.key") && e.contains("no CERTIFICATE"), "{e}");
        let e = err(&cert, &cert);
        assert!(e.contains("a.crt") && e.contains("no PEM private key"), "{e}");
        let encrypted = dir.path().join("encrypted.key");
        std::fs::write(
            &encrypted,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = err(&cert, &encrypted);
        assert!(e.contains("encrypted.key") && e.contains("it is encrypted"), "{e}");
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
    fn new_contents_are_loaded_once_complete_and_each_is_parsed_once() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, first) = write_pair(dir.path(), "a");
        let tls = ServerTls::load(&cert, &key).unwrap();
        assert!(!tls.resolver.check(), "unchanged");
        assert_eq!(loads(&tls), 1, "unchanged contents are not parsed again");

        // Half written: the new key is there, its certificate not yet.
        let (new_cert, new_key, second) = write_pair(dir.path(), "b");
        std::fs::copy(&new_key, &key).unwrap();
        assert!(!tls.resolver.check());
        assert_eq!(leaf(&tls), first, "a key without its certificate is not taken");
        assert!(!tls.resolver.check());
        assert_eq!(loads(&tls), 2, "refused contents are not parsed (or warned about) again");

        std::fs::copy(&new_cert, &cert).unwrap();
        assert!(tls.resolver.check());
        assert_eq!(leaf(&tls), second, "the complete pair is taken");

        // Garbage in place of the certificate, then no file at all: the last good one stays.
        std::fs::write(&cert, "not a certificate").unwrap();
        assert!(!tls.resolver.check());
        std::fs::remove_file(&cert).unwrap();
        assert!(!tls.resolver.check());
        assert_eq!(leaf(&tls), second);
        assert_eq!(loads(&tls), 4);
    }

    /// A Kubernetes secret volume: `tls.crt -> ..data/tls.crt`, `..data -> ..<timestamp>`;
    /// an update writes a new timestamped directory and renames a new `..data` link over the old.
    #[test]
    fn a_secret_volume_update_is_followed() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let version = |name: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            let (cert, key, der) = write_pair(&d, "pair");
            std::fs::rename(cert, d.join("tls.crt")).unwrap();
            std::fs::rename(key, d.join("tls.key")).unwrap();
            der
        };
        let first = version("..2026_11_29_01");
        symlink("..2026_11_29_01", dir.path().join("..data")).unwrap();
        symlink("..data/tls.crt", dir.path().join("tls.crt")).unwrap();
        symlink("..data/tls.key", dir.path().join("tls.key")).unwrap();
        let tls = ServerTls::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap();
        assert_eq!(leaf(&tls), first);

        let second = version("..2026_11_29_02");
        symlink("..2026_11_29_02", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert!(tls.resolver.check());
        assert_eq!(leaf(&tls), second);
    }
}
