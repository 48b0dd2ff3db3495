//! Certificates of the direct data plane.
//!
//! - The cluster CA (gateways hold its key) signs a client's CSR into a
//!   short-lived certificate carrying a [`Grant`]; runners trust only it
//!   for clients.
//! - A runner's direct endpoint serves a certificate of its own, made at
//!   start-up (self-signed, for its advertised host); the registry carries
//!   it, and ConnectSandbox hands it to the client as the CA to trust.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use super::grant::Grant;

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read.
    #[error("read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The CA's certificate or key is not usable.
    #[error("cluster CA: {0}")]
    Ca(String),
    /// The client's request is not a valid, self-signed PKCS#10 request.
    #[error("csr_der: not a valid certificate signing request ({0})")]
    Csr(String),
    /// rcgen refused.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}

/// The cluster CA as a gateway holds it.
#[derive(Clone)]
pub struct ClusterCa {
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

/// A signed client certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, then the CA's: the chain the client presents.
    pub chain_pem: String,
    /// When it stops being accepted.
    pub not_after: SystemTime,
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // A serial of zeros is still a valid certificate; randomness only
    // keeps serials unique.
    let _ = getrandom::fill(&mut bytes);
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn read(path: &std::path::Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl ClusterCa {
    /// The CA from PEM files (its certificate and its private key).
    pub fn load(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, CaError> {
        Self::from_pem(read(cert)?, read(key)?)
    }

    /// The CA from PEM text, checked to be usable for signing.
    pub fn from_pem(cert_pem: String, key_pem: String) -> Result<Self, CaError> {
        let ca = Self { cert_pem, key_pem };
        ca.issuer()?;
        Ok(ca)
    }

    /// A new CA (for tests, and `sandpitd`-less set-ups that make one).
    pub fn generate(name: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
        params.not_after = (SystemTime::now() + Duration::from_secs(10 * 365 * 86400)).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The CA's certificate, PEM (what runners trust for clients).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, CaError> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(|e| CaError::Ca(e.to_string()))?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(|e| CaError::Ca(e.to_string()))
    }

    /// Signs `csr_der` into a client certificate for `grant`, valid `ttl`.
    /// Only the request's key is used: its subject and extensions are
    /// replaced by the grant.
    pub fn issue(&self, csr_der: &[u8], grant: &Grant, ttl: Duration) -> Result<Issued, CaError> {
        let der = rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into());
        let mut csr: CertificateSigningRequestParams =
            der.map_err(|e| CaError::Csr(e.to_string()))?;
        let now = SystemTime::now();
        let not_after = now + ttl;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("sandbox {}", grant.sandbox_id));
        params.subject_alt_names = vec![SanType::URI(
            grant
                .to_uri()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Ca(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // A minute back: clocks of the client and the runner disagree.
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        csr.params = params;
        let cert = csr.signed_by(&self.issuer()?)?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            not_after,
        })
    }
}

/// A runner's direct endpoint's certificate and key (PEM), self-signed
/// for `host` (an IP address or a DNS name), valid a year.
pub fn server_identity(host: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let san = match host.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(
            host.try_into()
                .map_err(|e: rcgen::Error| CaError::Ca(e.to_string()))?,
        ),
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("sandpit runner {host}"));
    params.subject_alt_names = vec![san];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
    params.not_after = (SystemTime::now() + Duration::from_secs(365 * 86400)).into();
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The grant of a client certificate (DER), if it carries one.
pub fn grant_of(cert_der: &[u8]) -> Option<Grant> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut grants = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => Grant::from_uri(uri),
        _ => None,
    });
    let grant = grants.next()?;
    // Two grants in one certificate is not something the CA makes.
    grants.next().is_none().then_some(grant)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        (csr.der().to_vec(), key)
    }

    #[test]
    fn a_signed_csr_carries_the_grant_and_chains_to_the_ca() {
        let ca = ClusterCa::generate("test CA").unwrap();
        let grant = Grant {
            sandbox_id: "sb-1".into(),
            principal: "alice".into(),
            permissions: vec![1, 2],
        };
        let (der, _) = csr();
        let issued = ca.issue(&der, &grant, Duration::from_secs(600)).unwrap();
        let pems = pem_blocks(&issued.chain_pem);
        assert_eq!(pems.len(), 2, "the leaf, then the CA");
        assert_eq!(grant_of(&pems[0]), Some(grant));
        let ttl = issued.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(ttl <= Duration::from_secs(600) && ttl > Duration::from_secs(590));
        // The CA's own certificate is no grant.
        assert_eq!(grant_of(&pems[1]), None);
    }

    #[test]
    fn a_damaged_csr_is_refused() {
        let ca = ClusterCa::generate("test CA").unwrap();
        let grant = Grant {
            sandbox_id: "sb-1".into(),
            principal: "alice".into(),
            permissions: vec![1],
        };
        let (mut der, _) = csr();
        let last = der.len() - 1;
        der[last] ^= 0xff;
        assert!(matches!(
            ca.issue(&der, &grant, Duration::from_secs(60)),
            Err(CaError::Csr(_))
        ));
        assert!(matches!(
            ca.issue(b"junk", &grant, Duration::from_secs(60)),
            Err(CaError::Csr(_))
        ));
    }

    #[test]
    fn a_ca_whose_key_does_not_parse_is_refused_at_load() {
        let ca = ClusterCa::generate("test CA").unwrap();
        assert!(ClusterCa::from_pem(ca.cert_pem().to_owned(), "junk".into()).is_err());
        assert!(ClusterCa::from_pem(ca.cert_pem().to_owned(), ca.key_pem().to_owned()).is_ok());
    }

    fn pem_blocks(text: &str) -> Vec<Vec<u8>> {
        x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
            .map(|p| p.unwrap().contents)
            .collect()
    }
}
