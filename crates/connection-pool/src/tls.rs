//! STARTTLS policy and the rustls client configurations behind it.

use dashmap::DashMap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// Whether and how a session upgrades to TLS with STARTTLS (RFC 3207).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// Use STARTTLS when offered, without checking the certificate: most MX hosts have
    /// certificates that would not verify, and encrypting anyway beats sending in clear
    /// (RFC 7435). A host whose handshake failed recently is talked to in plaintext.
    #[default]
    Opportunistic,
    /// Insist on STARTTLS with a certificate that verifies for the MX host name; otherwise
    /// the session fails with [`crate::ClientError::TlsRequired`].
    Required,
    /// Never use STARTTLS.
    Disabled,
}

/// What a session negotiated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsInfo {
    /// Protocol version, e.g. `TLSv1.3`.
    pub protocol: String,
    /// Cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// Whether the certificate was verified ([`TlsMode::Required`]).
    pub verified: bool,
}

impl std::fmt::Display for TlsInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.protocol, self.cipher)
    }
}

impl TlsInfo {
    pub(crate) fn from_connection(conn: &rustls::ClientConnection, verified: bool) -> TlsInfo {
        let protocol = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
            Some(other) => format!("{other:?}"),
            None => "unknown".to_owned(),
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|s| {
                let suite = s.suite();
                suite
                    .as_str()
                    .map_or_else(|| format!("{suite:?}"), str::to_owned)
            })
            .unwrap_or_else(|| "unknown".to_owned());
        TlsInfo {
            protocol,
            cipher,
            verified,
        }
    }
}

/// Hosts whose TLS handshake failed recently, shared by all sessions that should learn from
/// each other. An opportunistic session to such a host skips STARTTLS until the entry expires,
/// so a broken TLS stack on the receiver delays mail once instead of forever.
#[derive(Debug, Clone)]
pub struct TlsFailureMemory {
    failed: Arc<DashMap<IpAddr, Instant>>,
    ttl: Duration,
}

impl Default for TlsFailureMemory {
    fn default() -> Self {
        TlsFailureMemory::new(TlsFailureMemory::DEFAULT_TTL)
    }
}

impl TlsFailureMemory {
    /// How long a failure is remembered unless told otherwise.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

    /// An empty memory whose entries expire after `ttl`.
    pub fn new(ttl: Duration) -> TlsFailureMemory {
        TlsFailureMemory {
            failed: Arc::new(DashMap::new()),
            ttl,
        }
    }

    /// The process-wide memory that [`crate::ConnectOptions::new`] uses.
    pub fn global() -> TlsFailureMemory {
        static GLOBAL: OnceLock<TlsFailureMemory> = OnceLock::new();
        GLOBAL.get_or_init(TlsFailureMemory::default).clone()
    }

    /// Notes a failed handshake with `ip`.
    pub fn remember(&self, ip: IpAddr) {
        let now = Instant::now();
        // Prune on insert so a long run against many broken hosts stays bounded.
        if self.failed.len() >= 10_000 {
            self.failed
                .retain(|_, at| now.duration_since(*at) < self.ttl);
        }
        self.failed.insert(ip, now);
    }

    /// Whether a handshake with `ip` failed within the TTL.
    pub fn failed_recently(&self, ip: IpAddr) -> bool {
        let expired = match self.failed.get(&ip) {
            None => return false,
            Some(at) => at.elapsed() >= self.ttl,
        };
        if expired {
            self.failed.remove_if(&ip, |_, at| at.elapsed() >= self.ttl);
            return false;
        }
        true
    }

    /// Forgets `ip`, e.g. after an operator fixed the host.
    pub fn forget(&self, ip: IpAddr) {
        self.failed.remove(&ip);
    }
}

fn provider() -> Arc<CryptoProvider> {
    // Chosen explicitly so that no process-wide default provider has to be installed and
    // aws-lc-rs never enters the build.
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Configuration for opportunistic TLS, shared so sessions resume each other's TLS sessions.
pub(crate) fn opportunistic_config() -> Result<Arc<ClientConfig>, rustls::Error> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, rustls::Error>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = provider();
            let config = ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

/// Configuration for required TLS: the web PKI, or `roots` instead when given.
pub(crate) fn verifying_config(
    roots: Option<&Arc<RootCertStore>>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    fn build(roots: Arc<RootCertStore>) -> Result<Arc<ClientConfig>, rustls::Error> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
    if let Some(roots) = roots {
        return build(Arc::clone(roots));
    }
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, rustls::Error>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            build(Arc::new(roots))
        })
        .clone()
}

/// The name to present (SNI) and, in required mode, to verify: the MX host name without its
/// trailing dot, or the address when the host is not a usable DNS name.
pub(crate) fn server_name(host: &str, ip: IpAddr) -> (ServerName<'static>, bool) {
    let host = host.strip_suffix('.').unwrap_or(host);
    match ServerName::try_from(host.to_owned()) {
        Ok(name @ ServerName::DnsName(_)) => (name, true),
        _ => (ServerName::IpAddress(ip.into()), false),
    }
}

/// Accepts any certificate but still checks that the peer holds the certificate's key, so a
/// handshake cannot complete with garbage signatures.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
