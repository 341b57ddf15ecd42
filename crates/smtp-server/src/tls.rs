//! The server side of STARTTLS: acceptors from a certificate chain and key, and what a
//! finished handshake negotiated.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
pub use tokio_rustls::TlsAcceptor;

/// Why a TLS acceptor could not be built.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read, or holds no usable item of the expected kind.
    #[error("{}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate file parsed but holds no certificate.
    #[error("{}: no certificate in the file", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the certificate chain and key (e.g. a key of an unsupported type).
    #[error("{}: {source}", path.display())]
    Certificate {
        /// The certificate file.
        path: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// rustls refused a certificate chain and key given in memory.
    #[error("cannot set up TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The rustls settings every server in the workspace uses: the ring provider (the workspace
/// never builds aws-lc-rs), rustls' safe protocol versions, no client certificates.
fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
}

/// An acceptor for a certificate chain (the server's own certificate first) and its key.
pub fn tls_acceptor(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<TlsAcceptor, Error> {
    Ok(TlsAcceptor::from(Arc::new(server_config(certs, key)?)))
}

/// An acceptor for a certificate chain and private key in PEM files (the chain's first
/// certificate is the server's own), e.g. for [`ConnectionOptions::tls`](crate::ConnectionOptions::tls).
pub fn tls_acceptor_from_pem_files(
    cert_file: &Path,
    key_file: &Path,
) -> Result<TlsAcceptor, Error> {
    let pem_error = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Pem { path, source }
    };
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(pem_error(cert_file))?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            path: cert_file.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(pem_error(key_file))?;
    let config = server_config(certs, key).map_err(|source| Error::Certificate {
        path: cert_file.to_owned(),
        source,
    })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// `protocol:cipher` of a finished server handshake, e.g.
/// `TLSv1.3:TLS13_AES_256_GCM_SHA384`.
pub fn describe_tls(connection: &rustls::ServerConnection) -> String {
    let protocol = match connection.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        other => format!("{other:?}"),
    };
    let cipher = connection
        .negotiated_cipher_suite()
        .map(|s| {
            let suite = s.suite();
            suite
                .as_str()
                .map_or_else(|| format!("{suite:?}"), str::to_owned)
        })
        .unwrap_or_else(|| "unknown".to_owned());
    format!("{protocol}:{cipher}")
}
