//! `oclocks certs`: a development certificate authority and the server and
//! client certificates it signs (rcgen). Production deployments bring their
//! own CA; these are for `oclocks dev`, tests and trying things out.
//!
//! Files in the directory: `ca.pem`/`ca.key`, and `NAME.pem`/`NAME.key` per
//! issued certificate. Keys are written with mode 0600. Existing files are
//! never overwritten.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The URI SAN that gives a certificate the server role.
pub const SERVER_ROLE_URI: &str = oclocks_server::tls::SERVER_ROLE_URI;

/// What an issued certificate is for.
pub enum Role {
    /// A server: serverAuth + clientAuth (peers), the server role URI SAN,
    /// and the given DNS names / IP addresses.
    Server { sans: Vec<String> },
    /// A client: clientAuth only; its CN is its identity.
    Client,
}

fn write_new(path: &Path, contents: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        if secret {
            opts.mode(0o600);
        }
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

/// Paths of a certificate and its key in `dir`.
pub fn files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// Make a development CA in `dir` (`ca.pem`, `ca.key`).
pub fn init(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (cert_path, key_path) = files(dir, "ca");
    if cert_path.exists() || key_path.exists() {
        bail!("a CA already exists in {}", dir.display());
    }
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "OpenCluster-Locks development CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).context("cannot sign the CA")?;
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)?;
    Ok(())
}

/// Issue a certificate named `name` signed by the CA in `dir`.
pub fn issue(dir: &Path, name: &str, role: Role) -> Result<(PathBuf, PathBuf)> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("certificate name {name:?}: use letters, digits, '-', '_' and '.'");
    }
    let (ca_cert, ca_key) = files(dir, "ca");
    let ca_pem = std::fs::read_to_string(&ca_cert)
        .with_context(|| format!("cannot read the CA certificate {}", ca_cert.display()))?;
    let ca_key_pem = std::fs::read_to_string(&ca_key)
        .with_context(|| format!("cannot read the CA key {}", ca_key.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("the CA key does not parse")?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("the CA certificate does not parse")?;
    let (cert_path, key_path) = files(dir, name);
    if cert_path.exists() || key_path.exists() {
        bail!("{} already exists", cert_path.display());
    }
    let mut params = match &role {
        Role::Server { sans } => CertificateParams::new(sans.clone())?,
        Role::Client => CertificateParams::new(Vec::<String>::new())?,
    };
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    match role {
        Role::Server { .. } => {
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params
                .subject_alt_names
                .push(SanType::URI(SERVER_ROLE_URI.try_into()?));
        }
        Role::Client => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    let key = KeyPair::generate().context("cannot generate a key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("cannot sign the certificate")?;
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)?;
    Ok((cert_path, key_path))
}
