//! The content-addressed blob store: a directory of files named by their sha256, and the
//! small HTTP server (`simq-indexer serve-blobs`) Nomad's artifact fetch reads them from.

use std::convert::Infallible;
use std::path::{Path, PathBuf};

use anyhow::Context;
use futures::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use simq_consul::contract::sha256_file;

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

/// A directory of blobs named by their sha256.
#[derive(Debug, Clone)]
pub struct BlobStore {
    pub dir: PathBuf,
}

impl BlobStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// Store `file` under its content address `sha256` (checked), atomically.
    pub fn put(&self, file: &Path, sha256: &str) -> anyhow::Result<Put> {
        anyhow::ensure!(
            is_content_address(sha256),
            "{sha256:?} is not a sha256 content address"
        );
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let target = self.path_of(sha256);
        let existed = target.exists();
        if existed && sha256_file(&target)? == sha256 {
            return Ok(Put::Present);
        }
        let got = sha256_file(file).with_context(|| format!("reading {}", file.display()))?;
        anyhow::ensure!(
            got == sha256,
            "{} has sha256 {got}, the manifest says {sha256}",
            file.display()
        );
        let tmp = self.dir.join(format!(".{sha256}.tmp"));
        std::fs::copy(file, &tmp)
            .with_context(|| format!("copying {} to {}", file.display(), tmp.display()))?;
        std::fs::rename(&tmp, &target)?;
        Ok(if existed { Put::Repaired } else { Put::Added })
    }
}

/// Serve `GET /<sha256>` (and HEAD) from the store, `GET /health`, until `stop` resolves.
pub async fn serve(
    store: BlobStore,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = &mut stop => return,
        };
        let store = store.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let store = store.clone();
                async move { Ok::<_, Infallible>(answer(&store, &req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

async fn answer<B>(store: &BlobStore, req: &Request<B>) -> Response<Body> {
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
            match tokio::fs::File::open(store.path_of(name)).await {
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

    #[test]
    fn put_is_idempotent_and_repairs_wrong_content() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("file");
        std::fs::write(&src, b"shard bytes").unwrap();
        let sha = sha256_file(&src).unwrap();
        let store = BlobStore::new(dir.path().join("blobs"));
        assert_eq!(store.put(&src, &sha).unwrap(), Put::Added);
        assert_eq!(store.put(&src, &sha).unwrap(), Put::Present);
        std::fs::write(store.path_of(&sha), b"corrupted").unwrap();
        assert_eq!(store.put(&src, &sha).unwrap(), Put::Repaired);
        assert_eq!(std::fs::read(store.path_of(&sha)).unwrap(), b"shard bytes");
        let wrong = "0".repeat(64);
        assert!(store
            .put(&src, &wrong)
            .unwrap_err()
            .to_string()
            .contains("the manifest says"));
        assert!(store.put(&src, "../etc/passwd").is_err());
    }

    #[test]
    fn only_hex_sha256_names_are_addresses() {
        assert!(is_content_address(&"a1".repeat(32)));
        assert!(!is_content_address(&"A1".repeat(32)));
        assert!(!is_content_address("../x"));
    }
}
