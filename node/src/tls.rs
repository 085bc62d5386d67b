//! TLS material: loading PEM files, or generating a test CA and server certificate for `dev`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// File I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The PEM holds no certificate or no private key.
    #[error("{0}")]
    Pem(String),
    /// Certificate generation failed.
    #[error("generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls rejected the certificate or key.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Paths of the PEM files a node serves with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// The CA that signed `cert`, when Meridian generated it (clients trust this file).
    pub ca_cert: Option<PathBuf>,
}

fn write(path: &Path, contents: &str) -> Result<(), TlsError> {
    std::fs::write(path, contents).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Returns the generated test CA and server certificate under `dir`, creating them on first use.
/// The server certificate names `localhost`, `127.0.0.1` and `::1`.
pub fn ensure_dev_certificates(dir: &Path) -> Result<TlsFiles, TlsError> {
    let files = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca_cert: Some(dir.join("ca.pem")),
    };
    let ca_key_path = dir.join("ca.key");
    if files.cert.exists() && files.key.exists() && ca_key_path.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Meridian Dev Test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params.subject_alt_names.extend([
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ]);
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer)?;

    write(&ca_key_path, &issuer.key().serialize_pem())?;
    if let Some(ca) = &files.ca_cert {
        write(ca, &ca_pem)?;
    }
    // The chain carries the CA too, so clients that trust only the CA can build the path.
    write(&files.cert, &format!("{}{}", cert.pem(), ca_pem))?;
    write(&files.key, &key.serialize_pem())?;
    Ok(files)
}

/// Reads a PEM certificate chain and private key into a rustls server configuration (TLS 1.2 and
/// 1.3, ring), advertising `alpn` protocols.
pub fn server_config(
    files: &TlsFiles,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, key) = load_pem(files)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

type CertAndKey = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Reads the certificate chain and private key PEM files.
fn load_pem(files: &TlsFiles) -> Result<CertAndKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(format!(
            "{} holds no certificate",
            files.cert.display()
        )));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| TlsError::Pem(format!("{}: {e}", files.key.display())))?
        .ok_or_else(|| TlsError::Pem(format!("{} holds no private key", files.key.display())))?;
    Ok((certs, key))
}

/// Asks clients for a certificate without requiring one, and accepts any certificate whose
/// handshake signature is valid: devices authenticate by the certificate's registered thumbprint
/// after the handshake (Azure's "X.509 self-signed" mode), so chain building is not the check.
#[derive(Debug)]
pub struct AnyClientCertificate {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl AnyClientCertificate {
    /// A verifier using ring's signature algorithms.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }
}

impl rustls::server::danger::ClientCertVerifier for AnyClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The MQTT listener's configuration: like [`server_config`], plus an optional client
/// certificate for X.509 devices.
pub fn mqtt_server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, key) = load_pem(files)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(AnyClientCertificate::new())
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load_and_are_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = ensure_dev_certificates(dir.path()).expect("generate");
        let first = std::fs::read(&files.cert).expect("read");
        server_config(&files, &[b"http/1.1"]).expect("rustls accepts");
        let again = ensure_dev_certificates(dir.path()).expect("reuse");
        assert_eq!(again, files);
        assert_eq!(std::fs::read(&again.cert).expect("read"), first);
    }
}
