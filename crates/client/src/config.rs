//! [`ClientConfig`]: where the servers are, the TLS files, the optional
//! identity files, and the timing knobs. Built in code
//! ([`ClientConfig::new`] plus field assignments) or read from a TOML file
//! ([`ClientConfig::from_file`]).
//!
//! Durations in TOML are strings with a unit: `"500ms"`, `"15s"`, `"2m"`,
//! `"1h"`, or sums like `"1m30s"` (see [`parse_duration`]). A bare number is
//! refused, so a value never silently means the wrong unit. Unknown keys are
//! errors.
//!
//! ```toml
//! endpoints = ["127.0.0.1:7001", "127.0.0.1:7002"]
//! ca_file = "ca.pem"            # relative paths are relative to this file
//! cert_file = "client.pem"
//! key_file = "client.key"
//! owner_key_file = "owner.key"  # optional: made (mode 0600) if missing
//! session_timeout = "15s"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use oclocks_proto::Limits;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Requests in flight reserved for the client's own traffic (HELLO,
/// KEEPALIVE, CANCEL, background RELEASE), out of `requests_in_flight_max`.
pub(crate) const RESERVED_IN_FLIGHT: usize = 16;

/// The client's settings. Every field but the endpoints and the three TLS
/// files has a default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Servers as `host:port` (`[v6addr]:port` for IPv6 literals). The
    /// client connects to the first that answers and fails over to the
    /// others.
    pub endpoints: Vec<String>,
    /// PEM file of the CA certificate(s) that sign the servers' certificates.
    pub ca_file: PathBuf,
    /// PEM file of this client's certificate chain (leaf first).
    pub cert_file: PathBuf,
    /// PEM file of this client's private key (PKCS#8, SEC1 or PKCS#1).
    pub key_file: PathBuf,
    /// The name to verify in the servers' certificates (and send as SNI).
    /// Default: the host part of each endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// The owner key (Ed25519) of static and key-owned locks. Loaded if the
    /// file exists, else generated and written with mode 0600. `None`: a
    /// fresh key per process, so static locks can only be released by this
    /// process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_key_file: Option<PathBuf>,
    /// Where the 128-bit client id is kept (32 hex digits). Loaded if the
    /// file exists, else generated and written. `None`: a fresh id per
    /// process. One process per file: a previous incarnation's session is
    /// closed when the client connects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id_file: Option<PathBuf>,
    /// The session timeout to ask for (the server may clamp it). Connection
    /// locks end this long after the last keepalive the cluster confirmed.
    #[serde(default = "defaults::session_timeout", with = "duration_serde")]
    pub session_timeout: Duration,
    /// How long a request waits for its reply (acquires: their wait bound
    /// plus this) before failing locally.
    #[serde(default = "defaults::request_timeout", with = "duration_serde")]
    pub request_timeout: Duration,
    /// Bound on one connection attempt: TCP connect plus TLS handshake plus
    /// HELLO. Also how long [`crate::Client::connect`] keeps asking servers
    /// that answer HELLO with NOT_LEADER or UNAVAILABLE (no leader yet).
    #[serde(default = "defaults::connect_timeout", with = "duration_serde")]
    pub connect_timeout: Duration,
    /// Reconnect backoff: the first delay (before jitter).
    #[serde(default = "defaults::backoff_min", with = "duration_serde")]
    pub reconnect_backoff_min: Duration,
    /// Reconnect backoff: the largest delay (before jitter); at most a
    /// quarter of `session_timeout` is used, so that the session's client
    /// tries several times before the session could expire.
    #[serde(default = "defaults::backoff_max", with = "duration_serde")]
    pub reconnect_backoff_max: Duration,
    /// Requests one connection may have awaiting their final reply (the
    /// server's `requests_in_flight_max`). A few are reserved for the
    /// client's own traffic; callers beyond the rest wait for a slot.
    #[serde(default = "defaults::requests_in_flight_max")]
    pub requests_in_flight_max: usize,
    /// Add the serving servers a HELLO_OK (or an UNAVAILABLE refusal)
    /// lists to the endpoints tried on reconnect (a client given one
    /// endpoint learns the others).
    #[serde(default = "defaults::learn_endpoints")]
    pub learn_endpoints: bool,
    /// How often the client measures the round-trip time to every known
    /// server (a few STATUS requests each, on a separate short-lived
    /// connection), to connect to the fastest one and move to a clearly
    /// faster one. The first round runs at connect. `"0"`: no scheduled
    /// measuring (endpoints are then tried in configured order, the last
    /// one that worked first).
    #[serde(default = "defaults::probe_interval", with = "duration_serde")]
    pub probe_interval: Duration,
    /// Wire limits the codec enforces (defaults: PROTOCOL.md section 9).
    #[serde(default)]
    pub limits: Limits,
}

mod defaults {
    use std::time::Duration;

    pub fn session_timeout() -> Duration {
        Duration::from_secs(15)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn backoff_min() -> Duration {
        Duration::from_millis(100)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_secs(2)
    }
    pub fn requests_in_flight_max() -> usize {
        1024
    }
    pub fn learn_endpoints() -> bool {
        true
    }
    pub fn probe_interval() -> Duration {
        Duration::from_secs(30)
    }
}

impl ClientConfig {
    /// A configuration with these endpoints and TLS files and every other
    /// field at its default.
    pub fn new(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        ca_file: impl Into<PathBuf>,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> ClientConfig {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ca_file: ca_file.into(),
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            server_name: None,
            owner_key_file: None,
            client_id_file: None,
            session_timeout: defaults::session_timeout(),
            request_timeout: defaults::request_timeout(),
            connect_timeout: defaults::connect_timeout(),
            reconnect_backoff_min: defaults::backoff_min(),
            reconnect_backoff_max: defaults::backoff_max(),
            requests_in_flight_max: defaults::requests_in_flight_max(),
            learn_endpoints: defaults::learn_endpoints(),
            probe_interval: defaults::probe_interval(),
            limits: Limits::default(),
        }
    }

    /// Parse a TOML document. Relative paths stay as written (see
    /// [`ClientConfig::from_file`] for resolution against a directory).
    pub fn from_toml_str(text: &str) -> Result<ClientConfig, Error> {
        let config: ClientConfig =
            toml::from_str(text).map_err(|e| Error::Config(e.to_string().trim_end().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    /// Read a TOML file. Relative file paths in it are resolved against the
    /// file's directory, so a config and its certificates can move together.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ClientConfig, Error> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::file(path, "config file", e))?;
        let mut config: ClientConfig = toml::from_str(&text).map_err(|e| {
            Error::Config(format!("{}: {}", path.display(), e.to_string().trim_end()))
        })?;
        if let Some(dir) = path.parent() {
            config.resolve_paths(dir);
        }
        config
            .validate()
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    /// This configuration as a TOML document ([`ClientConfig::from_toml_str`]
    /// reads it back).
    pub fn to_toml_string(&self) -> Result<String, Error> {
        toml::to_string(self).map_err(|e| Error::Config(e.to_string()))
    }

    /// Make every relative file path relative to `dir` instead.
    pub fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        fix(&mut self.ca_file);
        fix(&mut self.cert_file);
        fix(&mut self.key_file);
        if let Some(p) = self.owner_key_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.client_id_file.as_mut() {
            fix(p);
        }
    }

    /// Check the values (not the files): an error names the field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &str, why: String| Err(Error::Config(format!("{field}: {why}")));
        if self.endpoints.is_empty() {
            return bad("endpoints", "at least one host:port is needed".into());
        }
        for e in &self.endpoints {
            if let Err(why) = split_host_port(e) {
                return bad("endpoints", why);
            }
        }
        for (field, d) in [
            ("session_timeout", self.session_timeout),
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
            ("reconnect_backoff_min", self.reconnect_backoff_min),
            ("reconnect_backoff_max", self.reconnect_backoff_max),
        ] {
            if d.is_zero() {
                return bad(field, "must be more than 0".into());
            }
            if u64::try_from(d.as_millis()).is_err() {
                return bad(field, "too large".into());
            }
        }
        if u64::try_from(self.probe_interval.as_millis()).is_err() {
            return bad("probe_interval", "too large".into());
        }
        if self.reconnect_backoff_min > self.reconnect_backoff_max {
            return bad(
                "reconnect_backoff_min",
                "must not be more than reconnect_backoff_max".into(),
            );
        }
        if self.requests_in_flight_max <= RESERVED_IN_FLIGHT {
            return bad(
                "requests_in_flight_max",
                format!(
                    "must be more than {RESERVED_IN_FLIGHT} (reserved for keepalives and cancels)"
                ),
            );
        }
        if let Some(name) = &self.server_name {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return bad(
                    "server_name",
                    format!("{name:?} is not a DNS name or IP address"),
                );
            }
        }
        Ok(())
    }
}

/// Split `host:port` (or `[v6]:port`) into host and port.
pub(crate) fn split_host_port(endpoint: &str) -> Result<(&str, u16), String> {
    let (host, port) = if let Some(rest) = endpoint.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{endpoint:?}: missing ']'"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| format!("{endpoint:?}: expected host:port"))?;
        (host, port)
    } else {
        endpoint
            .rsplit_once(':')
            .ok_or_else(|| format!("{endpoint:?}: expected host:port"))?
    };
    if host.is_empty() || (host.contains(':') && !endpoint.starts_with('[')) {
        return Err(format!(
            "{endpoint:?}: expected host:port (write IPv6 as [addr]:port)"
        ));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("{endpoint:?}: bad port {port:?}"))?;
    Ok((host, port))
}

/// Parse a duration: one or more `<integer><unit>` terms, units `ms`, `s`,
/// `m`, `h`, `d` (`"500ms"`, `"15s"`, `"1m30s"`); `"0"` is zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("{text:?}: expected a number, like 500ms, 15s, 2m"));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let ms_per = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("{text:?}: missing unit (ms, s, m, h, d)")),
            other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m, h, d)")),
        };
        let ms = value
            .checked_mul(ms_per)
            .ok_or_else(|| format!("{text:?}: too large"))?;
        total = total
            .checked_add(Duration::from_millis(ms))
            .ok_or_else(|| format!("{text:?}: too large"))?;
    }
    Ok(total)
}

/// Format a duration the way [`parse_duration`] reads it, in the largest
/// unit that is exact (`15s`, `1500ms`, `2m`). Sub-millisecond parts are
/// dropped.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0".into();
    }
    for (unit, per) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms % per == 0 {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// Serde for durations as strings with a unit.
mod duration_serde {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with a unit, like \"500ms\", \"15s\" or \"2m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                super::parse_duration(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "{v}: write durations as strings with a unit, like \"{v}ms\" or \"{v}s\""
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "{v}: write durations as strings with a unit, like \"{v}ms\" or \"{v}s\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_duration("15s"), Ok(ms(15_000)));
        assert_eq!(parse_duration("2m"), Ok(ms(120_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("1d"), Ok(ms(86_400_000)));
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration(" 0 "), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "15",
            "s",
            "1.5s",
            "-1s",
            "10x",
            "1s2",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration("15").unwrap_err().contains("missing unit"));
    }

    #[test]
    fn durations_format_and_round_trip() {
        for (d, s) in [
            (Duration::ZERO, "0"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(15), "15s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(7200), "2h"),
        ] {
            assert_eq!(format_duration(d), s);
            assert_eq!(parse_duration(s), Ok(d));
        }
    }

    #[test]
    fn endpoints_split() {
        assert_eq!(split_host_port("localhost:7000"), Ok(("localhost", 7000)));
        assert_eq!(split_host_port("127.0.0.1:1"), Ok(("127.0.0.1", 1)));
        assert_eq!(split_host_port("[::1]:7000"), Ok(("::1", 7000)));
        for bad in [
            "localhost",
            ":7000",
            "::1:7000",
            "[::1]",
            "[::1]7000",
            "h:99999",
            "h:x",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad:?}");
        }
    }

    const MINIMAL: &str = r#"
        endpoints = ["127.0.0.1:7001"]
        ca_file = "ca.pem"
        cert_file = "client.pem"
        key_file = "client.key"
    "#;

    #[test]
    fn toml_defaults() {
        let c = ClientConfig::from_toml_str(MINIMAL).unwrap();
        assert_eq!(
            c,
            ClientConfig::new(["127.0.0.1:7001"], "ca.pem", "client.pem", "client.key")
        );
        assert_eq!(c.session_timeout, Duration::from_secs(15));
        assert_eq!(c.requests_in_flight_max, 1024);
        assert_eq!(c.probe_interval, Duration::from_secs(30));
    }

    #[test]
    fn toml_full_round_trip() {
        let text = format!(
            "{MINIMAL}\nserver_name = \"oclocks.internal\"\nowner_key_file = \"owner.key\"\n\
             client_id_file = \"client.id\"\nsession_timeout = \"5s\"\nrequest_timeout = \"1m\"\n\
             connect_timeout = \"750ms\"\nreconnect_backoff_min = \"10ms\"\n\
             reconnect_backoff_max = \"1s\"\nrequests_in_flight_max = 64\n\
             learn_endpoints = false\nprobe_interval = \"0\"\n[limits]\nlock_name_bytes_max = 100\n"
        );
        let c = ClientConfig::from_toml_str(&text).unwrap();
        assert_eq!(c.server_name.as_deref(), Some("oclocks.internal"));
        assert_eq!(c.session_timeout, Duration::from_secs(5));
        assert_eq!(c.request_timeout, Duration::from_secs(60));
        assert_eq!(c.connect_timeout, Duration::from_millis(750));
        assert_eq!(c.requests_in_flight_max, 64);
        assert!(!c.learn_endpoints);
        assert_eq!(c.probe_interval, Duration::ZERO);
        assert_eq!(c.limits.lock_name_bytes_max, 100);
        assert_eq!(c.limits.zone_name_bytes_max, 63);
        let again = ClientConfig::from_toml_str(&c.to_toml_string().unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn toml_errors_name_the_field() {
        let cases = [
            ("session_timeout = 15", "unit"),
            ("session_timeout = \"15\"", "missing unit"),
            ("session_timeout = \"0s\"", "session_timeout"),
            ("bogus = 1", "bogus"),
            ("requests_in_flight_max = 3", "requests_in_flight_max"),
            ("server_name = \"not a name\"", "server_name"),
            ("reconnect_backoff_min = \"5s\"", "reconnect_backoff_min"),
        ];
        for (extra, want) in cases {
            let err = ClientConfig::from_toml_str(&format!("{MINIMAL}\n{extra}\n")).unwrap_err();
            assert!(err.to_string().contains(want), "{extra}: {err}");
        }
        let err = ClientConfig::from_toml_str(
            "endpoints = []\nca_file=\"a\"\ncert_file=\"b\"\nkey_file=\"c\"",
        )
        .unwrap_err();
        assert!(err.to_string().contains("endpoints"), "{err}");
        let err = ClientConfig::from_toml_str("endpoints = [\"x:1\"]").unwrap_err();
        assert!(err.to_string().contains("ca_file"), "{err}");
    }

    #[test]
    fn file_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.toml");
        std::fs::write(
            &path,
            format!("{MINIMAL}\nowner_key_file = \"/abs/owner.key\"\nclient_id_file = \"id\"\n"),
        )
        .unwrap();
        let c = ClientConfig::from_file(&path).unwrap();
        assert_eq!(c.ca_file, dir.path().join("ca.pem"));
        assert_eq!(c.key_file, dir.path().join("client.key"));
        assert_eq!(
            c.owner_key_file.as_deref(),
            Some(Path::new("/abs/owner.key"))
        );
        assert_eq!(c.client_id_file, Some(dir.path().join("id")));
        let err = ClientConfig::from_file(dir.path().join("missing.toml")).unwrap_err();
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }
}
