//! Follows Consul with blocking queries: the active pointer (and the manifest it names),
//! and the health of shard and embedder instances. When Consul fails, the last known good
//! state keeps serving and the watchers retry with backoff until Consul answers again.

use std::sync::Arc;
use std::time::Duration;

use simq_consul::{ActiveDg, BlockingQuery, ConsulClient, KvLayout, Manifest};

use crate::metrics::Metrics;
use crate::state::{SharedState, EMBEDDER_SERVICE, SHARD_SERVICE};

/// Everything the watchers need.
#[derive(Clone)]
pub struct Watcher {
    pub consul: ConsulClient,
    pub layout: KvLayout,
    pub state: Arc<SharedState>,
    pub metrics: Metrics,
    /// How long one blocking query may wait.
    pub wait: Duration,
}

const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Watcher {
    /// Run all watchers until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = self.clone().active_loop() => {}
            _ = self.clone().service_loop(SHARD_SERVICE) => {}
            _ = self.clone().service_loop(EMBEDDER_SERVICE) => {}
            _ = stop => {}
        }
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) {
        let msg = format!("{what}: {e}");
        tracing::warn!(error = %msg, "consul watch failed; serving from the last known state");
        self.metrics.consul_errors.inc();
        self.state.consul_failed(msg);
    }

    fn succeeded(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.metrics.consul_last_ok.set(now);
    }

    async fn active_loop(self) {
        let key = self.layout.active();
        let mut index = 0;
        let mut backoff = MIN_BACKOFF;
        loop {
            let block = BlockingQuery {
                index,
                wait: self.wait,
            };
            match self.consul.kv_get(&key, Some(block)).await {
                Ok(answer) => {
                    self.succeeded();
                    index = BlockingQuery::next_index(index, answer.index);
                    match self.read_active(answer.value.map(|kv| kv.value)).await {
                        Ok(Some((active, manifest))) => {
                            let changed = self
                                .state
                                .load()
                                .routing
                                .as_ref()
                                .map(|r| r.active.dg.clone())
                                != Some(active.dg.clone());
                            if changed {
                                tracing::info!(dg = %active.dg, previous = ?active.previous, "active dg");
                            }
                            self.state
                                .update(|p| p.active = Some((active, Arc::new(manifest))));
                            backoff = MIN_BACKOFF;
                        }
                        Ok(None) => {
                            self.state.update(|_| {});
                            backoff = MIN_BACKOFF;
                        }
                        Err(e) => {
                            // A pointer we cannot follow keeps the previous dg serving.
                            self.failed("active dg", e);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
                Err(e) => {
                    self.failed("active dg", e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// The pointer and its manifest; None when no dg was ever activated.
    async fn read_active(
        &self,
        raw: Option<Vec<u8>>,
    ) -> anyhow::Result<Option<(ActiveDg, Manifest)>> {
        let Some(raw) = raw else { return Ok(None) };
        let active: ActiveDg = serde_json::from_slice(&raw).map_err(|e| {
            anyhow::anyhow!("{} is not an active pointer: {e}", self.layout.active())
        })?;
        if let Some(routing) = self.state.load().routing.as_ref() {
            if routing.active == active {
                return Ok(Some((active, (*routing.manifest).clone())));
            }
        }
        let key = self.layout.manifest(&active.dg);
        let kv =
            self.consul.kv_get(&key, None).await?.value.ok_or_else(|| {
                anyhow::anyhow!("active dg {} has no manifest at {key}", active.dg)
            })?;
        let manifest: Manifest = serde_json::from_slice(&kv.value)
            .map_err(|e| anyhow::anyhow!("{key} is not a manifest: {e}"))?;
        manifest
            .validate()
            .map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        if manifest.dg != active.dg {
            anyhow::bail!("{key} describes dg {}, not {}", manifest.dg, active.dg);
        }
        Ok(Some((active, manifest)))
    }

    async fn service_loop(self, service: &'static str) {
        let mut index = 0;
        let mut backoff = MIN_BACKOFF;
        loop {
            let block = BlockingQuery {
                index,
                wait: self.wait,
            };
            match self
                .consul
                .health_service(service, false, Some(block))
                .await
            {
                Ok(answer) => {
                    self.succeeded();
                    index = BlockingQuery::next_index(index, answer.index);
                    let passing = answer
                        .value
                        .iter()
                        .filter(|e| e.status == "passing")
                        .count();
                    self.metrics
                        .healthy_instances
                        .with_label_values(&[service])
                        .set(passing as i64);
                    self.state.update(|p| match service {
                        SHARD_SERVICE => p.shards = answer.value,
                        _ => p.embedders = answer.value,
                    });
                    backoff = MIN_BACKOFF;
                }
                Err(e) => {
                    self.failed(service, e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
