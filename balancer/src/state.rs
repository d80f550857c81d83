//! The balancer's view of the cluster: the active dg, its manifest, and the healthy
//! instances that may serve it, swapped atomically as one [`Snapshot`]. A request reads
//! one snapshot and uses only it, so one query never mixes generations.
//!
//! Besides the active dg, a traffic split may name a candidate dg ([`Candidate`]): its own
//! routing, built by the same rules, which gets traffic only while every one of its shards
//! has a healthy replica and an embedder of its model passes.
//!
//! What Consul says is input, not truth: a catalog entry the balancer cannot use (an
//! address that is no IP or host name, a port of 0, a shard number that is no shard of
//! the dg) is left out and reported in [`Routing::rejected`] (`/v1/status`, the metric
//! `simq_balancer_consul_rejected_entries`, one log line per new entry), never a panic.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use simq_consul::ServiceEntry;
use simq_contract::services::{self, tag, tag_value};
use simq_contract::{ActiveDg, CentroidMap, Manifest, TrafficSplit};
use tonic::transport::{Channel, Endpoint};

/// One instance the balancer may call.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// Consul service id.
    pub id: String,
    /// host:port of its gRPC endpoint.
    pub addr: String,
    pub channel: LazyChannel,
}

/// How long a connection to an upstream may take to open (loopback or one LAN hop).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// An HTTP/2 ping on every upstream connection this often, even when idle ...
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// ... and a connection whose ping is unanswered this long is closed (then reopened).
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// A gRPC channel made at its first call, on the runtime that makes that call.
///
/// tonic spawns a channel's request buffer and its HTTP/2 connection as tasks of the
/// runtime current where the channel is made. The Consul watcher runs on Pingora's
/// background runtime, so channels made there put both tasks on the watcher's thread, and
/// every embed and shard call crossed threads twice (a query runs on a serving thread).
/// Made by the first query instead, the tasks live beside the queries that use them.
#[derive(Clone, Debug)]
pub struct LazyChannel {
    endpoint: Endpoint,
    channel: Arc<OnceLock<Channel>>,
}

impl LazyChannel {
    /// A channel to `http://{addr}`; an error names an address that is no URI authority.
    pub fn new(addr: &str) -> Result<Self, BadEndpoint> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|err| BadEndpoint::NotAUri {
                addr: addr.to_string(),
                why: err.to_string(),
            })?
            // A peer on a node that lost power or is cut off answers no SYN and sends no
            // RST: without these a connection attempt waits out the kernel's retries and a
            // dead connection stays "open" until every call on it times out.
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        Ok(Self {
            endpoint,
            channel: Arc::default(),
        })
    }

    /// The channel, made now if this is its first use. Must run inside a tokio runtime.
    pub fn get(&self) -> Channel {
        self.channel
            .get_or_init(|| self.endpoint.connect_lazy())
            .clone()
    }
}

/// Everything needed to answer queries with one dg.
#[derive(Clone, Debug)]
pub struct Routing {
    /// The pointer this routing follows; for a candidate, its dg with the time the split
    /// was set.
    pub active: ActiveDg,
    pub manifest: Arc<Manifest>,
    /// The dg's fine-cluster centroids: where each query goes.
    pub map: Arc<CentroidMap>,
    /// Passing embedders whose model is the manifest's model.
    pub embedders: Vec<Upstream>,
    /// Passing replicas of each shard of the active dg, indexed by shard number.
    pub shards: Vec<Vec<Upstream>>,
    /// Catalog entries left out because they cannot be used, each with the reason.
    pub rejected: Vec<String>,
}

/// The active pointer and what it names, read from Consul as one.
#[derive(Clone, Debug)]
pub struct ActiveIndex {
    pub active: ActiveDg,
    pub manifest: Arc<Manifest>,
    pub map: Arc<CentroidMap>,
}

/// A traffic split and the candidate's manifest and centroid map, read as one.
#[derive(Clone, Debug)]
pub struct CandidateIndex {
    pub split: TrafficSplit,
    pub manifest: Arc<Manifest>,
    pub map: Arc<CentroidMap>,
}

/// The candidate arm of a traffic split, with the routing it would use.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub split: TrafficSplit,
    pub routing: Routing,
}

impl Candidate {
    /// Why the candidate gets no traffic now (None: it may serve): a shard without a
    /// healthy replica, no embedder of its model, or it is the active dg already.
    pub fn not_ready(&self, active: &Routing) -> Option<String> {
        let r = &self.routing;
        if r.manifest.dg == active.manifest.dg {
            return Some(format!("{} is the active dg", r.manifest.dg));
        }
        if let Some(s) = r.shards.iter().position(Vec::is_empty) {
            return Some(format!(
                "shard {s} of {} has no healthy replica",
                r.manifest.dg
            ));
        }
        if r.embedders.is_empty() {
            return Some(format!(
                "no healthy embedder with model {}",
                r.manifest.model_id
            ));
        }
        None
    }
}

/// What the watchers last read from Consul.
#[derive(Clone, Debug, Default)]
pub struct Parts {
    /// The active pointer, its manifest and centroid map, always updated together.
    pub active: Option<ActiveIndex>,
    /// The traffic split, when one is set and its candidate could be read.
    pub candidate: Option<CandidateIndex>,
    pub embedders: Vec<ServiceEntry>,
    pub shards: Vec<ServiceEntry>,
}

/// The state requests read: routing (None until an active dg and its manifest are known)
/// and facts for /v1/status.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub routing: Option<Routing>,
    /// The candidate of the traffic split, when one is set (see [`Candidate::not_ready`]).
    pub candidate: Option<Candidate>,
    pub parts: Parts,
    /// When Consul last answered a watcher without error.
    pub consul_ok_at: Option<SystemTime>,
    /// The last error of each watcher ("active dg", a service name) whose latest attempt
    /// failed; cleared only by that watcher's next success.
    pub consul_errors: BTreeMap<String, String>,
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
    channels: HashMap<String, LazyChannel>,
    consul_ok_at: Option<SystemTime>,
    consul_errors: BTreeMap<String, String>,
}

impl SharedState {
    pub fn load(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Apply a change that `source` (a watcher) read from Consul; publish a new snapshot.
    pub fn update(&self, source: &str, change: impl FnOnce(&mut Parts)) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut w.parts);
        w.consul_ok_at = Some(SystemTime::now());
        w.consul_errors.remove(source);
        self.publish(&mut w);
    }

    /// Record a failure of `source`; the routing stays as it was (last known good state).
    pub fn consul_failed(&self, source: &str, error: String) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.consul_errors.insert(source.to_string(), error);
        self.publish(&mut w);
    }

    fn publish(&self, w: &mut Writer) {
        let Writer {
            parts,
            channels,
            consul_ok_at,
            consul_errors,
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
        let before: &[String] = current.routing.as_ref().map_or(&[], |r| &r.rejected);
        for why in routing.iter().flat_map(|r| &r.rejected) {
            if !before.contains(why) {
                tracing::warn!(entry = %why, "consul catalog entry left out");
            }
        }
        let candidate = parts.candidate.as_ref().map(|c| Candidate {
            split: c.split.clone(),
            routing: routing_for(
                &ActiveIndex {
                    active: ActiveDg {
                        dg: c.manifest.dg.clone(),
                        previous: None,
                        flipped_at: c.split.set_at.clone(),
                    },
                    manifest: c.manifest.clone(),
                    map: c.map.clone(),
                },
                parts,
                channels,
            ),
        });
        self.snapshot.store(Arc::new(Snapshot {
            routing,
            candidate,
            parts: parts.clone(),
            consul_ok_at: *consul_ok_at,
            consul_errors: consul_errors.clone(),
        }));
    }
}

/// Why a catalog entry's address and port make no gRPC endpoint: the entry is skipped and
/// the reason shown in `/v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadEndpoint {
    #[error("port 0")]
    PortZero,
    #[error("address {0:?} is not an IP address or host name")]
    NotAHost(String),
    #[error("{addr} is not a usable endpoint: {why}")]
    NotAUri { addr: String, why: String },
}

/// The gRPC endpoint `host:port` of a catalog entry's address and port: IPv6 literals in
/// brackets; an address that is neither an IP address nor a host name is refused.
pub fn endpoint(address: &str, port: u16) -> Result<String, BadEndpoint> {
    if port == 0 {
        return Err(BadEndpoint::PortZero);
    }
    let host = address.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(match ip {
            std::net::IpAddr::V4(v4) => format!("{v4}:{port}"),
            std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        });
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if address.is_empty() || address.len() > 253 || !address.split('.').all(label_ok) {
        return Err(BadEndpoint::NotAHost(address.to_string()));
    }
    Ok(format!("{address}:{port}"))
}

/// The routing for the parts: instances filtered to the active dg and its model.
pub fn build_routing(
    parts: &Parts,
    channels: &mut HashMap<String, LazyChannel>,
) -> Option<Routing> {
    Some(routing_for(parts.active.as_ref()?, parts, channels))
}

/// The routing of `index`'s dg: the passing instances of its shards and of its model's
/// embedders among the parts.
pub fn routing_for(
    index: &ActiveIndex,
    parts: &Parts,
    channels: &mut HashMap<String, LazyChannel>,
) -> Routing {
    let ActiveIndex {
        active,
        manifest,
        map,
    } = index.clone();
    let mut rejected = Vec::new();
    let mut upstream = |service: &str, e: &ServiceEntry| -> Option<Upstream> {
        let made = endpoint(&e.address, e.port).and_then(|addr| {
            if let Some(channel) = channels.get(&addr) {
                return Ok((addr, channel.clone()));
            }
            let channel = LazyChannel::new(&addr)?;
            channels.insert(addr.clone(), channel.clone());
            Ok((addr, channel))
        });
        match made {
            Ok((addr, channel)) => Some(Upstream {
                id: e.id.clone(),
                addr,
                channel,
            }),
            Err(why) => {
                rejected.push(format!("{service} {:?}: {why}", e.id));
                None
            }
        }
    };
    let embedders = parts
        .embedders
        .iter()
        .filter(|e| {
            e.status == "passing"
                && tag_value(&e.tags, tag::MODEL) == Some(manifest.model_id.as_str())
        })
        .filter_map(|e| upstream(services::EMBEDDER, e))
        .collect();
    let mut shards = vec![Vec::new(); manifest.shards.len()];
    let mut bad_shard = Vec::new();
    for e in parts.shards.iter().filter(|e| e.status == "passing") {
        let number = tag_value(&e.tags, tag::SHARD).and_then(|s| s.parse::<usize>().ok());
        // A shard of another dg that serves the very file this dg pins at its place (an
        // incremental build keeps its base's unchanged shard files): it answers for this
        // dg too (the request pins the sha256 and the shard checks it).
        let same_file = number
            .zip(tag_value(&e.tags, tag::SHA256))
            .is_some_and(|(n, sha)| {
                manifest
                    .shards
                    .iter()
                    .any(|s| s.shard as usize == n && s.sha256 == sha)
            });
        if tag_value(&e.tags, tag::DG) != Some(manifest.dg.as_str()) && !same_file {
            continue;
        }
        match number {
            Some(n) if n < shards.len() => {
                if let Some(u) = upstream(services::SHARD, e) {
                    shards[n].push(u);
                }
            }
            _ => bad_shard.push(format!(
                "{} {:?}: tag shard={} is not a shard of {} ({} shards)",
                services::SHARD,
                e.id,
                tag_value(&e.tags, tag::SHARD).unwrap_or("(missing)"),
                manifest.dg,
                shards.len()
            )),
        }
    }
    rejected.extend(bad_shard);
    Routing {
        active,
        manifest,
        map,
        embedders,
        shards,
        rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::two_shard_index;

    fn entry(id: &str, port: u16, status: &str, tags: &[&str]) -> ServiceEntry {
        ServiceEntry {
            id: id.into(),
            name: "x".into(),
            node: "n1".into(),
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
            candidate: None,
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

    #[tokio::test]
    async fn another_dgs_shard_serving_the_file_this_dg_pins_at_its_place_serves_it_too() {
        let index = two_shard_index("model-a");
        let pinned = index.manifest.shards[1].sha256.clone();
        let other = "dg-base";
        let shard = |id: &str, port, tags: &[&str]| entry(id, port, "passing", tags);
        let parts = Parts {
            active: Some(index),
            candidate: None,
            embedders: vec![],
            shards: vec![
                // The base's shard 1 file, unchanged in this dg: serves it.
                shard(
                    "kept",
                    20,
                    &[
                        &format!("dg={other}"),
                        "shard=1",
                        &format!("sha256={pinned}"),
                    ],
                ),
                // The same file at another place, and another file: not this dg's.
                shard(
                    "moved",
                    21,
                    &[
                        &format!("dg={other}"),
                        "shard=0",
                        &format!("sha256={pinned}"),
                    ],
                ),
                shard(
                    "changed",
                    22,
                    &[&format!("dg={other}"), "shard=1", "sha256=00ff"],
                ),
            ],
        };
        let r = build_routing(&parts, &mut HashMap::new()).unwrap();
        let ids = |s: usize| r.shards[s].iter().map(|u| u.id.clone()).collect::<Vec<_>>();
        assert_eq!((ids(0), ids(1)), (vec![], vec!["kept".to_string()]));
    }

    #[tokio::test]
    async fn a_candidate_gets_traffic_only_with_every_shard_and_its_model_healthy() {
        let active = two_shard_index("model-a");
        let cand = two_shard_index("model-b");
        let (a, c) = (active.manifest.dg.clone(), cand.manifest.dg.clone());
        let state = SharedState::default();
        let split = simq_contract::TrafficSplit {
            candidate: c.clone(),
            weight: 0.2,
            shadow: 0.0,
            salt: "s".into(),
            set_at: "t".into(),
        };
        let shard = |id: &str, port, dg: &str, n: &str| {
            entry(
                id,
                port,
                "passing",
                &[&format!("dg={dg}"), &format!("shard={n}")],
            )
        };
        state.update("test", |p| {
            p.active = Some(active.clone());
            p.candidate = Some(CandidateIndex {
                split: split.clone(),
                manifest: cand.manifest.clone(),
                map: cand.map.clone(),
            });
            p.embedders = vec![entry("e1", 1, "passing", &["model=model-a"])];
            p.shards = vec![
                shard("a0", 10, &a, "0"),
                shard("a1", 11, &a, "1"),
                shard("c0", 20, &c, "0"),
            ];
        });
        let not_ready = |state: &SharedState| {
            let s = state.load();
            s.candidate
                .as_ref()
                .unwrap()
                .not_ready(s.routing.as_ref().unwrap())
        };
        assert!(
            not_ready(&state).unwrap().contains("shard 1"),
            "{:?}",
            not_ready(&state)
        );
        state.update("test", |p| p.shards.push(shard("c1", 21, &c, "1")));
        assert!(not_ready(&state).unwrap().contains("model-b"));
        state.update("test", |p| {
            p.embedders
                .push(entry("e2", 2, "passing", &["model=model-b"]))
        });
        assert_eq!(not_ready(&state), None);
        let s = state.load();
        let cr = &s.candidate.as_ref().unwrap().routing;
        assert_eq!(cr.manifest.dg, c);
        assert_eq!(cr.embedders[0].id, "e2", "the candidate's own model");
        assert_eq!(
            s.routing.as_ref().unwrap().manifest.dg,
            a,
            "the active dg is unchanged"
        );
    }

    #[tokio::test]
    async fn unusable_catalog_entries_are_left_out_and_reported_never_a_panic() {
        let index = two_shard_index("model-a");
        let dg = index.manifest.dg.clone();
        let with_address = |id: &str, address: &str, port: u16, tags: &[&str]| ServiceEntry {
            address: address.into(),
            ..entry(id, port, "passing", tags)
        };
        let dg_tag = format!("dg={dg}");
        let parts = Parts {
            active: Some(index),
            candidate: None,
            embedders: vec![
                with_address("e-v6", "::1", 7000, &["model=model-a"]),
                with_address("e-junk", "http://x y", 7001, &["model=model-a"]),
                with_address("e-port0", "127.0.0.1", 0, &["model=model-a"]),
            ],
            shards: vec![
                with_address("s-name", "shard-0.local", 7100, &[&dg_tag, "shard=0"]),
                with_address("s-bad-n", "127.0.0.1", 7101, &[&dg_tag, "shard=x"]),
                with_address("s-far", "127.0.0.1", 7102, &[&dg_tag, "shard=7"]),
            ],
        };
        let r = build_routing(&parts, &mut HashMap::new()).unwrap();
        let addrs = |u: &[Upstream]| u.iter().map(|u| u.addr.clone()).collect::<Vec<_>>();
        assert_eq!(addrs(&r.embedders), vec!["[::1]:7000"]);
        assert_eq!(addrs(&r.shards[0]), vec!["shard-0.local:7100"]);
        assert_eq!(r.rejected.len(), 4, "{:?}", r.rejected);
        for id in ["e-junk", "e-port0", "s-bad-n", "s-far"] {
            assert!(
                r.rejected.iter().any(|w| w.contains(id)),
                "{id} reported: {:?}",
                r.rejected
            );
        }
    }

    #[test]
    fn endpoints_bracket_ipv6_and_refuse_what_is_no_host() {
        assert_eq!(endpoint("10.0.0.1", 80).unwrap(), "10.0.0.1:80");
        assert_eq!(endpoint("::1", 80).unwrap(), "[::1]:80");
        assert_eq!(endpoint("[fe80::1]", 80).unwrap(), "[fe80::1]:80");
        assert_eq!(
            endpoint("node-1.dc1.consul", 80).unwrap(),
            "node-1.dc1.consul:80"
        );
        for bad in ["", "a b", "x/y", "-a.b", "a..b", "user:pw@host", "h\u{0}"] {
            assert!(endpoint(bad, 80).is_err(), "{bad:?} refused");
        }
        assert_eq!(endpoint("127.0.0.1", 0), Err(BadEndpoint::PortZero));
        assert_eq!(
            endpoint("a b", 80).unwrap_err().to_string(),
            "address \"a b\" is not an IP address or host name"
        );
    }

    #[test]
    fn no_routing_without_an_active_dg() {
        assert!(build_routing(&Parts::default(), &mut HashMap::new()).is_none());
    }
}
