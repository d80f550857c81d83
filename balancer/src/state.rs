//! The balancer's view of the cluster: the active dg, its manifest, and the healthy
//! instances that may serve it, swapped atomically as one [`Snapshot`]. A request reads
//! one snapshot and uses only it, so one query never mixes generations.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use simq_consul::{ActiveDg, CentroidMap, Manifest, ServiceEntry};
use tonic::transport::Channel;

/// Consul service names and the tags that tie instances to a dg or a model.
pub const EMBEDDER_SERVICE: &str = "simq-embedder";
pub const SHARD_SERVICE: &str = "simq-shard";

/// The value of a `name=value` tag.
pub fn tag_value<'a>(tags: &'a [String], name: &str) -> Option<&'a str> {
    tags.iter()
        .find_map(|t| t.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
}

/// One instance the balancer may call.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// Consul service id.
    pub id: String,
    /// host:port of its gRPC endpoint.
    pub addr: String,
    pub channel: Channel,
}

/// Everything needed to answer queries with one dg.
#[derive(Clone, Debug)]
pub struct Routing {
    pub active: ActiveDg,
    pub manifest: Arc<Manifest>,
    /// The dg's fine-cluster centroids: where each query goes.
    pub map: Arc<CentroidMap>,
    /// Passing embedders whose model is the manifest's model.
    pub embedders: Vec<Upstream>,
    /// Passing replicas of each shard of the active dg, indexed by shard number.
    pub shards: Vec<Vec<Upstream>>,
}

/// The active pointer and what it names, read from Consul as one.
#[derive(Clone, Debug)]
pub struct ActiveIndex {
    pub active: ActiveDg,
    pub manifest: Arc<Manifest>,
    pub map: Arc<CentroidMap>,
}

/// What the watchers last read from Consul.
#[derive(Clone, Debug, Default)]
pub struct Parts {
    /// The active pointer, its manifest and centroid map, always updated together.
    pub active: Option<ActiveIndex>,
    pub embedders: Vec<ServiceEntry>,
    pub shards: Vec<ServiceEntry>,
}

/// The state requests read: routing (None until an active dg and its manifest are known)
/// and facts for /v1/status.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub routing: Option<Routing>,
    pub parts: Parts,
    /// When Consul last answered each watcher without error.
    pub consul_ok_at: Option<SystemTime>,
    /// The last Consul error, if the latest attempt failed.
    pub consul_error: Option<String>,
}

/// Shared, lock-free-for-readers state: watchers write, requests load.
#[derive(Default)]
pub struct SharedState {
    snapshot: ArcSwap<Snapshot>,
    /// Writers only: serialises rebuilds and keeps gRPC channels across rebuilds.
    writer: Mutex<Writer>,
}

#[derive(Default)]
struct Writer {
    parts: Parts,
    channels: HashMap<String, Channel>,
    consul_ok_at: Option<SystemTime>,
    consul_error: Option<String>,
}

impl SharedState {
    pub fn load(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Apply a change read from Consul and publish a new snapshot.
    pub fn update(&self, change: impl FnOnce(&mut Parts)) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut w.parts);
        w.consul_ok_at = Some(SystemTime::now());
        w.consul_error = None;
        self.publish(&mut w);
    }

    /// Record a Consul failure; the routing stays as it was (last known good state).
    pub fn consul_failed(&self, error: String) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.consul_error = Some(error);
        self.publish(&mut w);
    }

    fn publish(&self, w: &mut Writer) {
        let Writer {
            parts,
            channels,
            consul_ok_at,
            consul_error,
        } = w;
        let mut routing = build_routing(parts, channels);
        // A flip takes effect here once every shard of the new dg has a healthy replica
        // in our view; until then the previous dg (still running) keeps answering.
        let current = self.snapshot.load();
        if let (Some(new), Some(old)) = (&routing, &current.routing) {
            let switching = new.manifest.dg != old.manifest.dg;
            if switching
                && new.shards.iter().any(Vec::is_empty)
                && old.shards.iter().all(|s| !s.is_empty())
            {
                tracing::info!(dg = %new.manifest.dg, serving = %old.manifest.dg, "new dg not fully healthy here yet; still serving the previous dg");
                let mut kept = build_routing(
                    &Parts {
                        active: Some(ActiveIndex {
                            active: old.active.clone(),
                            manifest: old.manifest.clone(),
                            map: old.map.clone(),
                        }),
                        ..parts.clone()
                    },
                    channels,
                );
                if kept
                    .as_ref()
                    .is_some_and(|k| k.shards.iter().all(|s| !s.is_empty()))
                {
                    routing = kept.take();
                }
            }
        }
        self.snapshot.store(Arc::new(Snapshot {
            routing,
            parts: parts.clone(),
            consul_ok_at: *consul_ok_at,
            consul_error: consul_error.clone(),
        }));
    }
}

/// The routing for the parts: instances filtered to the active dg and its model.
pub fn build_routing(parts: &Parts, channels: &mut HashMap<String, Channel>) -> Option<Routing> {
    let ActiveIndex {
        active,
        manifest,
        map,
    } = parts.active.clone()?;
    let mut upstream = |e: &ServiceEntry| {
        let addr = format!("{}:{}", e.address, e.port);
        let channel = channels
            .entry(addr.clone())
            .or_insert_with(|| {
                Channel::from_shared(format!("http://{addr}"))
                    .expect("host:port is a valid URI")
                    .connect_lazy()
            })
            .clone();
        Upstream {
            id: e.id.clone(),
            addr,
            channel,
        }
    };
    let embedders = parts
        .embedders
        .iter()
        .filter(|e| {
            e.status == "passing" && tag_value(&e.tags, "model") == Some(manifest.model_id.as_str())
        })
        .map(&mut upstream)
        .collect();
    let mut shards = vec![Vec::new(); manifest.shards.len()];
    for e in parts
        .shards
        .iter()
        .filter(|e| e.status == "passing" && tag_value(&e.tags, "dg") == Some(manifest.dg.as_str()))
    {
        if let Some(n) = tag_value(&e.tags, "shard").and_then(|s| s.parse::<usize>().ok()) {
            if n < shards.len() {
                shards[n].push(upstream(e));
            }
        }
    }
    Some(Routing {
        active,
        manifest,
        map,
        embedders,
        shards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::two_shard_index;

    fn entry(id: &str, port: u16, status: &str, tags: &[&str]) -> ServiceEntry {
        ServiceEntry {
            id: id.into(),
            name: "x".into(),
            address: "127.0.0.1".into(),
            port,
            tags: tags.iter().map(|s| s.to_string()).collect(),
            meta: Default::default(),
            status: status.into(),
        }
    }

    #[tokio::test]
    async fn routing_keeps_only_passing_instances_of_the_active_dg_and_model() {
        let index = two_shard_index("model-a");
        let dg = index.manifest.dg.clone();
        let other = "dg-other";
        let parts = Parts {
            active: Some(index),
            embedders: vec![
                entry("e1", 1, "passing", &["model=model-a"]),
                entry("e2", 2, "passing", &["model=model-b"]),
                entry("e3", 3, "critical", &["model=model-a"]),
            ],
            shards: vec![
                entry("s0", 10, "passing", &[&format!("dg={dg}"), "shard=0"]),
                entry("s0b", 11, "warning", &[&format!("dg={dg}"), "shard=0"]),
                entry("s1", 12, "passing", &[&format!("dg={other}"), "shard=1"]),
                entry("s9", 13, "passing", &[&format!("dg={dg}"), "shard=9"]),
            ],
        };
        let r = build_routing(&parts, &mut HashMap::new()).unwrap();
        assert_eq!(
            r.embedders
                .iter()
                .map(|u| u.id.as_str())
                .collect::<Vec<_>>(),
            vec!["e1"]
        );
        assert_eq!(
            r.shards[0]
                .iter()
                .map(|u| u.addr.as_str())
                .collect::<Vec<_>>(),
            vec!["127.0.0.1:10"]
        );
        assert!(
            r.shards[1].is_empty(),
            "another dg's shard never serves this dg"
        );
    }

    #[test]
    fn no_routing_without_an_active_dg() {
        assert!(build_routing(&Parts::default(), &mut HashMap::new()).is_none());
    }

    #[test]
    fn tag_values_need_the_exact_name() {
        let tags = vec![
            "dg=dg-1".to_string(),
            "dgx=2".to_string(),
            "shard=3".to_string(),
        ];
        assert_eq!(tag_value(&tags, "dg"), Some("dg-1"));
        assert_eq!(tag_value(&tags, "shard"), Some("3"));
        assert_eq!(tag_value(&tags, "model"), None);
    }
}
