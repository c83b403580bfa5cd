//! Where images live: an object store (S3-compatible, GCS, Azure, HTTP, a local
//! directory) reached through the `object_store` crate, and the layout of an image in it.
//!
//! An image URL names its manifest object; the directory holding it is the *store root*,
//! shared by every image there: packs live under `ROOT/packs/<digest>`, so images pushed
//! to the same root deduplicate against each other.
//!
//! ```text
//! s3://bucket/snapshots/fn-a        the manifest of image "fn-a"
//! s3://bucket/snapshots/fn-b        another image in the same root
//! s3://bucket/snapshots/packs/9f3c… chunks of both, each stored once
//! ```
//!
//! Credentials and endpoints come from the standard environment of each store
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
//! `AWS_ALLOW_HTTP`; `GOOGLE_SERVICE_ACCOUNT`; `AZURE_STORAGE_ACCOUNT_NAME`, …), as their
//! own tools read them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme, RetryConfig};

use crate::error::{Error, Result};
use crate::hash::Digest;
use crate::manifest::{Manifest, MAGIC, MAX_MANIFEST_BYTES};

/// Network timeouts of a store's client. Retries are the fetcher's (see
/// [`RetryPolicy`](crate::RetryPolicy)), so the client itself retries nothing.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Connecting.
    pub connect_timeout: Duration,
    /// A whole request, including its body: a connection that goes silent fails here.
    pub request_timeout: Duration,
    /// Store settings applied over the environment's, named as `object_store` names them
    /// (`aws_endpoint`, `aws_access_key_id`, `aws_allow_http`, `google_service_account`, …).
    pub config: Vec<(String, String)>,
    /// The longest image (and, through it, the largest chunk table) a manifest read from
    /// this store may declare; longer ones are refused before anything is allocated for
    /// them (see [`Manifest::decode_limited`]).
    pub max_image: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            config: Vec::new(),
            max_image: crate::manifest::DEFAULT_MAX_IMAGE,
        }
    }
}

/// A store root and the client that reaches it.
#[derive(Clone)]
pub struct Store {
    objects: Arc<dyn ObjectStore>,
    root: Path,
    url: String,
    /// [`StoreOptions::max_image`].
    max_image: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Makes TLS available to the HTTP client (once per process; a provider the embedder
/// installed first is kept).
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn bad_url(url: &str, reason: impl Into<String>) -> Error {
    Error::Url {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

impl Store {
    /// Opens the store holding the image at `url` and returns it with the image's name
    /// (the manifest's path relative to the root).
    pub fn for_image(url: &str, options: &StoreOptions) -> Result<(Store, String)> {
        let parsed = url::Url::parse(url).map_err(|e| bad_url(url, e.to_string()))?;
        let (scheme, path) =
            ObjectStoreScheme::parse(&parsed).map_err(|e| bad_url(url, e.to_string()))?;
        let objects = build(url, &parsed, scheme, options)?;
        let path = Path::parse(path).map_err(|e| bad_url(url, e.to_string()))?;
        let parts: Vec<_> = path.parts().collect();
        let Some((name, dirs)) = parts.split_last() else {
            return Err(bad_url(url, "names no image (the path is empty)"));
        };
        let root: Path = dirs.iter().cloned().collect();
        let base = url.trim_end_matches(name.as_ref()).to_owned();
        Ok((
            Store {
                objects,
                root,
                url: base,
                max_image: options.max_image,
            },
            name.as_ref().to_owned(),
        ))
    }

    /// The root's URL (ends with `/`).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn object(&self, name: &str) -> Path {
        self.root.clone().join(name)
    }

    /// Where pack `id` lives.
    pub(crate) fn pack_path(&self, id: &Digest) -> Path {
        self.root.clone().join("packs").join(id.to_hex())
    }

    /// The client.
    pub(crate) fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    /// Reads and decodes manifest `name`: read only up to one byte past the largest a
    /// manifest can be, so a store that sends without end cannot make us allocate it all.
    pub async fn manifest(&self, name: &str) -> Result<Manifest> {
        use futures::StreamExt;
        let path = self.object(name);
        let mut stream = self
            .objects
            .get(&path)
            .await
            .map_err(Error::store("get manifest", &path))?
            .into_stream();
        let mut bytes = Vec::new();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(Error::store("read manifest", &path))?;
            let room = (MAX_MANIFEST_BYTES + 1).saturating_sub(bytes.len());
            bytes.extend_from_slice(&piece[..piece.len().min(room)]);
            if bytes.len() > MAX_MANIFEST_BYTES {
                break; // the decoder refuses it as too large
            }
        }
        Manifest::decode_limited(&bytes, self.max_image).map_err(|source| Error::Manifest {
            name: format!("{}{name}", self.url),
            source,
        })
    }

    /// Writes manifest `name` (atomically: a reader sees the old or the new one).
    pub async fn put_manifest(&self, name: &str, manifest: &Manifest) -> Result<()> {
        let path = self.object(name);
        self.objects
            .put(&path, Bytes::from(manifest.encode()).into())
            .await
            .map_err(Error::store("put manifest", &path))?;
        Ok(())
    }

    /// Every manifest directly under the root except `except` (objects that are not
    /// manifests are passed over): what a push deduplicates against.
    pub async fn manifests(&self, except: &str) -> Result<Vec<(String, Manifest)>> {
        let listing = self
            .objects
            .list_with_delimiter(Some(&self.root))
            .await
            .map_err(Error::store("list", &self.root))?;
        let mut found = Vec::new();
        for meta in listing.objects {
            let Some(name) = meta.location.filename().map(str::to_owned) else {
                continue;
            };
            if name == except || meta.size > MAX_MANIFEST_BYTES as u64 || meta.size < 8 {
                continue;
            }
            // Look at the magic first: a large raw image beside the manifests is not read.
            let head = self
                .objects
                .get_range(&meta.location, 0..8)
                .await
                .map_err(Error::store("read", &meta.location))?;
            if head.as_ref() != MAGIC {
                continue;
            }
            match self.manifest(&name).await {
                Ok(m) => found.push((name, m)),
                Err(e) => log::warn!("not deduplicating against {name}: {e}"),
            }
        }
        Ok(found)
    }
}

/// Applies `config` keys to a builder, refusing unknown ones.
fn configure<B, K: std::str::FromStr>(
    mut builder: B,
    config: &[(String, String)],
    url: &str,
    set: impl Fn(B, K, String) -> B,
) -> Result<B> {
    for (key, value) in config {
        let Ok(k) = key.parse::<K>() else {
            return Err(bad_url(url, format!("unknown store setting {key:?}")));
        };
        builder = set(builder, k, value.clone());
    }
    Ok(builder)
}

/// Builds the client for `scheme`, with credentials from the environment.
fn build(
    url: &str,
    parsed: &url::Url,
    scheme: ObjectStoreScheme,
    options: &StoreOptions,
) -> Result<Arc<dyn ObjectStore>> {
    use object_store::ClientConfigKey as C;
    install_tls_provider();
    let retry = RetryConfig {
        max_retries: 0,
        ..RetryConfig::default()
    };
    let connect = format!("{}ms", options.connect_timeout.as_millis());
    let request = format!("{}ms", options.request_timeout.as_millis());
    let err = |e: object_store::Error| bad_url(url, e.to_string());
    Ok(match scheme {
        ObjectStoreScheme::Local => Arc::new(object_store::local::LocalFileSystem::new()),
        ObjectStoreScheme::Memory => Arc::new(object_store::memory::InMemory::new()),
        ObjectStoreScheme::AmazonS3 => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey as K};
            Arc::new(
                configure(
                    AmazonS3Builder::from_env()
                        .with_url(url)
                        .with_retry(retry)
                        .with_config(K::Client(C::ConnectTimeout), connect)
                        .with_config(K::Client(C::Timeout), request),
                    &options.config,
                    url,
                    |b, k: K, v| b.with_config(k, v),
                )?
                .build()
                .map_err(err)?,
            )
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey as K};
            Arc::new(
                configure(
                    GoogleCloudStorageBuilder::from_env()
                        .with_url(url)
                        .with_retry(retry)
                        .with_config(K::Client(C::ConnectTimeout), connect)
                        .with_config(K::Client(C::Timeout), request),
                    &options.config,
                    url,
                    |b, k: K, v| b.with_config(k, v),
                )?
                .build()
                .map_err(err)?,
            )
        }
        ObjectStoreScheme::MicrosoftAzure => {
            use object_store::azure::{AzureConfigKey as K, MicrosoftAzureBuilder};
            Arc::new(
                configure(
                    MicrosoftAzureBuilder::from_env()
                        .with_url(url)
                        .with_retry(retry)
                        .with_config(K::Client(C::ConnectTimeout), connect)
                        .with_config(K::Client(C::Timeout), request),
                    &options.config,
                    url,
                    |b, k: K, v| b.with_config(k, v),
                )?
                .build()
                .map_err(err)?,
            )
        }
        ObjectStoreScheme::Http => {
            let base = &parsed[..url::Position::BeforePath];
            Arc::new(
                object_store::http::HttpBuilder::new()
                    .with_url(base)
                    .with_retry(retry)
                    .with_config(C::ConnectTimeout, connect)
                    .with_config(C::Timeout, request)
                    .build()
                    .map_err(err)?,
            )
        }
        other => return Err(bad_url(url, format!("unsupported store {other:?}"))),
    })
}
