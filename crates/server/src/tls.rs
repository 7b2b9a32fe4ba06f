//! TLS for the server: rustls, TLS 1.3 only, a client certificate required
//! and verified against the configured CA, ALPN selecting the protocol; and
//! the identity a verified certificate proves.
//!
//! The crypto provider (ring) is always passed explicitly: two providers in
//! one process make rustls panic at run time when none is chosen.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// The URI SAN that marks a server certificate (the peer protocol and the
/// server role; see ARCHITECTURE.md).
pub const SERVER_ROLE_URI: &str = "oclocks:role:server";

/// TLS setup failed; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Certificates from a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File {
        what: "certificates",
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate found".into()));
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        what: "private key",
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// The server's rustls configuration: TLS 1.3 only, client certificates
/// required and verified against `ca`, ALPN `alpn` (in order of preference).
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Config(format!("CA certificate in {}: {e}", ca.display())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Config(format!("certificate/key {}: {e}", cert.display())))?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Who a verified certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The identity sessions are bound to: the subject CN, or else the first
    /// URI SAN that is not a role marker.
    pub name: String,
    /// The certificate carries the server role URI SAN.
    pub server_role: bool,
}

/// The identity of an end-entity certificate (already verified by rustls).
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                uris.push(u.to_string());
            }
        }
    }
    let server_role = uris.iter().any(|u| u == SERVER_ROLE_URI);
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let name = cn
        .filter(|s| !s.is_empty())
        .or_else(|| uris.into_iter().find(|u| u != SERVER_ROLE_URI))?;
    Some(PeerIdentity { name, server_role })
}

/// The rustls configuration this server dials peers with: TLS 1.3 only,
/// the peer's certificate verified against `ca`, this server's own
/// certificate presented as the client certificate, ALPN `oclocks-peer/1`.
pub fn peer_client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Config(format!("CA certificate in {}: {e}", ca.display())))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Config(format!("certificate/key {}: {e}", cert.display())))?;
    cfg.alpn_protocols = vec![oclocks_proto::ALPN_PEER.to_vec()];
    Ok(Arc::new(cfg))
}
