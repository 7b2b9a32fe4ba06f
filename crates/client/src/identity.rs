//! The client's identities: the 128-bit client id (its session's name), the
//! Ed25519 [`OwnerKey`] of static and key-owned locks, and the monotonic
//! counters that go into requests (signature counters, first nonce).
//!
//! Files:
//!
//! - **client id file**: 32 lowercase hex digits and a newline.
//! - **owner key file**: PEM `PRIVATE KEY` (PKCS#8 v1, RFC 8410) holding the
//!   32-byte Ed25519 seed — the format `openssl genpkey -algorithm ed25519`
//!   writes, so `openssl pkey -in FILE -pubout` shows the public key. Written
//!   with mode 0600. Reading also accepts PKCS#8 v2 (with the public key,
//!   which must match) and a bare 64-hex-digit seed.
//!
//! Both are created atomically (written to a temporary file, then linked into
//! place without replacing anything), so two processes starting at once end
//! up sharing one id or one key, never one each.
//!
//! **Counters.** A key-owned grant refuses a RELEASE or REFRESH whose
//! signature counter is not larger than the last one used on it, and a
//! process that restarts with its key does not know that last counter. So
//! counters come from the wall clock in microseconds, bumped by one when
//! needed to stay strictly increasing within the process ([`Counter`]).
//! Across restarts they increase as long as the wall clock does not step
//! back by more than the restart took.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer, SigningKey};
use oclocks_proto::{signed_message, OwnerSig, SigOp};
use rand::rngs::OsRng;
use rand::RngCore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;

use crate::error::Error;

/// DER prefix of an Ed25519 PKCS#8 v1 private key (RFC 8410): SEQUENCE,
/// version 0, AlgorithmIdentifier id-Ed25519, OCTET STRING { OCTET STRING
/// (32 bytes) }. The 32-byte seed follows.
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// The same for PKCS#8 v2 (version 1, with the public key as `[1]`).
const PKCS8_V2_PREFIX: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// Between the seed and the public key in PKCS#8 v2: `[1]` BIT STRING, 33
/// bytes, no unused bits.
const PKCS8_V2_PUBLIC: [u8; 3] = [0x81, 0x21, 0x00];

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A strictly increasing counter seeded from the wall clock (see the module
/// docs): each call returns `max(previous + 1, now in µs)`.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    /// The next value, larger than every earlier one of this counter.
    pub fn next(&self) -> u64 {
        self.next_at(unix_micros())
    }

    /// [`Counter::next`] with the clock reading given.
    pub fn next_at(&self, now_micros: u64) -> u64 {
        let step = |prev: u64| prev.saturating_add(1).max(now_micros);
        match self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| Some(step(p)))
        {
            Ok(prev) | Err(prev) => step(prev),
        }
    }
}

/// The client id from `path` if it exists; else a random one, written there
/// if a path is given.
pub(crate) fn load_or_create_client_id(path: Option<&Path>) -> Result<u128, Error> {
    const WHAT: &str = "client id file";
    let Some(path) = path else {
        return Ok(random_client_id());
    };
    if !path.exists() {
        let id = random_client_id();
        let created = create_exclusive(path, format!("{id:032x}\n").as_bytes(), 0o644)
            .map_err(|e| Error::file(path, WHAT, e))?;
        if created {
            tracing::info!(path = %path.display(), "created client id file");
            return Ok(id);
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, WHAT, e))?;
    parse_client_id(&text).map_err(|m| Error::file(path, WHAT, m))
}

fn random_client_id() -> u128 {
    loop {
        let mut b = [0u8; 16];
        OsRng.fill_bytes(&mut b);
        let id = u128::from_be_bytes(b);
        if id != 0 {
            return id;
        }
    }
}

fn parse_client_id(text: &str) -> Result<u128, String> {
    let t = text.trim();
    if t.len() != 32 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("expected 32 hex digits".into());
    }
    match u128::from_str_radix(t, 16) {
        Ok(0) => Err("the client id 0 is not allowed".into()),
        Ok(id) => Ok(id),
        Err(e) => Err(e.to_string()),
    }
}

/// An Ed25519 owner key: proves ownership of static and key-owned locks.
#[derive(Clone)]
pub struct OwnerKey(SigningKey);

impl std::fmt::Debug for OwnerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "OwnerKey(public {})", hex(&self.public_key()))
    }
}

impl OwnerKey {
    /// A new random key.
    pub fn generate() -> OwnerKey {
        OwnerKey(SigningKey::generate(&mut OsRng))
    }

    /// The key with this 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> OwnerKey {
        OwnerKey(SigningKey::from_bytes(&seed))
    }

    /// Read a key file (see the module docs for the formats).
    pub fn load(path: &Path) -> Result<OwnerKey, Error> {
        const WHAT: &str = "owner key file";
        let bytes = std::fs::read(path).map_err(|e| Error::file(path, WHAT, e))?;
        warn_if_readable_by_others(path);
        OwnerKey::from_file_bytes(&bytes).map_err(|m| Error::file(path, WHAT, m))
    }

    /// The key in `path` if the file exists; else a new key, written there
    /// with mode 0600 (atomically: if another process wins the race, its key
    /// is loaded).
    pub fn load_or_create(path: &Path) -> Result<OwnerKey, Error> {
        if !path.exists() {
            let key = OwnerKey::generate();
            let created = create_exclusive(path, key.to_pkcs8_pem().as_bytes(), 0o600)
                .map_err(|e| Error::file(path, "owner key file", e))?;
            if created {
                tracing::info!(path = %path.display(), public = %hex(&key.public_key()), "created owner key file");
                return Ok(key);
            }
        }
        OwnerKey::load(path)
    }

    fn from_file_bytes(bytes: &[u8]) -> Result<OwnerKey, String> {
        let text = std::str::from_utf8(bytes).map(str::trim).unwrap_or("");
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut seed = [0u8; 32];
            for (i, byte) in seed.iter_mut().enumerate() {
                *byte =
                    u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
            }
            return Ok(OwnerKey::from_seed(seed));
        }
        let der = match PrivateKeyDer::from_pem_slice(bytes) {
            Ok(PrivateKeyDer::Pkcs8(der)) => der,
            Ok(_) => return Err("not an Ed25519 key (expected a PKCS#8 \"PRIVATE KEY\")".into()),
            Err(e) => {
                return Err(format!(
                    "expected a PEM Ed25519 private key or 64 hex digits: {e}"
                ))
            }
        };
        OwnerKey::from_pkcs8(der.secret_pkcs8_der())
    }

    fn from_pkcs8(der: &[u8]) -> Result<OwnerKey, String> {
        let not_ed25519 = || "not an Ed25519 PKCS#8 key".to_string();
        let seed_at = |prefix: &[u8; 16]| -> Option<[u8; 32]> {
            let rest = der.strip_prefix(prefix.as_slice())?;
            rest.get(..32)?.try_into().ok()
        };
        if der.len() == 48 {
            let seed = seed_at(&PKCS8_V1_PREFIX).ok_or_else(not_ed25519)?;
            return Ok(OwnerKey::from_seed(seed));
        }
        if der.len() == 83 {
            let seed = seed_at(&PKCS8_V2_PREFIX).ok_or_else(not_ed25519)?;
            let key = OwnerKey::from_seed(seed);
            let tail = &der[48..];
            if tail[..3] != PKCS8_V2_PUBLIC || tail[3..] != key.public_key() {
                return Err("the public key in the file does not match its private key".into());
            }
            return Ok(key);
        }
        Err(not_ed25519())
    }

    /// The key as PEM PKCS#8 v1, the format [`OwnerKey::load`] reads.
    pub fn to_pkcs8_pem(&self) -> String {
        let mut der = PKCS8_V1_PREFIX.to_vec();
        der.extend_from_slice(&self.0.to_bytes());
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64(&der)
        )
    }

    /// The 32-byte public key (the `OWNER_KEY` stored with a lock).
    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// Sign the canonical message of PROTOCOL.md section 8 and return the
    /// triple a request carries.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sign(
        &self,
        cluster_id: u128,
        op: SigOp,
        zone: &str,
        name: &str,
        token_or_nonce: u64,
        ttl_ms: u64,
        counter: u64,
    ) -> OwnerSig {
        let msg = signed_message(
            &cluster_id.to_be_bytes(),
            op,
            zone,
            name,
            token_or_nonce,
            ttl_ms,
            counter,
        );
        OwnerSig {
            public_key: self.public_key(),
            signature: self.0.sign(&msg).to_bytes(),
            counter,
        }
    }
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Standard base64 with padding, in 64-character lines (PEM body).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    let mut lines = String::new();
    for (i, c) in out.chars().enumerate() {
        if i > 0 && i % 64 == 0 {
            lines.push('\n');
        }
        lines.push(c);
    }
    lines
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "owner key file is accessible to other users; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

/// Create `path` with `contents` unless it exists. Returns whether this call
/// created it. The contents are written to a temporary file in the same
/// directory first and linked into place, so no reader ever sees a partial
/// file and an existing file is never replaced.
fn create_exclusive(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<bool> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{:08x}",
        std::process::id(),
        OsRng.next_u32()
    ));
    write_new(&tmp, contents, mode)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        // A file system without hard links: create the file in place.
        Err(_) => match write_new(path, contents, mode) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        },
    }
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, VerifyingKey};

    fn testdata(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name)
    }

    #[test]
    fn counter_is_strictly_increasing() {
        let c = Counter::default();
        assert_eq!(c.next_at(1000), 1000);
        assert_eq!(c.next_at(1000), 1001);
        assert_eq!(c.next_at(5), 1002, "a clock step back never lowers it");
        assert_eq!(c.next_at(2000), 2000);
        let a = c.next();
        assert!(c.next() > a);
    }

    #[test]
    fn client_id_file_is_created_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub-id");
        let a = load_or_create_client_id(Some(&path)).unwrap();
        assert_ne!(a, 0);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{a:032x}\n"));
        assert_eq!(load_or_create_client_id(Some(&path)).unwrap(), a);
        assert_ne!(load_or_create_client_id(None).unwrap(), a);
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn bad_client_id_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        for bad in [
            "",
            "xyz",
            "0000000000000000000000000000000",
            &"0".repeat(32),
        ] {
            std::fs::write(&path, bad).unwrap();
            let err = load_or_create_client_id(Some(&path)).unwrap_err();
            assert!(err.to_string().contains("client id file"), "{err}");
        }
        let missing_dir = dir.path().join("no/such/dir/id");
        assert!(load_or_create_client_id(Some(&missing_dir)).is_err());
    }

    #[test]
    fn owner_key_file_is_created_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owner.key");
        let a = OwnerKey::load_or_create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let b = OwnerKey::load_or_create(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{text}");
        assert!(!format!("{a:?}").contains(&hex(&a.0.to_bytes())));
    }

    /// The file openssl writes is read, and ours has the same layout.
    #[test]
    fn owner_key_reads_openssl_pem_and_hex() {
        let key = OwnerKey::load(&testdata("owner-ed25519.pem")).unwrap();
        let pem = std::fs::read_to_string(testdata("owner-ed25519.pem")).unwrap();
        assert_eq!(key.to_pkcs8_pem(), pem);

        let dir = tempfile::tempdir().unwrap();
        let hex_path = dir.path().join("hex.key");
        std::fs::write(&hex_path, format!("{}\n", hex(&key.0.to_bytes()))).unwrap();
        assert_eq!(
            OwnerKey::load(&hex_path).unwrap().public_key(),
            key.public_key()
        );

        // PKCS#8 v2 with the matching public key, and with a wrong one.
        let mut v2 = PKCS8_V2_PREFIX.to_vec();
        v2.extend_from_slice(&key.0.to_bytes());
        v2.extend_from_slice(&PKCS8_V2_PUBLIC);
        v2.extend_from_slice(&key.public_key());
        assert_eq!(
            OwnerKey::from_pkcs8(&v2).unwrap().public_key(),
            key.public_key()
        );
        let last = v2.len() - 1;
        v2[last] ^= 1;
        assert!(OwnerKey::from_pkcs8(&v2)
            .unwrap_err()
            .contains("does not match"));

        // A TLS key (P-256) is not an owner key.
        let err = OwnerKey::load(&testdata("client.key")).unwrap_err();
        assert!(err.to_string().contains("owner key file"), "{err}");
        std::fs::write(&hex_path, "hello").unwrap();
        assert!(OwnerKey::load(&hex_path).is_err());
    }

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0u8; 48]).len(), 64);
        assert_eq!(base64(&[0u8; 49]).lines().count(), 2);
    }

    /// A signature verifies (strictly, as servers do) over exactly
    /// `signed_message` of the same fields, and not over another message.
    #[test]
    fn signatures_cover_the_canonical_message() {
        let key = OwnerKey::from_seed([7; 32]);
        let cluster = 0x000102030405060708090a0b0c0d0e0f_u128;
        let sig = key.sign(cluster, SigOp::Lock, "default", "acct:4587", 42, 30_000, 1);
        assert_eq!(sig.public_key, key.public_key());
        assert_eq!(sig.counter, 1);
        let vk = VerifyingKey::from_bytes(&sig.public_key).unwrap();
        let signature = Signature::from_bytes(&sig.signature);
        let msg = signed_message(
            &cluster.to_be_bytes(),
            SigOp::Lock,
            "default",
            "acct:4587",
            42,
            30_000,
            1,
        );
        assert_eq!(msg.len(), 106, "PROTOCOL.md section 8 example");
        assert_eq!(&msg[22..38], &cluster.to_be_bytes());
        vk.verify_strict(&msg, &signature).unwrap();
        let other = signed_message(
            &cluster.to_be_bytes(),
            SigOp::Release,
            "default",
            "acct:4587",
            42,
            30_000,
            1,
        );
        assert!(vk.verify_strict(&other, &signature).is_err());
    }
}
