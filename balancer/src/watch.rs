//! Follows Consul with blocking queries: the active pointer (and the manifest it names),
//! the traffic split (and its candidate's manifest), and the health of shard and embedder instances. When Consul fails, the last known good
//! state keeps serving and the watchers retry with backoff until Consul answers again.

use std::sync::Arc;
use std::time::Duration;

use simq_consul::{BlockingQuery, ConsulClient};
use simq_contract::{services, ActiveDg, CentroidMap, KvLayout, Manifest, Record, TrafficSplit};

use crate::metrics::Metrics;
use crate::state::{ActiveIndex, SharedState};

/// Everything the watchers need.
#[derive(Clone)]
pub struct Watcher {
    pub consul: ConsulClient,
    pub layout: KvLayout,
    pub state: Arc<SharedState>,
    pub metrics: Metrics,
    /// How long one blocking query may wait.
    pub wait: Duration,
    /// The API keys, followed under `<prefix>keys/` when keys are required.
    pub auth: Arc<crate::auth::Auth>,
}

/// The watcher of the active pointer, as named in errors and `/v1/status`.
const ACTIVE: &str = "active dg";
/// The watcher of the API key records.
const KEYS: &str = "api keys";
/// The watcher of the traffic split.
const TRAFFIC: &str = "traffic split";
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Watcher {
    /// Run all watchers until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = self.clone().active_loop() => {}
            _ = self.clone().traffic_loop() => {}
            _ = self.clone().service_loop(services::SHARD) => {}
            _ = self.clone().service_loop(services::EMBEDDER) => {}
            _ = self.clone().keys_loop(), if self.auth.mode == crate::auth::Mode::Required => {}
            _ = stop => {}
        }
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) {
        let msg = format!("{what}: {e}");
        tracing::warn!(error = %msg, "consul watch failed; serving from the last known state");
        self.metrics.consul_errors.inc();
        self.state.consul_failed(what, msg);
    }

    /// Apply what `source` read and refresh the gauge of entries left out.
    fn update(&self, source: &str, change: impl FnOnce(&mut crate::state::Parts)) {
        self.state.update(source, change);
        let rejected = self
            .state
            .load()
            .routing
            .as_ref()
            .map_or(0, |r| r.rejected.len());
        self.metrics.consul_rejected.set(rejected as i64);
    }

    fn succeeded(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.metrics.consul_last_ok.set(now);
    }

    /// Follow one KV key with blocking queries, forever: `handle` takes each value read
    /// (None: the key does not exist). A failed read or a value `handle` refuses is
    /// reported under `what` and read again after a backoff; what was applied last stays
    /// in force meanwhile.
    async fn follow_key<Fut>(
        &self,
        what: &str,
        key: String,
        handle: impl Fn(Option<Vec<u8>>) -> Fut,
    ) where
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let mut index = 0;
        let mut backoff = MIN_BACKOFF;
        loop {
            let block = BlockingQuery {
                index,
                wait: self.wait,
            };
            let outcome = match self.consul.kv_get(&key, Some(block)).await {
                Ok(answer) => {
                    self.succeeded();
                    let handled = handle(answer.value.map(|kv| kv.value)).await;
                    // Only a value that was applied moves the index on: a refused one is
                    // read again (a manifest published after its pointer shows up).
                    if handled.is_ok() {
                        index = BlockingQuery::next_index(index, answer.index);
                    }
                    handled
                }
                Err(e) => Err(e.into()),
            };
            match outcome {
                Ok(()) => backoff = MIN_BACKOFF,
                Err(e) => {
                    self.failed(what, e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn active_loop(self) {
        self.follow_key(ACTIVE, self.layout.active(), |raw| self.apply_active(raw))
            .await
    }

    async fn apply_active(&self, raw: Option<Vec<u8>>) -> anyhow::Result<()> {
        // A pointer we cannot follow keeps the previous dg serving.
        let Some(index) = self.read_active(raw).await? else {
            self.update(ACTIVE, |_| {});
            return Ok(());
        };
        let changed = self
            .state
            .load()
            .routing
            .as_ref()
            .map(|r| r.active.dg.clone())
            != Some(index.active.dg.clone());
        if changed {
            tracing::info!(dg = %index.active.dg, previous = ?index.active.previous, clusters = index.map.clusters(), "active dg");
        }
        self.update(ACTIVE, |p| p.active = Some(index));
        Ok(())
    }

    async fn traffic_loop(self) {
        self.follow_key(TRAFFIC, self.layout.traffic(), |raw| {
            self.apply_traffic(raw)
        })
        .await
    }

    /// Apply the traffic split read. A split that cannot be used (not a split, or its
    /// candidate's manifest or centroids unreadable) sends no traffic to any candidate
    /// until it can: the active dg answers everything.
    async fn apply_traffic(&self, raw: Option<Vec<u8>>) -> anyhow::Result<()> {
        let read = match raw {
            None => Ok(None),
            Some(raw) => self.read_split(&raw).await.map(Some),
        };
        let before = self.state.load().parts.candidate.clone();
        let now = read.as_ref().ok().cloned().flatten();
        if before.as_ref().map(|c| &c.split) != now.as_ref().map(|c| &c.split) {
            match &now {
                Some(c) => {
                    tracing::info!(candidate = %c.split.candidate, weight = c.split.weight, shadow = c.split.shadow, salt = %c.split.salt, "traffic split")
                }
                None => tracing::info!("no traffic split: the active dg answers every query"),
            }
        }
        self.update(TRAFFIC, |p| p.candidate = now);
        read.map(|_| ())
    }

    async fn read_split(&self, raw: &[u8]) -> anyhow::Result<crate::state::CandidateIndex> {
        let key = self.layout.traffic();
        let split = TrafficSplit::decode(&key, raw)?;
        let loaded = self.state.load().parts.candidate.clone();
        let (manifest, map) = match loaded.filter(|c| c.manifest.dg == split.candidate) {
            Some(c) => (c.manifest, c.map),
            None => {
                let (m, map) = self.read_index(&split.candidate).await?;
                (Arc::new(m), Arc::new(map))
            }
        };
        Ok(crate::state::CandidateIndex {
            split,
            manifest,
            map,
        })
    }

    /// The pointer, its manifest and centroid map; None when no dg was ever activated.
    async fn read_active(&self, raw: Option<Vec<u8>>) -> anyhow::Result<Option<ActiveIndex>> {
        let Some(raw) = raw else { return Ok(None) };
        let active = ActiveDg::decode(&self.layout.active(), &raw)?;
        if let Some(routing) = self.state.load().routing.as_ref() {
            if routing.active.dg == active.dg {
                return Ok(Some(ActiveIndex {
                    active,
                    manifest: routing.manifest.clone(),
                    map: routing.map.clone(),
                }));
            }
        }
        let (manifest, map) = self.read_index(&active.dg).await?;
        Ok(Some(ActiveIndex {
            active,
            manifest: Arc::new(manifest),
            map: Arc::new(map),
        }))
    }

    /// A published dg's manifest (checked) and its centroid map.
    async fn read_index(&self, dg: &str) -> anyhow::Result<(Manifest, CentroidMap)> {
        let key = self.layout.manifest(dg);
        let kv = self
            .consul
            .kv_get(&key, None)
            .await?
            .value
            .ok_or_else(|| anyhow::anyhow!("dg {dg} has no manifest at {key}"))?;
        let manifest = Manifest::decode(&key, &kv.value)?;
        if manifest.dg != dg {
            anyhow::bail!("{key} describes dg {}, not {dg}", manifest.dg);
        }
        let map = self.read_centroids(&manifest).await?;
        Ok((manifest, map))
    }

    /// The dg's centroid chunks, joined and checked against the manifest's sha256.
    async fn read_centroids(&self, manifest: &Manifest) -> anyhow::Result<CentroidMap> {
        let mut bytes = Vec::new();
        for i in 0..manifest.clusters.centroid_chunks as usize {
            let key = self.layout.centroid_chunk(&manifest.dg, i);
            let kv = self.consul.kv_get(&key, None).await?.value.ok_or_else(|| {
                anyhow::anyhow!("dg {} has no centroid chunk at {key}", manifest.dg)
            })?;
            bytes.extend_from_slice(&kv.value);
        }
        CentroidMap::from_bytes(manifest, &bytes).map_err(anyhow::Error::msg)
    }

    /// Follow one Consul read with blocking queries, forever: `read` runs each query,
    /// `apply` takes each answer. A failed read is reported under `what` and retried with
    /// backoff; the state read last stays in force meanwhile.
    async fn follow<T, Fut>(
        &self,
        what: &str,
        read: impl Fn(BlockingQuery) -> Fut,
        mut apply: impl FnMut(T),
    ) where
        Fut: std::future::Future<Output = simq_consul::Result<simq_consul::Indexed<T>>>,
    {
        let mut index = 0;
        let mut backoff = MIN_BACKOFF;
        loop {
            let block = BlockingQuery {
                index,
                wait: self.wait,
            };
            match read(block).await {
                Ok(answer) => {
                    self.succeeded();
                    index = BlockingQuery::next_index(index, answer.index);
                    apply(answer.value);
                    backoff = MIN_BACKOFF;
                }
                Err(e) => {
                    self.failed(what, e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn keys_loop(self) {
        let prefix = self.layout.api_keys();
        let mut last = None;
        self.follow(
            KEYS,
            |block| self.consul.kv_list(&prefix, Some(block)),
            |pairs: Vec<simq_consul::KvPair>| {
                let entries: Vec<(String, Vec<u8>)> =
                    pairs.into_iter().map(|kv| (kv.key, kv.value)).collect();
                self.auth.load(&entries);
                let (valid, rejected) = self.auth.counts();
                let gauge = |state: &str, n: usize| {
                    self.metrics
                        .api_keys
                        .with_label_values(&[state])
                        .set(n as i64)
                };
                gauge("valid", valid);
                gauge("rejected", rejected.len());
                if last != Some((valid, rejected.len())) {
                    tracing::info!(valid, rejected = rejected.len(), "API keys read");
                    last = Some((valid, rejected.len()));
                }
                self.update(KEYS, |_| {});
            },
        )
        .await
    }

    async fn service_loop(self, service: &'static str) {
        self.follow(
            service,
            |block| self.consul.health_service(service, false, Some(block)),
            |entries: Vec<simq_consul::ServiceEntry>| {
                let passing = entries.iter().filter(|e| e.status == "passing").count();
                self.metrics
                    .healthy_instances
                    .with_label_values(&[service])
                    .set(passing as i64);
                self.update(service, |p| match service {
                    services::SHARD => p.shards = entries,
                    _ => p.embedders = entries,
                });
            },
        )
        .await
    }
}
