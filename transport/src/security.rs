//! How a link's connections are secured: TLS with certificates, or a pre-shared key.

use crate::error::SecurityKind;
use crate::key::Key;
use crate::tls::TlsConfig;

/// How a link's connections are secured.
#[derive(Debug, Clone)]
pub enum Security {
    /// TLS 1.3 with mutual certificate authentication: for any network.
    Tls(TlsConfig),
    /// Plaintext with a pre-shared-key challenge–response: both ends prove the key, but
    /// data then travels in the clear, protected by a CRC only. For trusted links only
    /// (one host, a dedicated migration network).
    PreSharedKey(Key),
}

impl Security {
    /// Which it is.
    pub fn kind(&self) -> SecurityKind {
        match self {
            Security::Tls(_) => SecurityKind::Tls,
            Security::PreSharedKey(_) => SecurityKind::PreSharedKey,
        }
    }
}

impl From<Key> for Security {
    fn from(key: Key) -> Security {
        Security::PreSharedKey(key)
    }
}

impl From<&Key> for Security {
    fn from(key: &Key) -> Security {
        Security::PreSharedKey(key.clone())
    }
}

impl From<TlsConfig> for Security {
    fn from(tls: TlsConfig) -> Security {
        Security::Tls(tls)
    }
}

impl From<&TlsConfig> for Security {
    fn from(tls: &TlsConfig) -> Security {
        Security::Tls(tls.clone())
    }
}

impl From<&Security> for Security {
    fn from(s: &Security) -> Security {
        s.clone()
    }
}
