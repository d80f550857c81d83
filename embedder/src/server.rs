//! The gRPC service: validates requests, then embeds through the [`Batcher`].

use tonic::{Request, Response, Status};

use crate::batcher::Batcher;
use crate::error::Error;
use crate::proto;

/// Per-request bounds, so no request can make the service allocate without bound.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Texts per request at most.
    pub max_texts: usize,
    /// Bytes per text at most (texts are truncated to the model's max tokens anyway).
    pub max_text_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_texts: 256,
            max_text_bytes: 4096,
        }
    }
}

/// Implements `simq.embedder.v1.Embedder`.
pub struct EmbedService {
    batcher: Batcher,
    limits: RequestLimits,
}

impl EmbedService {
    pub fn new(batcher: Batcher, limits: RequestLimits) -> Self {
        Self { batcher, limits }
    }

    fn validate(&self, texts: &[String]) -> Result<(), Error> {
        if texts.is_empty() {
            return Err(Error::InvalidRequest {
                reason: "texts is empty; send at least one text".into(),
            });
        }
        if texts.len() > self.limits.max_texts {
            return Err(Error::InvalidRequest {
                reason: format!(
                    "{} texts in one request; the limit is {}",
                    texts.len(),
                    self.limits.max_texts
                ),
            });
        }
        if let Some((i, t)) = texts
            .iter()
            .enumerate()
            .find(|(_, t)| t.len() > self.limits.max_text_bytes)
        {
            return Err(Error::InvalidRequest {
                reason: format!(
                    "texts[{i}] has {} bytes; the limit is {}",
                    t.len(),
                    self.limits.max_text_bytes
                ),
            });
        }
        Ok(())
    }
}

/// gRPC status for an embedder error.
pub fn status_of(e: &Error) -> Status {
    match e {
        Error::InvalidRequest { .. } => Status::invalid_argument(e.to_string()),
        Error::Overloaded { .. } | Error::QueueTimeout { .. } => {
            Status::resource_exhausted(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl proto::embedder_server::Embedder for EmbedService {
    async fn embed(
        &self,
        request: Request<proto::EmbedRequest>,
    ) -> Result<Response<proto::EmbedResponse>, Status> {
        let texts = request.into_inner().texts;
        let metrics = &self.batcher.metrics().requests;
        if let Err(e) = self.validate(&texts) {
            metrics.with_label_values(&["invalid"]).inc();
            return Err(status_of(&e));
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        match self.batcher.embed(&refs).await {
            Ok(vectors) => {
                metrics.with_label_values(&["ok"]).inc();
                let embedder = self.batcher.embedder();
                Ok(Response::new(proto::EmbedResponse {
                    vectors,
                    dims: embedder.dims() as u32,
                    model_id: embedder.model_id().to_string(),
                }))
            }
            Err(e) => {
                let outcome = if matches!(e, Error::Overloaded { .. } | Error::QueueTimeout { .. })
                {
                    "overloaded"
                } else {
                    "error"
                };
                metrics.with_label_values(&[outcome]).inc();
                Err(status_of(&e))
            }
        }
    }

    async fn info(
        &self,
        _: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoResponse>, Status> {
        let embedder = self.batcher.embedder();
        Ok(Response::new(proto::InfoResponse {
            model_id: embedder.model_id().to_string(),
            dims: embedder.dims() as u32,
            model_name: embedder.model().manifest.name.clone(),
        }))
    }
}
