//! The content-addressed blob store: blobs named by their sha256, kept either in a
//! directory (the single node; `simq-indexer serve-blobs` is the small HTTP server Nomad's
//! artifact fetch reads them from) or in a bucket of an S3-compatible object store (the
//! node cluster's replicated SeaweedFS, or any S3), written through `object_store`.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use object_store::{path::Path as Key, ObjectStore, PutPayload};
use sha2::Digest;

/// What putting a blob did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The blob was new and is now stored.
    Added,
    /// A blob with this name and the right content was already there.
    Present,
    /// A blob with this name had the wrong content and was replaced.
    Repaired,
}

/// True for a lower-case hex sha256.
pub fn is_content_address(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The lower-case hex sha256 of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Where blobs are put: one bucket or directory, behind one or more endpoints.
#[derive(Debug, Clone)]
pub struct BlobStore {
    /// Each endpoint (for messages) and its client, tried in order: the gateways of one
    /// replicated store, any of which may be down.
    endpoints: Vec<(String, Arc<dyn ObjectStore>)>,
}

impl BlobStore {
    /// A directory of files named by their sha256 (created if missing).
    pub fn dir(dir: impl AsRef<Path>) -> anyhow::Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .with_context(|| format!("opening {} as a blob store", dir.display()))?;
        Ok(Self {
            endpoints: vec![(dir.display().to_string(), Arc::new(fs))],
        })
    }

    /// Bucket `bucket` behind each S3 endpoint of `endpoints` (`http://host:port`; the
    /// first that answers takes each blob). Requests are signed when AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY are set, else sent unsigned (a store on a private network
    /// that allows anonymous writes, as the node cluster's does).
    pub fn s3(bucket: &str, endpoints: &[String]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !endpoints.is_empty(),
            "s3://{bucket} needs an endpoint (--s3-endpoint or SIMQ_S3_ENDPOINTS)"
        );
        let key_id = std::env::var("AWS_ACCESS_KEY_ID").ok();
        let secret = std::env::var("AWS_SECRET_ACCESS_KEY").ok();
        let mut out = Vec::new();
        for endpoint in endpoints {
            let mut b = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_endpoint(endpoint)
                .with_region(std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()))
                .with_virtual_hosted_style_request(false)
                // A gateway that is down is refused (or times out) in seconds, and the
                // next endpoint is asked, instead of object_store's default 3 min of retries.
                // (allow_http is a client option: set here, as a builder call before this
                // one would be replaced.)
                .with_client_options(
                    object_store::ClientOptions::new()
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_connect_timeout(Duration::from_secs(2))
                        .with_timeout(Duration::from_secs(300)),
                )
                .with_retry(object_store::RetryConfig {
                    max_retries: 2,
                    retry_timeout: Duration::from_secs(10),
                    ..Default::default()
                });
            b = match (&key_id, &secret) {
                (Some(k), Some(s)) => b.with_access_key_id(k).with_secret_access_key(s),
                _ => b.with_skip_signature(true),
            };
            let client = b
                .build()
                .with_context(|| format!("s3://{bucket} at {endpoint}"))?;
            out.push((
                format!("s3://{bucket} at {endpoint}"),
                Arc::new(client) as _,
            ));
        }
        Ok(Self { endpoints: out })
    }

    /// `s3://BUCKET` behind `endpoints`, or else a directory path.
    pub fn open(spec: &str, endpoints: &[String]) -> anyhow::Result<Self> {
        match spec.strip_prefix("s3://") {
            Some(bucket) => {
                anyhow::ensure!(
                    !bucket.is_empty() && !bucket.contains('/'),
                    "{spec:?}: name a bucket, s3://BUCKET"
                );
                Self::s3(bucket, endpoints)
            }
            None => Self::dir(spec),
        }
    }

    /// Store `file` under its content address `sha256` (checked): on the first endpoint
    /// that answers. A blob already there with the right content is left alone; one with
    /// the wrong content is replaced.
    pub async fn put(&self, file: &Path, sha256: &str) -> anyhow::Result<Put> {
        anyhow::ensure!(
            is_content_address(sha256),
            "{sha256:?} is not a sha256 content address"
        );
        let mut failed = Vec::new();
        for (name, store) in &self.endpoints {
            match put_on(store.as_ref(), file, sha256).await {
                Ok(put) => return Ok(put),
                // The file itself is wrong: no other endpoint will take it either.
                Err(PutError::File(e)) => return Err(e),
                Err(PutError::Store(e)) => failed.push(format!("{name}: {e}")),
            }
        }
        anyhow::bail!(
            "no endpoint of the blob store took {sha256}: {}",
            failed.join("; ")
        )
    }
}

enum PutError {
    /// The local file: unreadable, or not the content the address names.
    File(anyhow::Error),
    /// The store did not answer or refused.
    Store(object_store::Error),
}

async fn put_on(store: &dyn ObjectStore, file: &Path, sha256: &str) -> Result<Put, PutError> {
    let key = Key::from(sha256);
    let existed = match store.get(&key).await {
        Ok(found) => {
            let bytes = found.bytes().await.map_err(PutError::Store)?;
            if sha256_hex(&bytes) == sha256 {
                return Ok(Put::Present);
            }
            true
        }
        Err(object_store::Error::NotFound { .. }) => false,
        Err(e) => return Err(PutError::Store(e)),
    };
    let bytes = tokio::fs::read(file)
        .await
        .with_context(|| format!("reading {}", file.display()))
        .map_err(PutError::File)?;
    let got = sha256_hex(&bytes);
    if got != sha256 {
        return Err(PutError::File(anyhow::anyhow!(
            "{} has sha256 {got}, the manifest says {sha256}",
            file.display()
        )));
    }
    store
        .put(&key, PutPayload::from(bytes))
        .await
        .map_err(PutError::Store)?;
    Ok(if existed { Put::Repaired } else { Put::Added })
}

/// Serve `GET /<sha256>` (and HEAD) from the directory `dir`, `GET /health`, until `stop`
/// resolves.
pub async fn serve(
    dir: PathBuf,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = &mut stop => return,
        };
        let dir = dir.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let dir = dir.clone();
                async move { Ok::<_, Infallible>(answer(&dir, &req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

async fn answer<B>(dir: &Path, req: &Request<B>) -> Response<Body> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain")
            .body(
                Full::new(Bytes::from(body))
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .expect("static response")
    };
    let name = req.uri().path().trim_start_matches('/');
    match (req.method(), name) {
        (&Method::GET, "health") => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET | &Method::HEAD, name) if is_content_address(name) => {
            match tokio::fs::File::open(dir.join(name)).await {
                Ok(file) => {
                    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
                    // Streamed: shard files are large and Nomad fetches several at once.
                    let body: Body = if req.method() == Method::HEAD {
                        Full::new(Bytes::new())
                            .map_err(|never| match never {})
                            .boxed()
                    } else {
                        let chunks = tokio_util::io::ReaderStream::with_capacity(file, 1 << 16);
                        StreamBody::new(chunks.map_ok(Frame::data)).boxed()
                    };
                    Response::builder()
                        .header("content-type", "application/octet-stream")
                        .header("content-length", len)
                        .body(body)
                        .expect("static response")
                }
                Err(_) => text(StatusCode::NOT_FOUND, format!("no blob {name}\n")),
            }
        }
        (&Method::GET | &Method::HEAD, _) => text(
            StatusCode::NOT_FOUND,
            "blobs are named by their sha256: GET /<64 hex>\n".into(),
        ),
        _ => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "read-only store: use GET\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_is_idempotent_and_repairs_wrong_content() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("file");
        std::fs::write(&src, b"shard bytes").unwrap();
        let sha = sha256_hex(b"shard bytes");
        let blobs = dir.path().join("blobs");
        let store = BlobStore::dir(&blobs).unwrap();
        assert_eq!(store.put(&src, &sha).await.unwrap(), Put::Added);
        assert_eq!(std::fs::read(blobs.join(&sha)).unwrap(), b"shard bytes");
        assert_eq!(store.put(&src, &sha).await.unwrap(), Put::Present);
        std::fs::write(blobs.join(&sha), b"corrupted").unwrap();
        assert_eq!(store.put(&src, &sha).await.unwrap(), Put::Repaired);
        assert_eq!(std::fs::read(blobs.join(&sha)).unwrap(), b"shard bytes");
        let wrong = "0".repeat(64);
        let err = store.put(&src, &wrong).await.unwrap_err().to_string();
        assert!(err.contains("the manifest says"), "{err}");
        assert!(store.put(&src, "../etc/passwd").await.is_err());
    }

    #[tokio::test]
    async fn an_s3_store_that_does_not_answer_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("file");
        std::fs::write(&src, b"x").unwrap();
        // Nothing listens on port 9 of loopback: refused at once.
        let store =
            BlobStore::open("s3://simq-blobs", &["http://127.0.0.1:9".to_string()]).unwrap();
        let err = store
            .put(&src, &sha256_hex(b"x"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no endpoint of the blob store took")
                && err.contains("s3://simq-blobs at http://127.0.0.1:9"),
            "{err}"
        );
        assert!(BlobStore::open("s3://simq-blobs", &[]).is_err());
        assert!(BlobStore::open("s3://", &["http://127.0.0.1:9".into()]).is_err());
    }

    #[test]
    fn only_hex_sha256_names_are_addresses() {
        assert!(is_content_address(&"a1".repeat(32)));
        assert!(!is_content_address(&"A1".repeat(32)));
        assert!(!is_content_address("../x"));
    }
}
