//! Certificates for the webhook: a private CA and a serving certificate signed by it (rcgen), and a hot-swappable
//! rustls certificate resolver so a renewed certificate is used by the next TLS handshake without a restart.
use std::fmt;
use std::sync::{Arc, RwLock};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

const CA_COMMON_NAME: &str = "wallaroo-connector-operator webhook CA";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("PEM decoding failed: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
    #[error("no certificate in PEM data")]
    NoCertificate,
    #[error("unusable private key: {0}")]
    Key(#[from] rustls::Error),
    #[error("validity out of range")]
    Time,
}

/// PEM-encoded CA and its key.
#[derive(Clone, PartialEq, Eq)]
pub struct CaPem {
    pub cert: String,
    pub key: String,
    pub not_after: jiff::Timestamp,
}

/// PEM-encoded serving certificate and key.
#[derive(Clone, PartialEq, Eq)]
pub struct LeafPem {
    pub cert: String,
    pub key: String,
    pub not_after: jiff::Timestamp,
}

impl fmt::Debug for CaPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaPem").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

impl fmt::Debug for LeafPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafPem").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

fn validity(days: i64) -> Result<(time::OffsetDateTime, time::OffsetDateTime, jiff::Timestamp), CertError> {
    let now = time::OffsetDateTime::now_utc();
    // Backdated an hour so a node with a slightly slow clock still accepts a fresh certificate.
    let not_before = now - time::Duration::hours(1);
    let not_after = now + time::Duration::days(days);
    let ts = jiff::Timestamp::from_second(not_after.unix_timestamp()).map_err(|_| CertError::Time)?;
    Ok((not_before, not_after, ts))
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

pub fn generate_ca(days: i64) -> Result<CaPem, CertError> {
    let key = KeyPair::generate()?;
    let mut params = ca_params();
    let (nb, na, not_after) = validity(days)?;
    params.not_before = nb;
    params.not_after = na;
    let cert = params.self_signed(&key)?;
    Ok(CaPem { cert: cert.pem(), key: key.serialize_pem(), not_after })
}

/// Signs a serving certificate for `dns_names` with the CA key. The issuer is rebuilt from the fixed CA name and the
/// stored key, which yields the same issuer name and key identifier as the stored CA certificate.
pub fn issue(ca_key_pem: &str, dns_names: &[String], days: i64) -> Result<LeafPem, CertError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, dns_names.first().cloned().unwrap_or_default());
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let (nb, na, not_after) = validity(days)?;
    params.not_before = nb;
    params.not_after = na;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(LeafPem { cert: cert.pem(), key: key.serialize_pem(), not_after })
}

/// Builds the rustls key from PEM, failing on anything rustls would reject at handshake time.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<_, _>>()?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// The serving certificate, swapped in place on renewal. Until one is installed every handshake fails, which is
/// what readiness reports.
#[derive(Default)]
pub struct ReloadableCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl fmt::Debug for ReloadableCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadableCert").field("loaded", &self.is_loaded()).finish()
    }
}

impl ReloadableCert {
    pub fn set(&self, key: Arc<CertifiedKey>) {
        // A poisoned lock only means a writer panicked mid-assignment of an Arc; the value is still whole.
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        *guard = Some(key);
    }

    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_loaded(&self) -> bool {
        self.get().is_some()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

/// A rustls server configuration that asks `certs` on every handshake.
pub fn server_config(certs: Arc<ReloadableCert>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier;

    use super::*;

    #[test]
    fn issued_certificate_loads_and_chains_to_the_ca() {
        let ca = generate_ca(3650).expect("ca");
        let names = vec!["svc.ns.svc".to_string(), "svc.ns.svc.cluster.local".to_string()];
        let leaf = issue(&ca.key, &names, 365).expect("leaf");
        let key = certified_key(leaf.cert.as_bytes(), leaf.key.as_bytes()).expect("rustls key");
        assert_eq!(key.cert.len(), 1);
        let ca_der = CertificateDer::from_pem_slice(ca.cert.as_bytes()).expect("ca der");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der).expect("root");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        let server_name = rustls_pki_types::ServerName::try_from("svc.ns.svc").expect("name");
        verifier
            .verify_server_cert(&key.cert[0], &[], &server_name, &[], rustls_pki_types::UnixTime::now())
            .expect("leaf verifies against the CA");
        let wrong = rustls_pki_types::ServerName::try_from("other.ns.svc").expect("name");
        assert!(
            verifier.verify_server_cert(&key.cert[0], &[], &wrong, &[], rustls_pki_types::UnixTime::now()).is_err()
        );
        assert!(leaf.not_after > jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24 * 364));
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(certified_key(b"not pem", b"not pem").is_err());
        assert!(issue("not a key", &["a".into()], 1).is_err());
    }

    #[test]
    fn resolver_swaps_certificates() {
        let store = ReloadableCert::default();
        assert!(!store.is_loaded());
        let ca = generate_ca(10).expect("ca");
        let a = issue(&ca.key, &["a".into()], 1).expect("a");
        let b = issue(&ca.key, &["b".into()], 1).expect("b");
        store.set(certified_key(a.cert.as_bytes(), a.key.as_bytes()).expect("a"));
        let first = store.get().expect("loaded");
        store.set(certified_key(b.cert.as_bytes(), b.key.as_bytes()).expect("b"));
        assert_ne!(first.cert[0], store.get().expect("loaded").cert[0]);
    }
}
