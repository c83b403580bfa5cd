//! A throwaway certificate authority (feature `throwaway-ca`): for one machine's local
//! runs (`uffdkit migrate local --tls auto`) and tests, never for links between hosts —
//! there, certificates come from the operator's own CA (see the README).

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::TlsConfig;
use crate::Error;

/// A certificate and its key, PEM-encoded.
#[derive(Clone)]
pub struct Identity {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

/// A CA with a fresh ECDSA P-256 key, living in memory only.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

fn generated(e: rcgen::Error) -> Error {
    Error::TlsMaterial {
        what: "generate a certificate",
        source: Box::new(e),
    }
}

impl Authority {
    /// A new CA called `name`.
    pub fn new(name: &str) -> Result<Authority, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(generated)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(generated)?;
        Ok(Authority { issuer })
    }

    /// The CA's certificate, for peers to trust.
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses), good for both ends of a
    /// link, valid from an hour ago for a day.
    pub fn issue(&self, names: &[&str]) -> Result<Identity, Error> {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        self.issue_valid(names, now - hour, now + 24 * hour)
    }

    /// A certificate for `names`, valid from `not_before` to `not_after`.
    pub fn issue_valid(
        &self,
        names: &[&str],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Identity, Error> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).map_err(generated)?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let key = KeyPair::generate().map_err(generated)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(generated)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A configuration presenting `identity` and trusting this CA.
    pub fn config(&self, identity: &Identity) -> Result<TlsConfig, Error> {
        TlsConfig::from_pem(
            identity.cert_pem.as_bytes(),
            identity.key_pem.as_bytes(),
            self.ca_pem().as_bytes(),
        )
    }
}
