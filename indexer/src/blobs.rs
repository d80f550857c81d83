//! The content-addressed blob store: blobs named by their sha256, kept either in a
//! directory (the single node; `simq-indexer serve-blobs` is the small HTTP server Nomad's
//! artifact fetch reads them from) or in a bucket of an S3-compatible object store (the
//! node cluster's replicated SeaweedFS, or any S3). S3 requests are plain HTTP through the
//! workspace's `reqwest`, signed (SigV4 presigned URLs) by the sans-IO `rusty-s3`: a full
//! S3 SDK would bring its own HTTP and TLS stack into every service's build.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use futures::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rusty_s3::S3Action;
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

/// How long a presigned S3 request stays valid: it is sent at once.
const SIGNED_FOR: Duration = Duration::from_secs(600);
/// Rounds over the endpoints before a put gives up (a gateway restarting, a master
/// election in progress), and the pause between them.
const ROUNDS: u32 = 3;
const ROUND_PAUSE: Duration = Duration::from_secs(1);

/// One place blobs can be written to.
#[derive(Debug, Clone)]
enum Endpoint {
    Dir(PathBuf),
    S3 {
        bucket: rusty_s3::Bucket,
        credentials: Option<rusty_s3::Credentials>,
        http: reqwest::Client,
    },
}

/// Where blobs are put: one bucket or directory, behind one or more endpoints.
#[derive(Debug, Clone)]
pub struct BlobStore {
    /// Each endpoint (named for messages), tried in order: the gateways of one replicated
    /// store, any of which may be down.
    endpoints: Vec<(String, Endpoint)>,
}

impl BlobStore {
    /// A directory of files named by their sha256 (created if missing).
    pub fn dir(dir: impl AsRef<Path>) -> anyhow::Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            endpoints: vec![(dir.display().to_string(), Endpoint::Dir(dir.to_path_buf()))],
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
        let credentials = match (
            std::env::var("AWS_ACCESS_KEY_ID"),
            std::env::var("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Ok(k), Ok(s)) => Some(match std::env::var("AWS_SESSION_TOKEN") {
                Ok(t) => rusty_s3::Credentials::new_with_token(k, s, t),
                Err(_) => rusty_s3::Credentials::new(k, s),
            }),
            _ => None,
        };
        let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
        // A gateway that is down is refused (or times out) in seconds, and the next one
        // is asked; a large blob still has minutes to go through.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(300))
            .build()
            .context("building the HTTP client")?;
        let mut out = Vec::new();
        for endpoint in endpoints {
            let name = format!("s3://{bucket} at {endpoint}");
            let url: reqwest::Url = endpoint
                .parse()
                .with_context(|| format!("{name}: not a URL"))?;
            let b = rusty_s3::Bucket::new(
                url,
                rusty_s3::UrlStyle::Path,
                bucket.to_string(),
                region.clone(),
            )
            .map_err(|e| anyhow::anyhow!("{name}: {e:?}"))?;
            out.push((
                name,
                Endpoint::S3 {
                    bucket: b,
                    credentials: credentials.clone(),
                    http: http.clone(),
                },
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
        for round in 0..ROUNDS {
            if round > 0 {
                tokio::time::sleep(ROUND_PAUSE).await;
            }
            for (name, endpoint) in &self.endpoints {
                let started = std::time::Instant::now();
                match put_on(endpoint, file, sha256).await {
                    Ok(put) => {
                        tracing::info!(blob = sha256, file = %file.display(), store = %name, outcome = ?put, seconds = started.elapsed().as_secs_f64(), "blob stored");
                        return Ok(put);
                    }
                    // The file itself is wrong: no other endpoint will take it either.
                    Err(PutError::File(e)) => return Err(e),
                    Err(PutError::Store(e)) => {
                        tracing::warn!(blob = sha256, store = %name, round, error = format!("{e:#}"), "blob store endpoint failed; trying the next");
                        failed.push(format!("{name}: {e:#}"));
                    }
                }
            }
        }
        anyhow::bail!(
            "no endpoint of the blob store took {sha256} ({ROUNDS} rounds): {}",
            failed.join("; ")
        )
    }
}

enum PutError {
    /// The local file: unreadable, or not the content the address names.
    File(anyhow::Error),
    /// The store did not answer or refused.
    Store(anyhow::Error),
}

/// The bytes of `file`, checked against its content address.
async fn read_checked(file: &Path, sha256: &str) -> Result<Vec<u8>, PutError> {
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
    Ok(bytes)
}

async fn put_on(endpoint: &Endpoint, file: &Path, sha256: &str) -> Result<Put, PutError> {
    let stored = endpoint.get(sha256).await.map_err(PutError::Store)?;
    if stored.as_deref().is_some_and(|b| sha256_hex(b) == sha256) {
        return Ok(Put::Present);
    }
    let bytes = read_checked(file, sha256).await?;
    endpoint.put(sha256, bytes).await.map_err(PutError::Store)?;
    Ok(if stored.is_some() {
        Put::Repaired
    } else {
        Put::Added
    })
}

impl Endpoint {
    /// What is stored under `name`: None when nothing is.
    async fn get(&self, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match self {
            Endpoint::Dir(dir) => match tokio::fs::read(dir.join(name)).await {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e.into()),
            },
            Endpoint::S3 {
                bucket,
                credentials,
                http,
            } => {
                let url = bucket
                    .get_object(credentials.as_ref(), name)
                    .sign(SIGNED_FOR);
                let resp = http.get(url).send().await?;
                match resp.status() {
                    reqwest::StatusCode::NOT_FOUND => Ok(None),
                    s if s.is_success() => Ok(Some(resp.bytes().await?.to_vec())),
                    s => Err(refused("GET", s, resp).await),
                }
            }
        }
    }

    /// Store `bytes` under `name`.
    async fn put(&self, name: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Endpoint::Dir(dir) => {
                // Written beside, then renamed: a reader never sees half a blob.
                let tmp = dir.join(format!(".{name}.tmp"));
                tokio::fs::write(&tmp, &bytes)
                    .await
                    .with_context(|| format!("writing {}", tmp.display()))?;
                tokio::fs::rename(&tmp, dir.join(name))
                    .await
                    .with_context(|| format!("renaming {}", tmp.display()))
            }
            Endpoint::S3 {
                bucket,
                credentials,
                http,
            } => {
                let url = bucket
                    .put_object(credentials.as_ref(), name)
                    .sign(SIGNED_FOR);
                let resp = http
                    .put(url)
                    .header(reqwest::header::CONTENT_LENGTH, bytes.len())
                    .body(bytes)
                    .send()
                    .await?;
                match resp.status() {
                    s if s.is_success() => Ok(()),
                    s => Err(refused("PUT", s, resp).await),
                }
            }
        }
    }
}

/// A refusal, with the start of the store's answer (S3 errors explain themselves in XML).
async fn refused(
    method: &str,
    status: reqwest::StatusCode,
    resp: reqwest::Response,
) -> anyhow::Error {
    let body = resp.text().await.unwrap_or_default();
    let body: String = body.chars().take(300).collect();
    anyhow::anyhow!("{method} answered {status}: {body}")
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
