//! The webhook's serving certificate, re-read when cert-manager (or anyone)
//! rewrites the files, so a rotation needs no restart.
//!
//! The files are read every reload period and compared with what was last
//! loaded (comparing contents rather than modification times: a Secret
//! volume swaps a symlink, and some filesystems keep coarse times). A pair
//! that does not load (mid-rotation: new certificate, old key) is reported
//! and the previous pair kept; the next period tries again.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{TlsFiles, WebhookError};

/// A certificate resolver over a PEM certificate chain and key on disk.
#[derive(Debug)]
pub(crate) struct ReloadingCert {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    key: Arc<CertifiedKey>,
}

impl ReloadingCert {
    /// Loads the pair once.
    pub(crate) fn load(files: TlsFiles, provider: Arc<CryptoProvider>) -> Result<Self, WebhookError> {
        let (cert_pem, key_pem) = read_pair(&files)?;
        let key = Arc::new(certified_key(&files, &cert_pem, &key_pem, &provider)?);
        Ok(Self {
            files,
            provider,
            current: RwLock::new(Loaded {
                cert_pem,
                key_pem,
                key,
            }),
        })
    }

    /// Re-reads the files; `Ok(true)` when a new pair was loaded.
    pub(crate) fn refresh(&self) -> Result<bool, WebhookError> {
        let (cert_pem, key_pem) = read_pair(&self.files)?;
        {
            let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
            if current.cert_pem == cert_pem && current.key_pem == key_pem {
                return Ok(false);
            }
        }
        let key = Arc::new(certified_key(&self.files, &cert_pem, &key_pem, &self.provider)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Loaded {
            cert_pem,
            key_pem,
            key,
        };
        Ok(true)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .key
                .clone(),
        )
    }
}

fn read(path: &Path) -> Result<Vec<u8>, WebhookError> {
    std::fs::read(path).map_err(|source| WebhookError::ReadTls {
        path: path.to_owned(),
        source,
    })
}

fn read_pair(files: &TlsFiles) -> Result<(Vec<u8>, Vec<u8>), WebhookError> {
    Ok((read(&files.cert)?, read(&files.key)?))
}

fn certified_key(
    files: &TlsFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, WebhookError> {
    let pem_error = |path: &Path, message: String| WebhookError::Pem {
        path: path.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&files.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_error(&files.cert, "no CERTIFICATE block".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_error(&files.key, e.to_string()))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| WebhookError::KeyPair {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    })
}
