//! TLS 1.3 for peers that authenticate by the cluster-key proof, not by certificates: QUIC
//! links and the control plane (baton-proto) both build their configurations here.
//!
//! Certificates are throwaway self-signed ones. The client accepts any certificate but still
//! checks the handshake signature made with it; identity comes from the cluster-key proof each
//! end then makes, bound to the session's TLS exporter, so a man in the middle who terminates
//! TLS on both sides sees two exporters and both proofs fail.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The name in the self-signed certificate (and the one clients ask for).
pub const CERT_NAME: &str = "baton";

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.3 server with a fresh self-signed certificate, offering `alpn`.
pub fn server_config(alpn: &[u8]) -> Result<rustls::ServerConfig, TlsSetupError> {
    let cert = rcgen::generate_simple_self_signed(vec![CERT_NAME.into()])?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// A TLS 1.3 client that accepts any server certificate (see the module), asking for `alpn`.
pub fn client_config(alpn: &[u8]) -> Result<rustls::ClientConfig, TlsSetupError> {
    let p = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ClusterKeyAuthenticates(p)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// Accepts any certificate: identity comes from the cluster-key proof bound to this session.
#[derive(Debug)]
struct ClusterKeyAuthenticates(Arc<CryptoProvider>);

impl ServerCertVerifier for ClusterKeyAuthenticates {
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
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
