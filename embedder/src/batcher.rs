//! Dynamic micro-batching: texts of requests that arrive together share inference calls.
//!
//! Requests queue on a bounded channel. The collector takes the first waiting request and
//! everything already queued behind it (up to `max_batch_texts` texts). If one of the
//! runtime's sessions is free, the batch goes at once: a lone query pays no batching
//! delay. While every session is busy the batch keeps growing until one frees up, so
//! batching follows load by itself. `max_wait` optionally holds a batch a little longer
//! for company even when a session is free (default 0).
//!
//! Overload never wedges it:
//! - the number of queued texts is bounded: past `queue_limit` a request is refused at
//!   once; each request's texts are counted by a [`QueueSlots`] guard, so they are given
//!   back however the request ends, also when its future is dropped (the client went
//!   away, or its `grpc-timeout` passed and tonic dropped the handler);
//! - queued work whose caller is gone is skipped, not computed, and work that waited longer
//!   than `max_queue_wait` is answered "overloaded" instead of being run late;
//! - [`Batcher::progressing`] tells /health whether queued work is moving.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{mpsc, oneshot, Semaphore};

use simq_runtime::service::StallClock;

use crate::error::{Error, Result};
use crate::runtime::{Embedder, Tokens};

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Texts per collected batch at most.
    pub max_batch_texts: usize,
    /// How long a batch waits for more requests although a session is free.
    pub max_wait: Duration,
    /// Texts queued or in flight at most; more are refused as overloaded.
    pub queue_limit: usize,
    /// Longest a request may wait for its batch to start; later it is refused unrun.
    pub max_queue_wait: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            max_batch_texts: 64,
            max_wait: Duration::ZERO,
            queue_limit: 512,
            max_queue_wait: Duration::from_secs(1),
        }
    }
}

/// The embedder's Prometheus metrics.
#[derive(Clone)]
pub struct BatchMetrics {
    pub requests: IntCounterVec,
    pub texts: prometheus::IntCounter,
    pub batch_texts: Histogram,
    pub queue_wait: Histogram,
    pub inference: Histogram,
    pub queued: IntGauge,
    pub skipped: IntCounterVec,
}

impl BatchMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "simq_embedder_requests_total",
                    "Embed requests by outcome (ok, invalid, overloaded, error).",
                ),
                &["outcome"],
            )?,
            texts: prometheus::IntCounter::new("simq_embedder_texts_total", "Texts embedded.")?,
            batch_texts: Histogram::with_opts(
                HistogramOpts::new("simq_embedder_batch_texts", "Texts per collected batch.")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            )?,
            queue_wait: Histogram::with_opts(
                HistogramOpts::new(
                    "simq_embedder_queue_wait_seconds",
                    "Time a request waited before its batch started.",
                )
                .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16)?),
            )?,
            inference: Histogram::with_opts(
                HistogramOpts::new(
                    "simq_embedder_inference_seconds",
                    "Time to embed one collected batch.",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
            )?,
            queued: IntGauge::new(
                "simq_embedder_queued_texts",
                "Texts queued or being embedded.",
            )?,
            skipped: IntCounterVec::new(
                Opts::new(
                    "simq_embedder_skipped_requests_total",
                    "Queued requests not computed, by reason (caller_gone, queue_timeout).",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.texts.clone()))?;
        registry.register(Box::new(m.batch_texts.clone()))?;
        registry.register(Box::new(m.queue_wait.clone()))?;
        registry.register(Box::new(m.inference.clone()))?;
        registry.register(Box::new(m.queued.clone()))?;
        registry.register(Box::new(m.skipped.clone()))?;
        Ok(m)
    }
}

struct Job {
    tokens: Vec<Tokens>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Vec<f32>>>,
}

impl Job {
    /// Should this job still be computed? Answers (or drops) it when not.
    fn still_wanted(self, options: &BatchOptions, metrics: &BatchMetrics) -> Option<Job> {
        if self.reply.is_closed() {
            metrics.skipped.with_label_values(&["caller_gone"]).inc();
            return None;
        }
        let waited = self.enqueued.elapsed();
        if waited > options.max_queue_wait {
            metrics.skipped.with_label_values(&["queue_timeout"]).inc();
            let _ = self.reply.send(Err(Error::QueueTimeout {
                waited_ms: waited.as_millis() as u64,
                limit_ms: options.max_queue_wait.as_millis() as u64,
            }));
            return None;
        }
        Some(self)
    }
}

/// Texts of one request counted in the queue; given back when dropped, however the
/// request ends.
pub struct QueueSlots {
    texts: usize,
    queued: Arc<AtomicUsize>,
    gauge: IntGauge,
}

impl Drop for QueueSlots {
    fn drop(&mut self) {
        let now = self.queued.fetch_sub(self.texts, Ordering::AcqRel) - self.texts;
        self.gauge.set(now as i64);
    }
}

/// Handle to the batching queue; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    queued: Arc<AtomicUsize>,
    /// Marked when work reaches an idle queue and when a batch starts or finishes.
    progress: Arc<StallClock>,
    embedder: Arc<Embedder>,
    options: BatchOptions,
    metrics: BatchMetrics,
}

impl Batcher {
    /// Start the collector task on the current tokio runtime.
    pub fn start(embedder: Arc<Embedder>, options: BatchOptions, metrics: BatchMetrics) -> Self {
        let (tx, rx) = mpsc::channel(options.queue_limit.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        let progress = Arc::new(StallClock::default());
        tokio::spawn(collect(
            rx,
            embedder.clone(),
            options,
            metrics.clone(),
            progress.clone(),
        ));
        Self {
            tx,
            queued,
            progress,
            embedder,
            options,
            metrics,
        }
    }

    /// False when texts are queued but no batch has started or finished for `stall`
    /// (counted from when the queue last became busy): the service cannot do its job and
    /// /health says so.
    pub fn progressing(&self, stall: Duration) -> bool {
        self.progress.progressing(self.queued() > 0, stall)
    }

    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    pub fn metrics(&self) -> &BatchMetrics {
        &self.metrics
    }

    /// Texts queued or in flight right now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Embed `texts` as part of whatever batch they land in. Cancellation-safe: dropping
    /// the future gives its queue slots back and its queued work is skipped.
    pub async fn embed(&self, texts: &[&str]) -> Result<Vec<f32>> {
        let n = texts.len();
        let before = self.queued.fetch_add(n, Ordering::AcqRel);
        let _slots = QueueSlots {
            texts: n,
            queued: self.queued.clone(),
            gauge: self.metrics.queued.clone(),
        };
        if before + n > self.options.queue_limit {
            return Err(Error::Overloaded {
                queued: before,
                limit: self.options.queue_limit,
            });
        }
        if before == 0 {
            // Work arrives at an idle queue: the stall clock starts now, not at the last
            // batch (which may be long ago).
            self.progress.mark();
        }
        self.metrics.queued.set((before + n) as i64);
        self.enqueue(texts).await
    }

    async fn enqueue(&self, texts: &[&str]) -> Result<Vec<f32>> {
        let tokens = self.embedder.tokenize(texts)?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            tokens,
            enqueued: Instant::now(),
            reply,
        };
        self.tx.send(job).await.map_err(|_| Error::Inference {
            reason: "batch collector stopped".into(),
        })?;
        answer.await.map_err(|_| Error::Inference {
            reason: "batch worker dropped the request".into(),
        })?
    }
}

async fn collect(
    mut rx: mpsc::Receiver<Job>,
    embedder: Arc<Embedder>,
    options: BatchOptions,
    metrics: BatchMetrics,
    progress: Arc<StallClock>,
) {
    let workers = Arc::new(Semaphore::new(embedder.parallel_calls()));
    while let Some(first) = rx.recv().await {
        let Some(first) = first.still_wanted(&options, &metrics) else {
            continue;
        };
        let mut texts = first.tokens.len();
        let mut jobs = vec![first];
        let mut add = |job: Job, jobs: &mut Vec<Job>| {
            if let Some(job) = job.still_wanted(&options, &metrics) {
                texts += job.tokens.len();
                jobs.push(job);
            }
            texts >= options.max_batch_texts
        };
        // What is queued already joins at once.
        let mut full = false;
        while !full {
            match rx.try_recv() {
                Ok(job) => full = add(job, &mut jobs),
                Err(_) => break,
            }
        }
        // Optionally wait for company although a session may be free.
        if !options.max_wait.is_zero() {
            let deadline = tokio::time::Instant::now() + options.max_wait;
            while !full {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(job)) => full = add(job, &mut jobs),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        // Go as soon as a session is free; until then the batch keeps growing. A batch too
        // small to split takes every place and the lone session (a thread per core) when
        // nothing else runs; beside another call it runs on one single-threaded session.
        let places = embedder.parallel_calls();
        let (permit, lone) = loop {
            let batch_texts = jobs.iter().map(|j| j.tokens.len()).sum();
            if on_lone_session(
                embedder.lone_fits(batch_texts),
                places,
                workers.available_permits(),
            ) {
                if let Ok(all) = workers.clone().try_acquire_many_owned(places as u32) {
                    break (Ok(all), true);
                }
            }
            if full {
                break (workers.clone().acquire_owned().await, false);
            }
            tokio::select! {
                biased;
                permit = workers.clone().acquire_owned() => break (permit, false),
                job = rx.recv() => match job {
                    Some(job) => full = add(job, &mut jobs),
                    None => full = true,
                },
            }
        };
        let permit = permit.expect("semaphore never closes");
        let embedder = embedder.clone();
        let metrics = metrics.clone();
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            // Callers may have left while the batch waited for a session.
            let jobs: Vec<Job> = jobs
                .into_iter()
                .filter_map(|j| j.still_wanted(&options, &metrics))
                .collect();
            progress.mark();
            if jobs.is_empty() {
                return;
            }
            let started = Instant::now();
            for job in &jobs {
                metrics
                    .queue_wait
                    .observe(started.duration_since(job.enqueued).as_secs_f64());
            }
            let all: Vec<Tokens> = jobs.iter().flat_map(|j| j.tokens.iter().cloned()).collect();
            metrics.batch_texts.observe(all.len() as f64);
            let result = embedder.embed_tokens_on(&all, lone);
            metrics.inference.observe(started.elapsed().as_secs_f64());
            progress.mark();
            let dims = embedder.dims();
            match result {
                Ok(vectors) => {
                    metrics.texts.inc_by(all.len() as u64);
                    let mut offset = 0;
                    for job in jobs {
                        let len = job.tokens.len() * dims;
                        let _ = job.reply.send(Ok(vectors[offset..offset + len].to_vec()));
                        offset += len;
                    }
                }
                Err(e) => {
                    let reason = e.to_string();
                    for job in jobs {
                        let _ = job.reply.send(Err(Error::Inference {
                            reason: reason.clone(),
                        }));
                    }
                }
            }
        });
    }
}

/// Whether a batch runs on the lone session: it fits there (`lone_fits`) and every one of
/// the `places` is free, so its thread per core competes with no other call. Measured on
/// the serving stack (2026-12-07, 8 closed-loop clients): the lone session taken while
/// another call ran cost a tenth of the answers (embedder/BENCH.md).
fn on_lone_session(lone_fits: bool, places: usize, free: usize) -> bool {
    lone_fits && free == places
}

#[cfg(test)]
mod tests {
    use super::on_lone_session;

    #[test]
    fn a_small_batch_takes_the_lone_session_only_when_nothing_else_runs() {
        assert!(on_lone_session(true, 2, 2));
        assert!(!on_lone_session(true, 2, 1), "another call runs");
        assert!(!on_lone_session(true, 2, 0));
        assert!(
            !on_lone_session(false, 2, 2),
            "too many texts, or no lone session"
        );
    }
}
