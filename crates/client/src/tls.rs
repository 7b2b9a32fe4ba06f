//! TLS 1.3 with mutual authentication: the rustls client configuration
//! built from the PEM files of [`ClientConfig`], the [`TlsConnector`] that
//! dials one endpoint, and the translation of TLS failures into clear
//! [`Error`]s.
//!
//! The ring provider is passed explicitly (no process-wide default is
//! installed or needed), only TLS 1.3 is offered, servers are verified
//! against the configured CA only (no system roots), and ALPN offers
//! `oclocks/1` and requires the server to select it.
//!
//! **A rejected client certificate.** In TLS 1.3 the client sends its
//! certificate in its last handshake flight and considers the handshake done
//! before the server has checked it; the server's refusal (an alert such as
//! `bad_certificate`, `unknown_ca` or `certificate_required`) arrives on the
//! client's first read. [`classify_io`] recognises such an alert on any read
//! — in practice the read of the HELLO reply — and reports
//! [`Error::CertificateRejected`] instead of a bare "connection reset".

use std::io;
use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use oclocks_proto::ALPN_CLIENT;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, RootCertStore};
use tokio::net::TcpStream;

use crate::config::{split_host_port, ClientConfig};
use crate::conn::{BoxIo, Connector};
use crate::error::Error;

/// The rustls client configuration for `config`: its CA as the only root,
/// its certificate and key for client authentication, TLS 1.3, ALPN
/// `oclocks/1`.
pub(crate) fn client_tls_config(config: &ClientConfig) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(&config.ca_file, "CA file")? {
        roots.add(cert).map_err(|e| {
            Error::file(
                &config.ca_file,
                "CA file",
                format!("not a usable CA certificate: {e}"),
            )
        })?;
    }
    let chain = read_certs(&config.cert_file, "certificate file")?;
    let key = read_key(&config.key_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            Error::Tls(format!(
                "client certificate {} with key {}: {e}",
                config.cert_file.display(),
                config.key_file.display()
            ))
        })?;
    tls.alpn_protocols = vec![ALPN_CLIENT.to_vec()];
    Ok(Arc::new(tls))
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, what, e))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::file(path, what, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::file(path, what, "no CERTIFICATE in it"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    const WHAT: &str = "key file";
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, WHAT, e))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            Error::file(path, WHAT, "no PRIVATE KEY in it")
        }
        e => Error::file(path, WHAT, format!("bad PEM: {e}")),
    })
}

/// Dials an endpoint: TCP, then the TLS handshake, then checks ALPN.
pub(crate) struct TlsConnector {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl TlsConnector {
    /// A connector for `config` (reads its TLS files now, so a bad file is
    /// reported before anything connects).
    pub fn new(config: &ClientConfig) -> Result<TlsConnector, Error> {
        let tls = client_tls_config(config)?;
        let server_name = match &config.server_name {
            None => None,
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|e| Error::Config(format!("server_name: {name:?}: {e}")))?,
            ),
        };
        Ok(TlsConnector {
            connector: tokio_rustls::TlsConnector::from(tls),
            server_name,
        })
    }
}

impl Connector for TlsConnector {
    fn connect(&self, endpoint: String) -> BoxFuture<'static, Result<BoxIo, Error>> {
        let connector = self.connector.clone();
        let fixed_name = self.server_name.clone();
        Box::pin(async move {
            let (host, _) = split_host_port(&endpoint).map_err(Error::Config)?;
            let name = match fixed_name {
                Some(n) => n,
                None => ServerName::try_from(host.to_owned()).map_err(|e| {
                    Error::Config(format!("endpoint {endpoint:?}: {e}; set server_name"))
                })?,
            };
            let tcp = TcpStream::connect(endpoint.as_str())
                .await
                .map_err(|e| Error::Connect {
                    endpoint: endpoint.clone(),
                    message: e.to_string(),
                })?;
            let _ = tcp.set_nodelay(true);
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| classify_io(&endpoint, &e))?;
            match tls.get_ref().1.alpn_protocol() {
                Some(p) if p == ALPN_CLIENT => Ok(Box::new(tls) as BoxIo),
                other => Err(Error::Tls(format!(
                    "{endpoint}: the server did not select ALPN {:?} (got {:?})",
                    String::from_utf8_lossy(ALPN_CLIENT),
                    other.map(String::from_utf8_lossy)
                ))),
            }
        })
    }
}

/// Translate an I/O error of a TLS stream (handshake or later read) into
/// the most telling [`Error`].
pub(crate) fn classify_io(endpoint: &str, err: &io::Error) -> Error {
    if let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return classify_tls(endpoint, tls);
    }
    Error::Connect {
        endpoint: endpoint.to_owned(),
        message: err.to_string(),
    }
}

fn classify_tls(endpoint: &str, err: &rustls::Error) -> Error {
    use AlertDescription as A;
    match err {
        rustls::Error::AlertReceived(
            alert @ (A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::CertificateRequired
            | A::AccessDenied),
        ) => Error::CertificateRejected {
            endpoint: endpoint.to_owned(),
            alert: format!("{alert:?}"),
        },
        rustls::Error::AlertReceived(A::NoApplicationProtocol) => Error::Tls(format!(
            "{endpoint}: the server does not speak {:?} (ALPN)",
            String::from_utf8_lossy(ALPN_CLIENT)
        )),
        rustls::Error::InvalidCertificate(why) => Error::Tls(format!(
            "{endpoint}: the server's certificate is not accepted: {why}"
        )),
        other => Error::Tls(format!("{endpoint}: {other}")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    use rustls::server::WebPkiClientVerifier;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    pub fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name)
    }

    pub fn test_config(endpoint: &str, client: &str) -> ClientConfig {
        ClientConfig::new(
            [endpoint],
            testdata("ca.pem"),
            testdata(&format!("{client}.pem")),
            testdata(&format!("{client}.key")),
        )
    }

    /// A TLS acceptor like a server's: TLS 1.3, client certificates
    /// required and verified against `ca.pem`, ALPN as given.
    fn acceptor(alpn: &[u8]) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for c in read_certs(&testdata("ca.pem"), "ca").unwrap() {
            roots.add(c).unwrap();
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                read_certs(&testdata("server.pem"), "cert").unwrap(),
                read_key(&testdata("server.key")).unwrap(),
            )
            .unwrap();
        cfg.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    }

    /// Accept one connection; echo one byte back if the handshake works.
    async fn serve_once(
        alpn: &'static [u8],
    ) -> (String, tokio::task::JoinHandle<Result<(), String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let acceptor = acceptor(alpn);
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            tls.write_all(&b).await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok(())
        });
        (addr, task)
    }

    #[tokio::test]
    async fn mutual_tls_with_alpn_works() {
        let (addr, server) = serve_once(ALPN_CLIENT).await;
        let connector = TlsConnector::new(&test_config(&addr, "client")).unwrap();
        let mut io = connector.connect(addr.clone()).await.unwrap();
        io.write_all(b"x").await.unwrap();
        io.flush().await.unwrap();
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"x");
        server.await.unwrap().unwrap();
    }

    /// A certificate from another CA passes the client's handshake and is
    /// refused on the first read, with an error that says so.
    #[tokio::test]
    async fn rejected_client_certificate_surfaces_on_first_read() {
        let (addr, server) = serve_once(ALPN_CLIENT).await;
        let connector = TlsConnector::new(&test_config(&addr, "stranger")).unwrap();
        let mut io = connector
            .connect(addr.clone())
            .await
            .expect("TLS 1.3 client finishes first");
        let _ = io.write_all(b"x").await;
        let _ = io.flush().await;
        let mut b = [0u8; 1];
        let err = io.read_exact(&mut b).await.unwrap_err();
        let classified = classify_io(&addr, &err);
        assert!(
            matches!(classified, Error::CertificateRejected { .. }),
            "{classified:?}"
        );
        assert!(classified
            .to_string()
            .contains("rejected the client certificate"));
        assert!(server.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn wrong_alpn_is_refused() {
        let (addr, _server) = serve_once(b"something-else/1").await;
        let connector = TlsConnector::new(&test_config(&addr, "client")).unwrap();
        let err = match connector.connect(addr.clone()).await {
            Ok(_) => panic!("connected without ALPN agreement"),
            Err(e) => e,
        };
        assert!(err.to_string().contains("ALPN"), "{err}");
    }

    #[tokio::test]
    async fn server_name_must_match_the_certificate() {
        let (addr, _server) = serve_once(ALPN_CLIENT).await;
        let mut cfg = test_config(&addr, "client");
        cfg.server_name = Some("elsewhere.example".into());
        let connector = TlsConnector::new(&cfg).unwrap();
        let err = match connector.connect(addr.clone()).await {
            Ok(_) => panic!("connected to a server with the wrong name"),
            Err(e) => e,
        };
        assert!(
            err.to_string().contains("certificate is not accepted"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn refused_tcp_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let connector = TlsConnector::new(&test_config(&addr, "client")).unwrap();
        let err = match connector.connect(addr.clone()).await {
            Ok(_) => panic!("connected to nothing"),
            Err(e) => e,
        };
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    }

    #[test]
    fn bad_tls_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let mut cfg = test_config("127.0.0.1:1", "client");
        cfg.ca_file = empty.clone();
        let err = TlsConnector::new(&cfg).err().unwrap();
        assert!(
            err.to_string().contains("CA file") && err.to_string().contains("empty.pem"),
            "{err}"
        );

        let mut cfg = test_config("127.0.0.1:1", "client");
        cfg.key_file = empty;
        let err = TlsConnector::new(&cfg).err().unwrap();
        assert!(err.to_string().contains("no PRIVATE KEY"), "{err}");

        let mut cfg = test_config("127.0.0.1:1", "client");
        cfg.cert_file = dir.path().join("missing.pem");
        let err = TlsConnector::new(&cfg).err().unwrap();
        assert!(err.to_string().contains("certificate file"), "{err}");

        // A key that does not belong to the certificate.
        let mut cfg = test_config("127.0.0.1:1", "client");
        cfg.key_file = testdata("server.key");
        let err = TlsConnector::new(&cfg).err().unwrap();
        assert!(err.to_string().contains("client certificate"), "{err}");
    }
}
