//! Where simq runs, read from the cluster, and the checks a multi-node cluster must pass:
//! instances on every node, the replicas of each shard on different nodes, every shard
//! back to its replicas after a node is lost, and a settled stack (each job runs what it
//! asks for, Consul passes exactly those, the rollout lock is free).
//!
//! [`observe`] reads Consul's health of every service and Nomad's allocations; the checks
//! are pure functions of what it read ([`Observed`]), unit-tested below. `simq-indexer
//! check` (placement, shards-full, settled) and `simq-indexer nodes-of` print them for
//! `scripts/deploy.sh --nodes` and the node suite (`scripts/test-node-faults.sh`).

use std::collections::{BTreeMap, BTreeSet};

use simq_consul::{ConsulClient, ServiceEntry};
use simq_contract::services::{self, tag, tag_value};
use simq_contract::KvLayout;
use simq_nomad::NomadClient;

use crate::lock::read_holder;
use crate::rollout::SHARDS_JOB_ID;

/// The jobs simq runs and the Consul service each registers.
pub const JOBS: [(&str, &str); 3] = [
    ("simq-balancer", services::BALANCER),
    ("simq-embedder", services::EMBEDDER),
    (SHARDS_JOB_ID, services::SHARD),
];

/// One instance of a simq service as Consul sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub service: String,
    /// The node it runs on, e.g. `n2`.
    pub node: String,
    pub address: String,
    pub port: u16,
    pub passing: bool,
    /// Shards only: the dg and shard number from the tags.
    pub dg: Option<String>,
    pub shard: Option<String>,
}

impl Instance {
    pub fn from_entry(e: &ServiceEntry) -> Self {
        Instance {
            service: e.name.clone(),
            node: e.node.clone(),
            address: e.address.clone(),
            port: e.port,
            passing: e.status == "passing",
            dg: tag_value(&e.tags, tag::DG).map(str::to_string),
            shard: tag_value(&e.tags, tag::SHARD).map(str::to_string),
        }
    }

    /// What a placement rule groups by: the service, and for shards the shard number.
    fn key(&self) -> String {
        match &self.shard {
            Some(s) => format!("{} shard {s}", self.service),
            None => self.service.clone(),
        }
    }
}

/// One job as Nomad sees it: the allocations it asks for and where they run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPlacement {
    pub job: String,
    pub service: String,
    /// The sum of its task groups' counts (0 when the job is not registered).
    pub wants: u64,
    /// The node of each running allocation, sorted.
    pub running_on: Vec<String>,
}

/// What [`observe`] read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Every instance of every simq service, passing or not.
    pub instances: Vec<Instance>,
    pub jobs: Vec<JobPlacement>,
    /// The active dg, and how many shards its manifest has.
    pub active: Option<(String, usize)>,
    pub lock_held: bool,
}

impl Observed {
    /// The nodes with a passing instance of `service`, sorted (one entry per instance).
    pub fn passing_nodes(&self, service: &str) -> Vec<String> {
        passing_nodes(&self.instances, service)
    }

    /// Each service (shards of `dg` only, by shard) with its instances, for a listing.
    pub fn listing(&self, dg: Option<&str>) -> Vec<String> {
        let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for i in self.of_dg(dg) {
            let health = if i.passing { "" } else { ", NOT passing" };
            by_key
                .entry(i.key())
                .or_default()
                .push(format!("{}({}:{}{health})", i.node, i.address, i.port));
        }
        by_key
            .into_iter()
            .map(|(key, mut on)| {
                on.sort();
                format!("{key}: {}", on.join(", "))
            })
            .collect()
    }

    /// The instances that count for `dg`: every balancer and embedder, and the shards of
    /// `dg` (every shard when `dg` is None).
    fn of_dg<'a>(&'a self, dg: Option<&'a str>) -> impl Iterator<Item = &'a Instance> + 'a {
        self.instances
            .iter()
            .filter(move |i| i.service != services::SHARD || dg.is_none() || i.dg.as_deref() == dg)
    }

    /// The placement rules of a cluster of `nodes` nodes serving `dg`: every instance
    /// passes; instances run on every node; one balancer and one embedder per node (a lost
    /// node costs one of each); the replicas of each shard on different nodes. Returns
    /// what breaks a rule, empty when none does.
    pub fn placement_problems(&self, nodes: usize, dg: Option<&str>) -> Vec<String> {
        let mut problems = Vec::new();
        let mut on: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for i in self.of_dg(dg) {
            if !i.passing {
                problems.push(format!("{} on {} is not passing", i.key(), i.node));
            }
            on.entry(i.key()).or_default().push(&i.node);
        }
        let used: BTreeSet<&str> = on.values().flatten().copied().collect();
        if used.len() < nodes {
            problems.push(format!(
                "instances on {} nodes ({}), not all {nodes}",
                used.len(),
                used.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        for (key, nodes_of) in &on {
            let distinct: BTreeSet<&str> = nodes_of.iter().copied().collect();
            let one_per_node = key == services::BALANCER || key == services::EMBEDDER;
            let apart =
                key.starts_with(services::SHARD) || (one_per_node && nodes_of.len() <= nodes);
            if apart && distinct.len() < nodes_of.len() {
                let mut sorted = nodes_of.clone();
                sorted.sort();
                let what = if one_per_node {
                    "two instances"
                } else {
                    "two replicas"
                };
                problems.push(format!("{key}: {what} on one node ({})", sorted.join(", ")));
            }
        }
        problems
    }

    /// Every shard of the active dg has `replicas` passing replicas on as many different
    /// nodes, none of them `without` (the node that was lost). Returns what is missing.
    pub fn shards_full_problems(&self, without: Option<&str>, replicas: usize) -> Vec<String> {
        let Some((dg, shards)) = &self.active else {
            return vec!["no active dg".into()];
        };
        let mut nodes: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
        for i in &self.instances {
            if i.service == services::SHARD
                && i.passing
                && i.dg.as_deref() == Some(dg.as_str())
                && Some(i.node.as_str()) != without
            {
                if let Some(s) = &i.shard {
                    nodes.entry(s.clone()).or_default().insert(&i.node);
                }
            }
        }
        (0..*shards)
            .map(|s| s.to_string())
            .filter_map(|s| {
                let on = nodes.get(&s).map(|n| n.len()).unwrap_or(0);
                (on < replicas).then(|| {
                    format!("shard {s} of {dg}: passing on {on} node(s) other than the lost one, wants {replicas}")
                })
            })
            .collect()
    }

    /// Settled: every job runs exactly the allocations it asks for, Consul passes exactly
    /// the running ones (on the same nodes), and the rollout lock is free. Returns what is
    /// off, empty when settled.
    pub fn settled_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for j in &self.jobs {
            if j.running_on.len() as u64 != j.wants {
                problems.push(format!(
                    "{}: {} running, wants {}",
                    j.job,
                    j.running_on.len(),
                    j.wants
                ));
                continue;
            }
            let passing = self.passing_nodes(&j.service);
            if passing != j.running_on {
                problems.push(format!(
                    "{}: passing on [{}], running on [{}]",
                    j.service,
                    passing.join(" "),
                    j.running_on.join(" ")
                ));
            }
        }
        if self.lock_held {
            problems.push("the rollout lock is held".into());
        }
        problems
    }
}

/// The nodes with a passing instance of `service` among `instances`, sorted (one entry
/// per instance).
pub fn passing_nodes(instances: &[Instance], service: &str) -> Vec<String> {
    let mut nodes: Vec<String> = instances
        .iter()
        .filter(|i| i.service == service && i.passing)
        .map(|i| i.node.clone())
        .collect();
    nodes.sort();
    nodes
}

/// Read every simq service's health from Consul, every simq job's allocations from Nomad
/// (skipped without `nomad`), the active dg with its shard count, and the rollout lock.
pub async fn observe(
    consul: &ConsulClient,
    nomad: Option<&NomadClient>,
    layout: &KvLayout,
) -> anyhow::Result<Observed> {
    let mut instances = Vec::new();
    for service in services::ALL {
        let entries = consul.health_service(service, false, None).await?.value;
        instances.extend(entries.iter().map(Instance::from_entry));
    }
    let mut jobs = Vec::new();
    if let Some(nomad) = nomad {
        for (job, service) in JOBS {
            let wants = match nomad.job(job).await? {
                Some(spec) => group_counts(&spec),
                None => 0,
            };
            let mut running_on: Vec<String> = nomad
                .job_allocations(job)
                .await?
                .into_iter()
                .filter(|a| a.client_status == "running")
                .map(|a| a.node_name)
                .collect();
            running_on.sort();
            jobs.push(JobPlacement {
                job: job.into(),
                service: service.into(),
                wants,
                running_on,
            });
        }
    }
    let active = match crate::flip::observe(consul, layout).await?.active {
        Some(a) => {
            let manifest = crate::rollout::published_manifest(consul, layout, &a.dg).await?;
            Some((a.dg, manifest.shards.len()))
        }
        None => None,
    };
    let lock_held = read_holder(consul, layout).await?.is_some();
    Ok(Observed {
        instances,
        jobs,
        active,
        lock_held,
    })
}

/// The allocations a job asks for: the sum of its task groups' `Count`.
fn group_counts(job: &serde_json::Value) -> u64 {
    job["TaskGroups"]
        .as_array()
        .map(|groups| groups.iter().filter_map(|g| g["Count"].as_u64()).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(service: &str, node: &str) -> Instance {
        Instance {
            service: service.into(),
            node: node.into(),
            address: format!("10.0.0.{}", &node[1..]),
            port: 9000,
            passing: true,
            dg: None,
            shard: None,
        }
    }

    fn shard(dg: &str, s: u32, node: &str) -> Instance {
        Instance {
            dg: Some(dg.into()),
            shard: Some(s.to_string()),
            ..at(services::SHARD, node)
        }
    }

    /// 3 nodes, a balancer and an embedder on each, 2 shards of dg-a with 2 replicas apart.
    fn good() -> Observed {
        let mut instances = Vec::new();
        for n in ["n1", "n2", "n3"] {
            instances.push(at(services::BALANCER, n));
            instances.push(at(services::EMBEDDER, n));
        }
        for (s, nodes) in [(0, ["n1", "n2"]), (1, ["n2", "n3"])] {
            for n in nodes {
                instances.push(shard("dg-a", s, n));
            }
        }
        Observed {
            instances,
            jobs: vec![],
            active: Some(("dg-a".into(), 2)),
            lock_held: false,
        }
    }

    #[test]
    fn a_spread_stack_passes_placement() {
        assert_eq!(
            good().placement_problems(3, Some("dg-a")),
            Vec::<String>::new()
        );
    }

    #[test]
    fn two_replicas_of_a_shard_on_one_node_are_named() {
        let mut o = good();
        o.instances.push(shard("dg-a", 1, "n3"));
        o.instances
            .retain(|i| !(i.shard.as_deref() == Some("1") && i.node == "n2"));
        assert_eq!(
            o.placement_problems(3, Some("dg-a")),
            vec!["simq-shard shard 1: two replicas on one node (n3, n3)"]
        );
    }

    #[test]
    fn two_embedders_on_one_node_break_one_per_node_but_more_than_nodes_may_share() {
        let mut o = good();
        o.instances
            .retain(|i| !(i.service == services::EMBEDDER && i.node == "n1"));
        o.instances.push(at(services::EMBEDDER, "n2"));
        assert_eq!(
            o.placement_problems(3, Some("dg-a")),
            vec!["simq-embedder: two instances on one node (n2, n2, n3)"]
        );
        // Four balancers on three nodes must share one.
        let mut o = good();
        o.instances.push(at(services::BALANCER, "n1"));
        assert!(o.placement_problems(3, Some("dg-a")).is_empty());
    }

    #[test]
    fn an_unused_node_and_a_failing_instance_are_named() {
        let mut o = good();
        o.instances.retain(|i| i.node != "n3");
        o.instances[0].passing = false;
        let problems = o.placement_problems(3, Some("dg-a"));
        assert_eq!(
            problems,
            vec![
                "simq-balancer on n1 is not passing",
                "instances on 2 nodes (n1, n2), not all 3"
            ]
        );
    }

    #[test]
    fn shards_of_other_dgs_do_not_count_for_placement() {
        let mut o = good();
        o.instances.push(shard("dg-old", 0, "n1"));
        o.instances.push(shard("dg-old", 0, "n1"));
        assert!(o.placement_problems(3, Some("dg-a")).is_empty());
        assert_eq!(o.placement_problems(3, None).len(), 1);
    }

    #[test]
    fn shards_are_full_only_with_every_replica_off_the_lost_node() {
        let o = good();
        assert!(o.shards_full_problems(None, 2).is_empty());
        // n2 holds a replica of both shards: without it each has one.
        assert_eq!(o.shards_full_problems(Some("n2"), 2).len(), 2);
        // n1 holds a replica of shard 0 only.
        assert_eq!(
            o.shards_full_problems(Some("n1"), 2),
            vec!["shard 0 of dg-a: passing on 1 node(s) other than the lost one, wants 2"]
        );
        let mut replaced = good();
        replaced.instances.push(shard("dg-a", 0, "n3"));
        assert!(replaced.shards_full_problems(Some("n1"), 2).is_empty());
        // A shard with no instance at all is missing too.
        let mut three = good();
        three.active = Some(("dg-a".into(), 3));
        assert_eq!(three.shards_full_problems(None, 2).len(), 1);
    }

    #[test]
    fn settled_needs_the_wanted_allocations_passing_where_they_run_and_a_free_lock() {
        let mut o = good();
        o.jobs = vec![JobPlacement {
            job: "simq-embedder".into(),
            service: services::EMBEDDER.into(),
            wants: 3,
            running_on: vec!["n1".into(), "n2".into(), "n3".into()],
        }];
        assert!(o.settled_problems().is_empty());
        o.instances[1].passing = false; // the embedder on n1
        assert_eq!(
            o.settled_problems(),
            vec!["simq-embedder: passing on [n2 n3], running on [n1 n2 n3]"]
        );
        o.jobs[0].running_on.pop();
        o.lock_held = true;
        assert_eq!(
            o.settled_problems(),
            vec![
                "simq-embedder: 2 running, wants 3",
                "the rollout lock is held"
            ]
        );
    }

    #[test]
    fn a_job_wants_the_sum_of_its_group_counts() {
        let job = serde_json::json!({"TaskGroups": [{"Count": 2}, {"Count": 1}, {}]});
        assert_eq!(group_counts(&job), 3);
        assert_eq!(group_counts(&serde_json::json!({})), 0);
    }
}
