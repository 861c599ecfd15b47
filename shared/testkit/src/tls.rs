//! Certificates for TLS tests: a throwaway CA and the server certificates it
//! signs, written as PEM files, and a client that reports which certificate
//! a server presented.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio_rustls::{
    TlsConnector,
    rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName},
    },
};

/// A CA in a temporary directory: `ca.pem`, and server certificates issued on demand.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

/// A server certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct ServerFiles {
    /// The certificate (PEM), signed by the CA.
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// The certificate, DER: what a client sees in the handshake.
    pub der: CertificateDer<'static>,
}

impl TestCa {
    /// A new CA, its certificate written to [`TestCa::ca_pem`].
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "Flotilla test CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a key")).expect("CA");
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).expect("writing ca.pem");
        Self { issuer, dir }
    }

    /// The CA certificate (PEM) a client should trust.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The directory the files are in (removed with the CA).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issues a certificate for `localhost` and `127.0.0.1` and writes it to
    /// `<name>.crt` and `<name>.key`, replacing files of that name.
    pub fn issue(&self, name: &str) -> ServerFiles {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.issuer).expect("signing");
        let files = ServerFiles {
            cert: self.dir.path().join(format!("{name}.crt")),
            key: self.dir.path().join(format!("{name}.key")),
            der: cert.der().clone(),
        };
        std::fs::write(&files.key, key.serialize_pem()).expect("writing the key");
        std::fs::write(&files.cert, cert.pem()).expect("writing the certificate");
        files
    }

    /// A TLS client configuration trusting only this CA, offering ALPN `h2` as gRPC clients do.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).expect("the CA certificate");
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// A gRPC channel to `addr` over TLS, trusting only this CA (lazy: connects on the first call).
    pub fn channel(&self, addr: SocketAddr) -> tonic::transport::Channel {
        let pem = std::fs::read(self.ca_pem()).expect("reading ca.pem");
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem));
        tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .expect("valid URI")
            .tls_config(tls)
            .expect("TLS configuration")
            .connect_timeout(std::time::Duration::from_secs(2))
            .connect_lazy()
    }

    /// Handshakes with `addr` (as `127.0.0.1`) and returns the certificate it
    /// presented and the protocol it agreed by ALPN.
    ///
    /// # Errors
    /// The connection's or the handshake's error.
    pub async fn handshake(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<(CertificateDer<'static>, Option<Vec<u8>>)> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = TlsConnector::from(self.client_config()).connect(name, tcp).await?;
        let (_, session) = tls.get_ref();
        let leaf = session.peer_certificates().and_then(|c| c.first()).expect("a certificate").clone();
        Ok((leaf.into_owned(), session.alpn_protocol().map(<[u8]>::to_vec)))
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}
