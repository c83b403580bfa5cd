//! TLS 1.3 with mutual certificate authentication, for links between hosts.
//!
//! Memory pages are the most sensitive data a hypervisor moves, so every connection of a
//! session can run inside TLS ([`rustls`], the *ring* provider, TLS 1.3 only): the
//! listener proves its certificate to the opener and the opener proves its own (mutual
//! authentication is not optional), both chains checked against the CA given in
//! [`TlsConfig`]. The opener checks the listener's name — by default the IP address it
//! dialled (`localhost` over a Unix socket), or [`TlsConfig::with_peer_name`]'s; a
//! listener given a peer name also checks that the opener's certificate carries it.
//! Sessions never resume: each reconnection is a fresh full handshake.
//!
//! How TLS slots into a connection ([`crate::handshake`]): the opener's HELLO goes in the
//! clear asking for TLS, the listener answers START_TLS (or, if it speaks plaintext,
//! refuses with a security mismatch), the TLS handshake runs, and inside it the opener
//! repeats its HELLO and the listener admits the connection. Then the frames flow as
//! before, encrypted ([`split`] makes the session a reader and a writer).
//!
//! Why *ring* and not aws-lc-rs: the workspace already builds rustls with ring (for
//! object storage), ring needs no CMake or Go at build time, and on this machine its
//! AES-GCM (VAES/AVX2) keeps the stream well above the throughput the links need — see
//! `uffdkit migrate netbench --tls` for the figures.
//!
//! Why not kernel TLS: it is a module many hosts do not load, and rekeying and control
//! records on receive need recent kernels; the user-space record layer is measured above.

#[cfg(feature = "throwaway-ca")]
mod authority;
mod stream;
mod verify;

#[cfg(feature = "throwaway-ca")]
pub use authority::{Authority, Identity};
pub use stream::split;

/// The TLS library whose types this API takes and gives (certificates, sessions, alerts).
pub use rustls;

use std::path::Path;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::error::{CertProblem, Refusal};
use crate::net::Addr;
use crate::Error;

/// This side's certificate and key, the CA its peers' certificates must chain to, and
/// optionally the name the peer must carry. Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    peer_name: Option<ServerName<'static>>,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("chain", &self.chain.len())
            .field("trusted", &self.roots.len())
            .field("peer_name", &self.peer_name)
            .finish_non_exhaustive()
    }
}

/// The crypto provider: ring's, TLS 1.3 suites only (see the module doc for why ring).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn material(what: &'static str) -> impl FnOnce(rustls::pki_types::pem::Error) -> Error {
    move |e| Error::TlsMaterial {
        what,
        source: Box::new(e),
    }
}

fn tls(what: &'static str) -> impl FnOnce(rustls::Error) -> Error {
    move |source| Error::Tls { what, source }
}

/// The longest PEM file read: a certificate chain or a CA bundle of many certificates
/// fits many times over.
pub const MAX_PEM_FILE: u64 = 1 << 20;

impl TlsConfig {
    /// A configuration from PEM text: this side's certificate chain (its own certificate
    /// first), its private key (PKCS#8, PKCS#1 or SEC1), and the certificates of the CAs
    /// it trusts to sign peers.
    pub fn from_pem(chain: &[u8], key: &[u8], ca: &[u8]) -> Result<TlsConfig, Error> {
        let chain = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(material("read the certificate chain"))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(material("read the private key"))?;
        let cas = CertificateDer::pem_slice_iter(ca)
            .collect::<Result<Vec<_>, _>>()
            .map_err(material("read the CA certificates"))?;
        Self::new(chain, key, cas)
    }

    /// [`TlsConfig::from_pem`] of three files: regular files of at most [`MAX_PEM_FILE`]
    /// bytes each, and — unless `key_readable_by_others` says the caller accepts it — a
    /// private key its owner alone can read (whoever reads it can pose as this host).
    pub fn from_pem_files(
        chain: &Path,
        key: &Path,
        ca: &Path,
        key_readable_by_others: bool,
    ) -> Result<TlsConfig, Error> {
        // Regular files of bounded size: a FIFO or /dev/zero is refused, not read forever.
        let read = |what, path: &Path, shared_ok| {
            uffd_core::private_fs::read_secret(path, MAX_PEM_FILE, shared_ok)
                .map_err(|e| Error::io(what)(std::io::Error::other(e)))
        };
        Self::from_pem(
            &read("read the certificate file", chain, true)?,
            &read("read the private key file", key, key_readable_by_others)?,
            &read("read the CA file", ca, true)?,
        )
    }

    /// A configuration from DER: chain (own certificate first), key, trusted CAs.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        cas: Vec<CertificateDer<'static>>,
    ) -> Result<TlsConfig, Error> {
        if chain.is_empty() {
            return Err(Error::Invalid {
                what: "no certificate in the chain",
                value: "0 certificates".into(),
            });
        }
        if cas.is_empty() {
            return Err(Error::Invalid {
                what: "no CA certificate to trust",
                value: "0 certificates".into(),
            });
        }
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots.add(ca).map_err(tls("trust a CA certificate"))?;
        }
        let (roots, key) = (Arc::new(roots), Arc::new(key));
        let (client, server) = configs(&chain, &key, &roots, None)?;
        Ok(TlsConfig {
            chain,
            key,
            roots,
            peer_name: None,
            client,
            server,
        })
    }

    /// Requires the peer's certificate to be valid for `name` (a DNS name or an IP
    /// address): as an opener, instead of the address dialled; as a listener, of every
    /// opener (without it, any certificate the CA signed is let in).
    pub fn with_peer_name(self, name: &str) -> Result<TlsConfig, Error> {
        let name = ServerName::try_from(name.to_string()).map_err(|_| Error::Invalid {
            what: "not a DNS name or IP address",
            value: name.into(),
        })?;
        let (client, server) = configs(&self.chain, &self.key, &self.roots, Some(&name))?;
        Ok(TlsConfig {
            peer_name: Some(name),
            client,
            server,
            ..self
        })
    }

    /// The name the listener at `addr` must prove: the configured peer name, else the IP
    /// address dialled, else (a Unix socket) `localhost`.
    pub fn server_name(&self, addr: &Addr) -> ServerName<'static> {
        match (&self.peer_name, addr) {
            (Some(name), _) => name.clone(),
            (None, Addr::Tcp(a)) => ServerName::IpAddress(a.ip().into()),
            (None, Addr::Unix(_)) => ServerName::try_from("localhost").expect("a DNS name"),
        }
    }

    /// The opener's configuration.
    pub fn client(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// The listener's configuration.
    pub fn server(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The name a listener requires of openers, if any.
    pub fn required_peer_name(&self) -> Option<String> {
        self.peer_name.as_ref().map(|n| n.to_str().into_owned())
    }
}

/// Builds both sides' rustls configurations: TLS 1.3 only, mutual authentication, no
/// session resumption.
fn configs(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    roots: &Arc<RootCertStore>,
    peer_name: Option<&ServerName<'static>>,
) -> Result<(Arc<ClientConfig>, Arc<ServerConfig>), Error> {
    let versions = &[&rustls::version::TLS13];
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(tls("choose TLS 1.3"))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain.to_vec(), key.clone_key())
        .map_err(tls("use the certificate and key"))?;
    client.resumption = Resumption::disabled();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| Error::TlsMaterial {
            what: "check openers' certificates against the CA",
            source: Box::new(e),
        })?;
    let verifier = match peer_name {
        Some(name) => verify::PeerName::wrap(verifier, name.clone()),
        None => verifier,
    };
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(tls("choose TLS 1.3"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.to_vec(), key.clone_key())
        .map_err(tls("use the certificate and key"))?;
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(NoServerSessionStorage {});
    Ok((Arc::new(client), Arc::new(server)))
}

/// Whether a TLS alert is a peer's refusal of our certificate.
fn certificate_alert(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::CertificateRequired
            | A::AccessDenied
            // What rustls sends for a certificate whose signature does not verify.
            | A::DecryptError
    )
}

/// What a TLS failure during the handshake means: a refused certificate (ours by the
/// peer, or the peer's here — `expected` is the name this side required), or another TLS
/// error. Either ends the attempt: retrying cannot help.
pub fn handshake_error(e: rustls::Error, expected: impl FnOnce() -> String) -> Error {
    use rustls::CertificateError as C;
    let problem = match &e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => CertProblem::UnknownIssuer,
            C::Expired | C::ExpiredContext { .. } => CertProblem::Expired,
            C::NotValidYet | C::NotValidYetContext { .. } => CertProblem::NotYetValid,
            C::NotValidForName | C::NotValidForNameContext { .. } => CertProblem::WrongName {
                expected: expected(),
            },
            C::Revoked => CertProblem::Revoked,
            C::BadSignature => CertProblem::BadSignature,
            other => CertProblem::Unusable(format!("{other:?}")),
        },
        rustls::Error::NoCertificatesPresented => CertProblem::Missing,
        rustls::Error::AlertReceived(alert) if certificate_alert(*alert) => {
            return Error::refused(Refusal::CertificateRefused { alert: *alert });
        }
        _ => return tls("handshake")(e),
    };
    Error::refused(Refusal::PeerCertificate(problem))
}

/// The rustls error inside an I/O error from a TLS stream, if that is what it carries.
pub fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}
