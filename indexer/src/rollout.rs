//! `indexer rollout`: run a published dg's shards through a Nomad deployment and flip the
//! active dg once every shard of the new dg is healthy.
//!
//! Design: one job (`simq-shards`), one group per shard. Rolling to a new dg while another
//! runs registers the job with `canary = replicas`: Nomad starts a full new set beside the
//! old one (blue/green). The balancers keep routing with the old dg, whose shards keep
//! running. When every canary passes its checks (artifact checksum, shard self-test), the
//! active pointer flips with one CAS write; once every balancer reports the new dg in its
//! /v1/status the deployment is promoted, which stops the old allocations (each first
//! leaves Consul, then is stopped 2 s later: `shutdown_delay`). If a canary fails, the deployment fails at its
//! progress deadline and Nomad reverts the job by itself (`auto_revert`); the pointer
//! never moved.
//!
//! The shard count may change between dgs. A new dg with more shards gets new groups,
//! which Nomad places at once (canaries exist only for changed groups); they count as
//! ready when all their instances are healthy. A new dg with fewer shards must not take
//! the old dg's extra shards away while balancers still route with the old dg: those
//! groups are registered again unchanged (copied from the running job), keep running
//! through the deployment, and are removed by a second registration after the promote.
//!
//! On the node cluster (`replicas_apart`) each group keeps its replicas on distinct nodes
//! (`distinct_hosts`), and canaries beside the old replicas would need 2 x replicas nodes.
//! There the groups carry the dg in their names (`shard-N-<dg>`), so a new dg is all new
//! groups: the same mechanism as the extra shards above, for every shard. The old dg's
//! groups are registered again unchanged, the new ones are placed at once, the pointer
//! flips when they are all healthy, and a second registration removes the old groups. A
//! failed deployment is reverted by Nomad as with canaries (the new groups go).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use simq_consul::ConsulClient;
use simq_contract::Record;
use simq_contract::{KvLayout, Manifest};
use simq_nomad::{hcl_variables, Deployment, DeploymentGroup, DeploymentStatus, NomadClient};

use crate::flip::{flip, FlipError, Flipped};

/// The job id of the shards job.
pub const SHARDS_JOB_ID: &str = "simq-shards";

/// Knobs of a rollout.
#[derive(Debug, Clone)]
pub struct RolloutOptions {
    pub replicas: usize,
    pub blob_url: String,
    /// Host path of simq-shard, run where `shard_bin_sha256` is empty (single node only).
    pub shard_bin: String,
    /// sha256 of simq-shard in the blob store: every node fetches and verifies it.
    pub shard_bin_sha256: String,
    /// Nomad task driver (raw_exec, exec).
    pub driver: String,
    /// Replicas of a shard on distinct nodes, blue/green by groups (see the module doc).
    pub replicas_apart: bool,
    pub healthy_deadline: Duration,
    pub progress_deadline: Duration,
    /// Give up waiting after this long (Nomad keeps its own deadlines).
    pub timeout: Duration,
    /// Stop once the new dg's canaries are all healthy, before the flip: the candidate's
    /// shards run beside the active dg's (for a traffic split). The same rollout run again
    /// later resumes there and flips; `abort` stops the candidate.
    pub candidate_only: bool,
}

/// How a rollout ended well.
#[derive(Debug, Clone, PartialEq)]
pub enum RolloutOutcome {
    /// The dg's shards run and the pointer names it.
    Done {
        flipped: Flipped,
        seconds_to_flip: f64,
    },
    /// `candidate_only`: the dg's canaries are healthy beside the active dg; nothing was
    /// flipped or promoted.
    CandidateReady { seconds: f64 },
}

/// The first shard group of the running shards job: the group of shard 0 listed first (a
/// rollout by groups lists the new dg's before the old dg's). None when no job runs.
async fn running_first_group(nomad: &NomadClient) -> anyhow::Result<Option<serde_json::Value>> {
    Ok(running_groups(nomad)
        .await?
        .into_iter()
        .find(|g| g["Name"].as_str().and_then(group_shard) == Some(0)))
}

/// Whether the running shards job keeps replicas apart (its groups carry the dg in their
/// names); None when no job runs.
pub async fn running_apart(nomad: &NomadClient) -> anyhow::Result<Option<bool>> {
    Ok(running_first_group(nomad)
        .await?
        .and_then(|g| g["Name"].as_str().map(|n| n != group_name(0, "", false))))
}

/// The task groups of the running shards job (empty when none runs).
async fn running_groups(nomad: &NomadClient) -> anyhow::Result<Vec<serde_json::Value>> {
    let Some(job) = nomad.job(SHARDS_JOB_ID).await? else {
        return Ok(Vec::new());
    };
    if job["Stop"].as_bool() == Some(true) || job["Status"] == "dead" {
        return Ok(Vec::new());
    }
    Ok(job["TaskGroups"].as_array().cloned().unwrap_or_default())
}

/// The dg the running shards job serves, if any ([`served_dg`]).
pub async fn running_dg(nomad: &NomadClient) -> anyhow::Result<Option<String>> {
    Ok(served_dg(&running_groups(nomad).await?))
}

/// The dg a shards job's groups serve: the dg their meta names, except a dg that a later
/// registration lists as kept (`kept_dgs`: groups left unchanged because the new dg
/// shares their file, which still name the dg they were started for). None: no groups.
pub fn served_dg(groups: &[serde_json::Value]) -> Option<String> {
    let meta = |g: &serde_json::Value, key: &str| g["Meta"][key].as_str().map(String::from);
    let kept: Vec<String> = groups
        .iter()
        .filter_map(|g| meta(g, "kept_dgs"))
        .flat_map(|k| k.split(',').map(String::from).collect::<Vec<_>>())
        .collect();
    let named: Vec<String> = groups.iter().filter_map(|g| meta(g, "dg")).collect();
    named
        .iter()
        .find(|dg| !kept.contains(dg))
        .or(named.first())
        .cloned()
}

/// The shard number and file sha256 a running group serves (its name and the shard's
/// `--sha256` argument).
fn group_file(g: &serde_json::Value) -> Option<(u32, String)> {
    let shard = group_shard(g["Name"].as_str()?)?;
    let args = g["Tasks"]
        .as_array()?
        .iter()
        .find_map(|t| t["Config"]["args"].as_array())?;
    let at = args.iter().position(|a| a == "--sha256")?;
    Some((shard, args.get(at + 1)?.as_str()?.to_string()))
}

/// A rollout's shards: the running groups it keeps as they are, and the shards it
/// renders from the job spec ([`split_groups`]).
#[derive(Debug, Default)]
pub struct Split {
    pub unchanged: Vec<serde_json::Value>,
    pub render: Vec<simq_contract::kv::ShardEntry>,
}

/// Which running groups a rollout of `manifest` keeps as they are, and which shards it
/// (re)starts: a group of another dg that serves the very file `manifest` pins at its
/// shard is kept unchanged (no canary, no restart; an incremental build's unchanged
/// shard); every other shard of `manifest` is rendered from the job spec.
pub fn split_groups(running: &[serde_json::Value], manifest: &Manifest) -> Split {
    let mut split = Split::default();
    for s in &manifest.shards {
        let same_file = running.iter().find(|g| {
            g["Meta"]["dg"].as_str() != Some(manifest.dg.as_str())
                && group_file(g).is_some_and(|(n, sha)| n == s.shard && sha == s.sha256)
        });
        match same_file {
            Some(g) => split.unchanged.push(g.clone()),
            None => split.render.push(s.clone()),
        }
    }
    split
}

/// Replicas per shard of the running shards job, if one runs: what a rollout keeps unless
/// told otherwise.
pub async fn running_replicas(nomad: &NomadClient) -> anyhow::Result<Option<usize>> {
    Ok(running_first_group(nomad)
        .await?
        .and_then(|g| g["Count"].as_u64())
        .filter(|&n| n > 0)
        .map(|n| n as usize))
}

/// A published dg's manifest, checked.
pub async fn published_manifest(
    consul: &ConsulClient,
    layout: &KvLayout,
    dg: &str,
) -> anyhow::Result<Manifest> {
    let key = layout.manifest(dg);
    let kv = consul.kv_get(&key, None).await?.value.ok_or_else(|| {
        anyhow!("dg {dg} is not published: {key} does not exist (run `simq-indexer publish` first)")
    })?;
    Ok(Manifest::decode(&key, &kv.value)?)
}

fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The Nomad group that runs shard `shard` of `dg`: `shard-N`, or `shard-N-<dg>` when
/// replicas are kept apart (blue/green by groups). The job spec names them the same way.
pub fn group_name(shard: u32, dg: &str, apart: bool) -> String {
    if apart {
        format!("shard-{shard}-{dg}")
    } else {
        format!("shard-{shard}")
    }
}

/// The shard a group name (of [`group_name`]) runs.
pub fn group_shard(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("shard-")?;
    rest.split_once('-').map_or(rest, |(n, _)| n).parse().ok()
}

/// Register the shards job for `manifest`: the shards `split` renders, from the job spec
/// with `canary` canaries per group, and its unchanged groups plus `others` (task groups
/// of the running job) registered again as they are; returns the job version Nomad
/// assigned.
pub async fn register_shards(
    nomad: &NomadClient,
    manifest: &Manifest,
    split: &Split,
    others: &[serde_json::Value],
    canary: usize,
    attempt: &str,
    opts: &RolloutOptions,
) -> anyhow::Result<u64> {
    let shards: Vec<serde_json::Value> = split
        .render
        .iter()
        .map(|s| serde_json::json!({"shard": s.shard, "sha256": s.sha256}))
        .collect();
    // The dgs of the groups kept because this dg shares their file (served_dg).
    let mut kept_dgs: Vec<&str> = split
        .unchanged
        .iter()
        .filter_map(|g| g["Meta"]["dg"].as_str())
        .collect();
    kept_dgs.sort_unstable();
    kept_dgs.dedup();
    let kept_dgs = kept_dgs.join(",");
    let shards_json = serde_json::to_string(&shards)?;
    let (dims, replicas, canary) = (
        manifest.dims.to_string(),
        opts.replicas.to_string(),
        canary.to_string(),
    );
    let (healthy, progress) = (
        go_duration(opts.healthy_deadline),
        go_duration(opts.progress_deadline),
    );
    let vars = hcl_variables([
        ("dg", manifest.dg.as_str()),
        ("model_id", manifest.model_id.as_str()),
        ("shards_json", shards_json.as_str()),
        ("blob_url", opts.blob_url.as_str()),
        ("shard_bin", opts.shard_bin.as_str()),
        ("shard_bin_sha256", opts.shard_bin_sha256.as_str()),
        ("driver", opts.driver.as_str()),
        ("healthy_deadline", healthy.as_str()),
        ("progress_deadline", progress.as_str()),
        ("attempt", attempt),
        ("kept_dgs", kept_dgs.as_str()),
    ]);
    // Numbers are HCL numbers, not strings.
    let vars = format!(
        "{vars}dims = {dims}\nreplicas = {replicas}\ncanary = {canary}\nreplicas_apart = {}\n",
        opts.replicas_apart
    );
    let mut job = nomad
        .parse_job(simq_nomad::jobs::SHARDS, &vars)
        .await
        .context("parsing nomad/shards.nomad.hcl")?;
    if let Some(groups) = job["TaskGroups"].as_array_mut() {
        groups.extend(split.unchanged.iter().chain(others).cloned());
    }
    nomad
        .register_job(&job)
        .await
        .context("registering the shards job")?;
    let registered = nomad
        .job(SHARDS_JOB_ID)
        .await?
        .ok_or_else(|| anyhow!("job {SHARDS_JOB_ID} vanished after registration"))?;
    registered["Version"]
        .as_u64()
        .ok_or_else(|| anyhow!("job {SHARDS_JOB_ID} has no version"))
}

/// Task groups of the running shards job other than `new` (the new dg's groups).
async fn groups_beyond(
    nomad: &NomadClient,
    new: &[String],
) -> anyhow::Result<Vec<serde_json::Value>> {
    let Some(job) = nomad.job(SHARDS_JOB_ID).await? else {
        return Ok(Vec::new());
    };
    Ok(job["TaskGroups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| {
            g["Name"]
                .as_str()
                .is_some_and(|n| !new.iter().any(|x| x == n))
        })
        .cloned()
        .collect())
}

/// The names of Nomad task groups.
fn group_names(groups: &[serde_json::Value]) -> Vec<String> {
    groups
        .iter()
        .filter_map(|g| g["Name"].as_str().map(String::from))
        .collect()
}

/// Register the job again without the groups `names` (the old dg's after the flip, or a
/// candidate's on abort), so Nomad stops them; waits (bounded) until they ended.
async fn drop_groups(nomad: &NomadClient, names: &[String]) -> anyhow::Result<()> {
    let mut job = nomad
        .job(SHARDS_JOB_ID)
        .await?
        .ok_or_else(|| anyhow!("job {SHARDS_JOB_ID} vanished"))?;
    if let Some(groups) = job["TaskGroups"].as_array_mut() {
        groups.retain(|g| {
            g["Name"]
                .as_str()
                .is_none_or(|n| !names.iter().any(|x| x == n))
        });
        // No auto-revert for this version: its deployment only moves the remaining
        // instances to the new job version in place, and one on a lost node never gets
        // there; the deployment then fails at its deadline, and a revert would bring the
        // dropped groups back (measured with a node down: the old dg's groups ran again).
        // The next rollout registers the spec, auto-revert on, again.
        for g in groups.iter_mut() {
            if g["Update"].is_object() {
                g["Update"]["AutoRevert"] = serde_json::Value::Bool(false);
            }
        }
    }
    if job["Update"].is_object() {
        job["Update"]["AutoRevert"] = serde_json::Value::Bool(false);
    }
    nomad
        .register_job(&job)
        .await
        .with_context(|| format!("removing the shard groups {}", names.join(", ")))?;
    // Wait (bounded) until their instances ended, so the next rollout starts clean.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let allocs = nomad.job_allocations(SHARDS_JOB_ID).await?;
        if !allocs
            .iter()
            .any(|a| names.contains(&a.task_group) && a.is_running_or_pending())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// An HTTP client for balancers' `/v1/status` (2 s timeout).
pub fn status_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("static client")
}

/// The dg a balancer routes with, from its `/v1/status`: `Ok(None)` when it answers but
/// routes with none, `Err` when it does not answer.
pub async fn balancer_dg(
    http: &reqwest::Client,
    balancer: &simq_consul::ServiceEntry,
) -> Result<Option<String>, reqwest::Error> {
    let url = format!("http://{}:{}/v1/status", balancer.address, balancer.port);
    let resp = http.get(&url).send().await?;
    Ok(resp
        .json::<serde_json::Value>()
        .await
        .ok()
        .and_then(|v| v["active"]["dg"].as_str().map(String::from)))
}

/// What [`wait_for_balancers`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancersWaited {
    /// At least the asked number passed and every passing one routed with the dg.
    pub ready: bool,
    /// "all N switched", or which are behind.
    pub seen: String,
}

impl std::fmt::Display for BalancersWaited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.seen)
    }
}

/// Wait until at least `at_least` `simq-balancer` instances pass and every passing one
/// reports `dg` as its active dg in `/v1/status` (or `limit` passes); says what it saw.
pub async fn wait_for_balancers(
    consul: &ConsulClient,
    dg: &str,
    at_least: usize,
    limit: Duration,
) -> BalancersWaited {
    let http = status_client();
    let deadline = Instant::now() + limit;
    loop {
        let balancers = consul
            .health_service(simq_contract::services::BALANCER, true, None)
            .await
            .map(|a| a.value)
            .unwrap_or_default();
        let mut behind = Vec::new();
        for b in &balancers {
            let current = balancer_dg(&http, b).await.ok().flatten();
            if current.as_deref() != Some(dg) {
                behind.push(format!("{}:{}", b.address, b.port));
            }
        }
        if behind.is_empty() && balancers.len() >= at_least {
            return BalancersWaited {
                ready: true,
                seen: format!("all {} switched", balancers.len()),
            };
        }
        if Instant::now() > deadline {
            let seen = if behind.is_empty() {
                format!("{} pass, fewer than {at_least}", balancers.len())
            } else {
                format!(
                    "{} still behind after {limit:?}: {}",
                    behind.len(),
                    behind.join(", ")
                )
            };
            return BalancersWaited { ready: false, seen };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After a failure: if this rollout flipped the pointer, flip it back to the dg that
/// served before (whose shards Nomad's revert keeps or brings back) and say so; `None`
/// when nothing was flipped.
async fn flip_back(
    consul: &ConsulClient,
    layout: &KvLayout,
    flipped: &Option<(Flipped, f64)>,
) -> Option<String> {
    let Some((Flipped::Now(now), _)) = flipped else {
        return None;
    };
    Some(match &now.previous {
        Some(previous) => match flip(consul, layout, previous).await {
            Ok(_) => format!("The active dg was flipped back to {previous}"),
            Err(e) => format!("Flipping back to {previous} failed too: {e}"),
        },
        None => "There is no previous dg to flip back to".into(),
    })
}

/// What a rollout sees before it acts.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    /// The dg to roll out.
    pub dg: &'a str,
    /// The dg the shards job's spec names (its first shard-0 group), if a job runs.
    pub current: Option<&'a str>,
    /// The dg the active pointer names, if any.
    pub active: Option<&'a str>,
    /// Replicas apart: blue/green by groups instead of canaries.
    pub apart: bool,
    pub replicas: usize,
    /// The shards job's latest deployment.
    pub latest: Option<LatestDeployment<'a>>,
}

/// The parts of a Nomad deployment a rollout decides by.
#[derive(Debug, Clone, Copy)]
pub struct LatestDeployment<'a> {
    pub status: &'a DeploymentStatus,
    pub job_version: u64,
    /// Some group of it has canaries.
    pub canaried: bool,
}

/// What a rollout does, decided from what it sees.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Canaries per group: `replicas` when another dg serves and replicas share nodes.
    pub canary: usize,
    /// Follow this job version's deployment instead of registering the job again.
    pub resume: Option<u64>,
    /// Another dg serves: its groups that are not the new dg's stay until after the flip.
    pub keep_others: bool,
    /// Flip as soon as the new dg's shards are all healthy (then the old ones go).
    pub blue_green: bool,
    /// Force a new job version though the spec may not change: a retry after a failed
    /// deployment, or a spec that names `dg` while another dg serves and its deployment
    /// ended (the new shards must be placed again).
    pub new_attempt: bool,
}

impl Plan {
    /// How the new dg's shards run beside the old, in words.
    fn beside(&self) -> &'static str {
        if self.canary > 0 {
            "canaries"
        } else {
            "new groups"
        }
    }
}

/// Decide a rollout (a pure function: what it does in each state is unit-tested below).
pub fn plan(seen: &Seen) -> Plan {
    let dg = seen.dg;
    // What the job spec names and what the balancers route with can differ after an
    // interrupted rollout: the spec may already name `dg` while the pointer still names
    // the dg whose shards serve. Blue/green is needed whenever another dg serves.
    let another_serves =
        seen.active.is_some_and(|a| a != dg) || seen.current.is_some_and(|c| c != dg);
    let canary = if another_serves && !seen.apart {
        seen.replicas
    } else {
        0
    };
    let spec_names_dg = seen.current == Some(dg);
    // An interrupted rollout of `dg` whose deployment still runs is picked up where it is,
    // not registered again (which would cancel it and start its canaries over). By groups,
    // so is one whose new groups already run beside the serving dg's (a candidate).
    let resume = seen.latest.filter(|_| spec_names_dg).and_then(|d| {
        let live = d.status.is_live();
        let beside =
            seen.apart && another_serves && (live || *d.status == DeploymentStatus::Successful);
        ((live && d.canaried) || beside).then_some(d.job_version)
    });
    // (Not when `dg` already serves: its shards run, and a new version would restart them
    // all; its last deployment may have failed only to move an instance on a lost node.)
    let last_failed = spec_names_dg
        && seen.active != Some(dg)
        && seen.latest.is_some_and(|d| d.status.is_failed());
    let stale_spec = spec_names_dg && another_serves;
    Plan {
        canary,
        resume,
        keep_others: another_serves,
        blue_green: canary > 0 || resume.is_some() || (seen.apart && another_serves),
        new_attempt: resume.is_none() && (last_failed || stale_spec),
    }
}

/// What the watch of a registered rollout sees on each poll.
#[derive(Debug, Clone, Copy)]
pub struct Watch<'a> {
    /// The job version this rollout registered (or resumed).
    pub version: u64,
    /// The shards job's latest deployment.
    pub latest: Option<&'a Deployment>,
    /// The job ran this dg already before the rollout (an identical registration makes no
    /// deployment).
    pub already_running: bool,
    /// The groups this rollout starts and waits for.
    pub new_groups: &'a [String],
    /// The plan runs the new dg beside the old one and flips when it is healthy.
    pub blue_green: bool,
    /// Replicas apart: new groups instead of canaries.
    pub apart: bool,
    /// Stop when the new dg is ready, without flipping.
    pub candidate_only: bool,
    /// This run flipped the pointer already.
    pub flipped: bool,
}

/// What to do after a poll.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing has changed enough: poll again.
    Wait,
    /// Nomad registered a newer version than ours: its auto-revert of our deployment.
    Reverted { to: u64 },
    /// Our deployment failed or was cancelled.
    Failed { description: String },
    /// Every new shard is healthy and only a candidate was asked for.
    CandidateReady,
    /// Every new shard is healthy: flip the pointer, then promote.
    Flip { promote: Promote },
    /// The deployment is over (or, by groups, the flip ended the wait).
    Done,
}

/// The promotion that follows the flip.
#[derive(Debug, Clone, PartialEq)]
pub enum Promote {
    /// No group has canaries (new groups, or the first dg).
    Nothing,
    /// A run killed after promoting: the canaries are promoted already.
    Already,
    Now {
        deployment: String,
    },
}

/// Instances a group of the deployment needs healthy: its canaries when it has any (a
/// changed group), else all of them (a new group).
fn ready_target(g: &DeploymentGroup) -> u32 {
    if g.desired_canaries > 0 {
        g.desired_canaries
    } else {
        g.desired_total
    }
}

/// Decide the next step of a rollout's watch (a pure function: unit-tested below).
pub fn decide(w: &Watch) -> Step {
    let Some(dep) = w.latest.filter(|d| d.job_version >= w.version) else {
        // Re-registering an identical job makes no deployment: it is running already.
        let running = w
            .latest
            .is_some_and(|d| d.status == DeploymentStatus::Successful);
        return if running && w.already_running {
            Step::Done
        } else {
            Step::Wait
        };
    };
    if dep.job_version > w.version {
        return Step::Reverted {
            to: dep.job_version,
        };
    }
    if dep.status.is_failed() {
        return Step::Failed {
            description: dep.status_description.clone(),
        };
    }
    // A resumed deployment has canaries even when the dg is already active (a run killed
    // between the flip and the promotion): they still wait for the promotion. By groups,
    // a successful deployment means every new group is healthy.
    let all_ready = w.blue_green
        && ((w.apart && dep.status == DeploymentStatus::Successful)
            || w.new_groups.iter().all(|name| {
                dep.task_groups
                    .get(name)
                    .is_some_and(|g| ready_target(g) > 0 && g.healthy_allocs >= ready_target(g))
            }));
    if all_ready && w.candidate_only {
        return Step::CandidateReady;
    }
    if all_ready && !w.flipped {
        let mut canaried = dep
            .task_groups
            .values()
            .filter(|g| g.desired_canaries > 0)
            .peekable();
        let promote = if canaried.peek().is_none() {
            Promote::Nothing
        } else if canaried.all(|g| g.promoted) {
            Promote::Already
        } else {
            Promote::Now {
                deployment: dep.id.clone(),
            }
        };
        return Step::Flip { promote };
    }
    // By groups, the flip ends the wait: the old groups go next, by a registration that
    // supersedes this deployment. (It would not end while an old group has an instance on
    // a lost node, which the registration cannot update: measured, a rollback with a node
    // down failed at its progress deadline.)
    if dep.status == DeploymentStatus::Successful || (w.apart && w.flipped) {
        return Step::Done;
    }
    Step::Wait
}

/// One progress line of a deployment: its status and the new groups' healthy instances.
fn progress_line(dep: &Deployment, new_groups: &[String]) -> String {
    let groups: Vec<String> = dep
        .task_groups
        .iter()
        .filter(|(g, _)| new_groups.contains(g))
        .map(|(g, s)| format!("{g} {}/{}", s.healthy_allocs, ready_target(s)))
        .collect();
    format!(
        "deployment {} {}: {}",
        &dep.id[..8.min(dep.id.len())],
        dep.status,
        groups.join(", ")
    )
}

/// Roll `dg` out; `progress` receives one line per change of state.
pub async fn rollout(
    nomad: &NomadClient,
    consul: &ConsulClient,
    layout: &KvLayout,
    dg: &str,
    opts: &RolloutOptions,
    progress: impl Fn(&str),
) -> anyhow::Result<RolloutOutcome> {
    let started = Instant::now();
    let manifest = published_manifest(consul, layout, dg).await?;
    let current = running_dg(nomad).await?;
    let active = crate::flip::observe(consul, layout)
        .await?
        .active
        .map(|a| a.dg);
    let latest = nomad.latest_deployment(SHARDS_JOB_ID).await?;
    let plan = plan(&Seen {
        dg,
        current: current.as_deref(),
        active: active.as_deref(),
        apart: opts.replicas_apart,
        replicas: opts.replicas,
        latest: latest.as_ref().map(|d| LatestDeployment {
            status: &d.status,
            job_version: d.job_version,
            canaried: d.task_groups.values().any(|g| g.desired_canaries > 0),
        }),
    });
    let (canary, resumed, blue_green) = (plan.canary, plan.resume, plan.blue_green);
    progress(&format!(
        "rolling out {dg} ({} shards x {} replicas){}",
        manifest.shards.len(),
        opts.replicas,
        match (&active, &current) {
            (Some(a), _) if a != dg => format!(", {} beside {a}, which serves", plan.beside()),
            (_, Some(c)) if c != dg => format!(", {} beside running {c}", plan.beside()),
            (_, Some(_)) => ", same dg already running".into(),
            _ => String::new(),
        }
    ));
    let attempt = if plan.new_attempt {
        crate::flip::now_rfc3339()
    } else {
        String::new()
    };
    // Shards whose file the running job already serves keep their groups as they are.
    let split = split_groups(&running_groups(nomad).await?, &manifest);
    if !split.unchanged.is_empty() {
        progress(&format!(
            "{} of {} shards serve the same file already and keep running as they are: {}",
            split.unchanged.len(),
            manifest.shards.len(),
            group_names(&split.unchanged).join(", ")
        ));
    }
    // The groups this rollout starts (and waits for), then every group of the new dg.
    let new_groups: Vec<String> = split
        .render
        .iter()
        .map(|s| group_name(s.shard, dg, opts.replicas_apart))
        .collect();
    let dg_groups: Vec<String> = new_groups
        .iter()
        .cloned()
        .chain(group_names(&split.unchanged))
        .collect();
    // Groups of the serving dg that are not the new dg's (beyond its shard count; by groups,
    // all of them): kept until after the flip.
    let others = if plan.keep_others {
        groups_beyond(nomad, &dg_groups).await?
    } else {
        Vec::new()
    };
    let version = match resumed {
        Some(version) => {
            progress(&format!(
                "resuming the running deployment of {dg} (job version {version})"
            ));
            version
        }
        None => register_shards(nomad, &manifest, &split, &others, canary, &attempt, opts).await?,
    };
    let deadline = started + opts.timeout;
    let mut last_line = String::new();
    let mut last_at = Instant::now();
    let mut flipped = None;
    // Observe the deployment, decide (a pure function, unit-tested below), act.
    loop {
        if Instant::now() > deadline {
            bail!(
                "rollout of {dg} timed out after {:?}; Nomad keeps following its own deadlines",
                opts.timeout
            );
        }
        let latest = nomad.latest_deployment(SHARDS_JOB_ID).await?;
        if let Some(dep) = latest.as_ref().filter(|d| d.job_version >= version) {
            let line = progress_line(dep, &new_groups);
            // A line on each change, and at least every LOG_EVERY while nothing changes.
            if line != last_line || last_at.elapsed() >= crate::progress::LOG_EVERY {
                progress(&format!(
                    "{line} ({} elapsed)",
                    crate::progress::human(started.elapsed())
                ));
                last_line = line;
                last_at = Instant::now();
            }
        }
        let step = decide(&Watch {
            version,
            latest: latest.as_ref(),
            already_running: current.as_deref() == Some(dg),
            new_groups: &new_groups,
            blue_green,
            apart: opts.replicas_apart,
            candidate_only: opts.candidate_only,
            flipped: flipped.is_some(),
        });
        match step {
            Step::Wait => tokio::time::sleep(Duration::from_millis(500)).await,
            Step::Done => break,
            Step::Reverted { to } => {
                let causes =
                    crate::jobs::failure_causes(nomad, SHARDS_JOB_ID, "shard", version).await?;
                if let Some(back) = flip_back(consul, layout, &flipped).await {
                    bail!(
                        "rollout of {dg} failed after the flip and Nomad reverted the job (version {version} -> {to}): {}. {back}",
                        causes.join("; ")
                    );
                }
                bail!(
                    "rollout of {dg} failed and Nomad reverted the job (version {version} -> {to}): {}",
                    causes.join("; ")
                );
            }
            Step::Failed { description } => {
                let causes =
                    crate::jobs::failure_causes(nomad, SHARDS_JOB_ID, "shard", version).await?;
                if let Some(back) = flip_back(consul, layout, &flipped).await {
                    bail!(
                        "rollout of {dg} failed after the flip: {description}; {}. {back}",
                        causes.join("; ")
                    );
                }
                bail!(
                    "rollout of {dg} failed: {description}; {}. The active dg was not changed{}",
                    causes.join("; "),
                    if description.contains("rolling back") {
                        "; Nomad reverts the job"
                    } else {
                        ""
                    }
                );
            }
            Step::CandidateReady => {
                progress(&format!(
                    "candidate {dg} ready: every shard's canaries are healthy beside the active dg ({:.1} s); not flipped",
                    started.elapsed().as_secs_f64()
                ));
                return Ok(RolloutOutcome::CandidateReady {
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            Step::Flip { promote } => {
                // Every shard of the new dg is healthy: flip first, then let the old set go.
                let f = flip(consul, layout, dg).await.map_err(|e| match e {
                    FlipError::LostRace { .. } => anyhow!("{e}; the deployment was not promoted"),
                    e => anyhow!(e),
                })?;
                progress(&format!(
                    "active dg flipped to {dg} after {:.1} s",
                    started.elapsed().as_secs_f64()
                ));
                flipped = Some((f, started.elapsed().as_secs_f64()));
                // The old set may only go once no balancer routes with it any more.
                let waited = wait_for_balancers(consul, dg, 0, Duration::from_secs(15)).await;
                progress(&format!("balancers route with {dg}: {waited}"));
                match promote {
                    Promote::Nothing => {}
                    Promote::Already => progress("deployment already promoted: old shards stop"),
                    Promote::Now { deployment } => {
                        nomad
                            .promote_deployment(&deployment)
                            .await
                            .context("promoting the deployment")?;
                        progress("deployment promoted: old shards stop");
                    }
                }
                // Observed again at once: by groups the flip ends the wait.
            }
        }
    }
    // The flip comes before the old dg's groups go.
    let (flipped, seconds_to_flip) = match flipped {
        Some(f) => f,
        None => {
            let f = flip(consul, layout, dg).await?;
            progress(&format!(
                "active dg is {dg} ({:.1} s)",
                started.elapsed().as_secs_f64()
            ));
            (f, started.elapsed().as_secs_f64())
        }
    };
    if !others.is_empty() {
        let names = group_names(&others);
        drop_groups(nomad, &names).await?;
        progress(&format!(
            "removed the previous dg's groups {}",
            names.join(", ")
        ));
    }
    Ok(RolloutOutcome::Done {
        flipped,
        seconds_to_flip,
    })
}

/// Stop a candidate started by a rollout that did not flip: fail its deployment, so Nomad
/// reverts the shards job to the version that serves the active dg (the canaries stop),
/// and wait (bounded) until the job spec names the active dg again. Refuses when the
/// candidate is the active dg (that is what `rollback` is for). Returns the dg stopped.
pub async fn abort(
    nomad: &NomadClient,
    consul: &ConsulClient,
    layout: &KvLayout,
    progress: impl Fn(&str),
) -> anyhow::Result<Option<String>> {
    let active = crate::flip::observe(consul, layout)
        .await?
        .active
        .map(|a| a.dg);
    let running = running_dg(nomad).await?;
    let Some(candidate) = running.filter(|r| Some(r) != active.as_ref()) else {
        return Ok(None);
    };
    let Some(active) = active else {
        bail!("no dg is active: {candidate} is the only one running; stop it with nomad job stop");
    };
    if running_apart(nomad).await? == Some(true) {
        // By groups: the candidate is its own groups; the job without them is the active's.
        let names: Vec<String> = group_names(&groups_beyond(nomad, &[]).await?)
            .into_iter()
            .filter(|n| n.ends_with(&format!("-{candidate}")))
            .collect();
        drop_groups(nomad, &names).await?;
        progress(&format!(
            "candidate {candidate}'s groups removed ({}); {active} serves",
            names.join(", ")
        ));
        return Ok(Some(candidate));
    }
    if let Some(dep) = nomad.latest_deployment(SHARDS_JOB_ID).await? {
        if dep.status.is_live() {
            nomad
                .fail_deployment(&dep.id)
                .await
                .context("failing the candidate's deployment")?;
            progress(&format!(
                "deployment {} of {candidate} failed on purpose: Nomad reverts the shards job to {active}",
                &dep.id[..8]
            ));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = running_dg(nomad).await?;
        let canaries_left = nomad.job_allocations(SHARDS_JOB_ID).await?.iter().any(|a| {
            a.deployment_status.as_ref().is_some_and(|d| d.canary)
                && a.is_running_or_pending()
                && a.desired_status == "run"
        });
        if now.as_deref() == Some(active.as_str()) && !canaries_left {
            progress(&format!("candidate {candidate} stopped; {active} serves"));
            return Ok(Some(candidate));
        }
        if Instant::now() > deadline {
            bail!(
                "the shards job still names {} 60 s after failing the deployment of {candidate}; see `nomad job status {SHARDS_JOB_ID}`",
                now.as_deref().unwrap_or("-")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen<'a>(current: Option<&'a str>, active: Option<&'a str>, apart: bool) -> Seen<'a> {
        Seen {
            dg: "dg-b",
            current,
            active,
            apart,
            replicas: 2,
            latest: None,
        }
    }

    fn deployment(status: &str, canaried: bool) -> Option<LatestDeployment<'static>> {
        Some(LatestDeployment {
            status: Box::leak(Box::new(DeploymentStatus::from(status))),
            job_version: 7,
            canaried,
        })
    }

    /// A running shard group as Nomad returns it: name, meta and the shard's arguments.
    fn group(name: &str, dg: &str, sha: &str, kept_dgs: &str) -> serde_json::Value {
        serde_json::json!({
            "Name": name,
            "Meta": {"dg": dg, "attempt": "", "kept_dgs": kept_dgs},
            "Tasks": [{"Name": "shard", "Config": {"args": ["--file", "local/shard.lmdb", "--sha256", sha, "--dg", dg]}}],
        })
    }

    /// A manifest of `dg` whose shard `n` is the file `shas[n]` (only what rollouts read).
    fn manifest(dg: &str, shas: &[&str]) -> Manifest {
        use simq_contract::kv::{BuildInfo, ClusterTable, ShardEntry};
        Manifest {
            format: simq_contract::kv::MANIFEST_FORMAT,
            dg: dg.into(),
            model_id: "m".into(),
            dims: 4,
            distance: "cosine".into(),
            items: shas.len() as u64,
            build: BuildInfo {
                corpus_sha256: String::new(),
                seed: 0,
                kmeans_iterations: 0,
                clusters_requested: 0,
                base: None,
            },
            clusters: ClusterTable {
                shard_of: (0..shas.len() as u32).collect(),
                centroids_sha256: String::new(),
                centroid_chunks: 1,
            },
            shards: shas
                .iter()
                .enumerate()
                .map(|(n, sha)| ShardEntry {
                    shard: n as u32,
                    sha256: sha.to_string(),
                    size: 1,
                    items: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn shards_whose_file_the_running_job_serves_keep_their_groups_and_the_rest_are_rendered() {
        let running = [
            group("shard-0", "dg-a", "f0", ""),
            group("shard-1", "dg-a", "f1", ""),
            group("shard-2", "dg-a", "f2", ""),
        ];
        // An incremental dg that rewrote shard 1 only.
        let split = split_groups(&running, &manifest("dg-b", &["f0", "g1", "f2"]));
        assert_eq!(group_names(&split.unchanged), vec!["shard-0", "shard-2"]);
        assert_eq!(
            split.render.iter().map(|s| s.shard).collect::<Vec<_>>(),
            vec![1]
        );
        // A full rebuild shares no file: everything is rendered.
        let split = split_groups(&running, &manifest("dg-c", &["h0", "h1", "h2"]));
        assert!(split.unchanged.is_empty() && split.render.len() == 3);
        // The same file at another shard number is not the same shard.
        let split = split_groups(&running, &manifest("dg-d", &["f1", "h1", "h2"]));
        assert!(split.unchanged.is_empty());
        // Rolling the running dg out again renders its groups (a new binary or spec takes
        // effect; an unchanged spec is no change for Nomad).
        let split = split_groups(&running, &manifest("dg-a", &["f0", "f1", "f2"]));
        assert!(split.unchanged.is_empty() && split.render.len() == 3);
    }

    #[test]
    fn the_served_dg_is_the_one_no_registration_lists_as_kept() {
        assert_eq!(served_dg(&[]), None);
        let full = [
            group("shard-0", "dg-a", "f0", ""),
            group("shard-1", "dg-a", "f1", ""),
        ];
        assert_eq!(served_dg(&full).as_deref(), Some("dg-a"));
        // dg-b rewrote shard 1 and kept shard 0 (still naming dg-a).
        let incremental = [
            group("shard-0", "dg-a", "f0", ""),
            group("shard-1", "dg-b", "g1", "dg-a"),
        ];
        assert_eq!(served_dg(&incremental).as_deref(), Some("dg-b"));
        // Then dg-c rewrote shard 0 and kept shard 1 (naming dg-b).
        let twice = [
            group("shard-0", "dg-c", "h0", "dg-b"),
            group("shard-1", "dg-b", "g1", "dg-a"),
        ];
        assert_eq!(served_dg(&twice).as_deref(), Some("dg-c"));
    }

    #[test]
    fn group_names_carry_the_dg_only_when_replicas_are_apart() {
        assert_eq!(group_name(3, "dg-b", false), "shard-3");
        assert_eq!(group_name(3, "dg-b", true), "shard-3-dg-b");
        assert_eq!(group_shard("shard-3"), Some(3));
        assert_eq!(group_shard("shard-12-dg-0123456789abcdef"), Some(12));
        assert_eq!(group_shard("embedder"), None);
        assert_eq!(group_shard("shard-x"), None);
    }

    #[test]
    fn the_first_dg_is_placed_without_blue_green() {
        for apart in [false, true] {
            let p = plan(&seen(None, None, apart));
            assert_eq!((p.canary, p.resume, p.blue_green), (0, None, false));
            assert!(!p.keep_others && !p.new_attempt);
        }
    }

    #[test]
    fn another_dg_serving_means_canaries_where_replicas_share_nodes() {
        let p = plan(&seen(Some("dg-a"), Some("dg-a"), false));
        assert_eq!(p.canary, 2);
        assert!(p.blue_green && p.keep_others && !p.new_attempt);
    }

    #[test]
    fn another_dg_serving_means_new_groups_where_replicas_are_apart() {
        let p = plan(&seen(Some("dg-a"), Some("dg-a"), true));
        assert_eq!(
            p.canary, 0,
            "no canaries: they could not sit apart from the old replicas"
        );
        assert!(p.blue_green && p.keep_others && !p.new_attempt);
    }

    #[test]
    fn a_running_deployment_of_the_dg_is_resumed_not_registered_again() {
        let mut s = seen(Some("dg-b"), Some("dg-a"), false);
        s.latest = deployment("running", true);
        assert_eq!(plan(&s).resume, Some(7));
        // By groups, also once the new groups are all healthy (a candidate).
        let mut s = seen(Some("dg-b"), Some("dg-a"), true);
        s.latest = deployment("successful", false);
        let p = plan(&s);
        assert_eq!(p.resume, Some(7));
        assert!(p.blue_green && p.keep_others && !p.new_attempt);
    }

    #[test]
    fn a_failed_deployment_of_the_dg_is_retried_with_a_new_job_version() {
        for apart in [false, true] {
            let mut s = seen(Some("dg-b"), Some("dg-a"), apart);
            s.latest = deployment("failed", !apart);
            let p = plan(&s);
            assert_eq!(p.resume, None);
            assert!(p.new_attempt && p.blue_green);
        }
    }

    #[test]
    fn the_serving_dg_is_not_restarted_because_its_last_deployment_failed() {
        for apart in [false, true] {
            let mut s = seen(Some("dg-b"), Some("dg-b"), apart);
            s.latest = deployment("failed", false);
            let p = plan(&s);
            assert!(!p.new_attempt && !p.blue_green && p.resume.is_none());
        }
    }

    #[test]
    fn the_dg_that_already_serves_is_registered_again_as_is() {
        for apart in [false, true] {
            let mut s = seen(Some("dg-b"), Some("dg-b"), apart);
            s.latest = deployment("successful", false);
            let p = plan(&s);
            assert_eq!((p.canary, p.resume), (0, None));
            assert!(!p.blue_green && !p.keep_others && !p.new_attempt);
        }
    }

    /// A deployment of job version `version` with groups (name, canaries, total, healthy,
    /// promoted).
    fn dep(version: u64, status: &str, groups: &[(&str, u32, u32, u32, bool)]) -> Deployment {
        Deployment {
            id: "d1234567-0000".into(),
            job_version: version,
            status: status.into(),
            status_description: format!("Deployment is {status}"),
            task_groups: groups
                .iter()
                .map(|&(name, canaries, total, healthy, promoted)| {
                    let g = DeploymentGroup {
                        desired_total: total,
                        desired_canaries: canaries,
                        placed_allocs: total.max(canaries),
                        healthy_allocs: healthy,
                        unhealthy_allocs: 0,
                        promoted,
                    };
                    (name.to_string(), g)
                })
                .collect(),
            modify_index: 1,
        }
    }

    fn names(groups: &[&str]) -> Vec<String> {
        groups.iter().map(|g| g.to_string()).collect()
    }

    /// A blue/green watch of version 7 with canaries, the deployment `d`, new groups `g`.
    fn watch<'a>(d: &'a Deployment, g: &'a [String]) -> Watch<'a> {
        Watch {
            version: 7,
            latest: Some(d),
            already_running: false,
            new_groups: g,
            blue_green: true,
            apart: false,
            candidate_only: false,
            flipped: false,
        }
    }

    #[test]
    fn canaries_still_coming_up_mean_waiting() {
        let g = names(&["shard-0", "shard-1"]);
        let d = dep(
            7,
            "running",
            &[("shard-0", 2, 2, 2, false), ("shard-1", 2, 2, 1, false)],
        );
        assert_eq!(decide(&watch(&d, &g)), Step::Wait);
        // A group the deployment does not list yet is not ready either.
        let d = dep(7, "running", &[("shard-0", 2, 2, 2, false)]);
        assert_eq!(decide(&watch(&d, &g)), Step::Wait);
    }

    #[test]
    fn every_canary_healthy_flips_and_then_promotes() {
        let g = names(&["shard-0", "shard-1"]);
        let d = dep(
            7,
            "running",
            &[("shard-0", 2, 2, 2, false), ("shard-1", 2, 2, 2, false)],
        );
        assert_eq!(
            decide(&watch(&d, &g)),
            Step::Flip {
                promote: Promote::Now {
                    deployment: d.id.clone()
                }
            }
        );
        // Flipped and promoted: the deployment runs until the old instances are gone.
        let flipped = Watch {
            flipped: true,
            ..watch(&d, &g)
        };
        assert_eq!(decide(&flipped), Step::Wait);
        let d = dep(
            7,
            "successful",
            &[("shard-0", 2, 2, 2, true), ("shard-1", 2, 2, 2, true)],
        );
        assert_eq!(
            decide(&Watch {
                flipped: true,
                ..watch(&d, &g)
            }),
            Step::Done
        );
    }

    #[test]
    fn a_candidate_only_rollout_stops_when_ready_without_flipping() {
        let g = names(&["shard-0"]);
        let d = dep(7, "running", &[("shard-0", 2, 2, 2, false)]);
        let w = Watch {
            candidate_only: true,
            ..watch(&d, &g)
        };
        assert_eq!(decide(&w), Step::CandidateReady);
        let d = dep(7, "running", &[("shard-0", 2, 2, 1, false)]);
        assert_eq!(
            decide(&Watch {
                latest: Some(&d),
                ..w
            }),
            Step::Wait
        );
    }

    #[test]
    fn a_run_resumed_after_the_promotion_flips_without_promoting_again() {
        // Killed between the promotion and the end: the canaries are promoted already, the
        // pointer names the dg (the flip is then a no-op), and nothing is promoted twice.
        let g = names(&["shard-0"]);
        let d = dep(7, "running", &[("shard-0", 2, 2, 2, true)]);
        assert_eq!(
            decide(&watch(&d, &g)),
            Step::Flip {
                promote: Promote::Already
            }
        );
    }

    #[test]
    fn a_failed_canary_fails_the_rollout_and_a_newer_version_is_nomads_revert() {
        let g = names(&["shard-0"]);
        let d = dep(7, "failed", &[("shard-0", 2, 2, 1, false)]);
        assert_eq!(
            decide(&watch(&d, &g)),
            Step::Failed {
                description: "Deployment is failed".into()
            }
        );
        let d = dep(8, "running", &[("shard-0", 0, 2, 0, false)]);
        assert_eq!(decide(&watch(&d, &g)), Step::Reverted { to: 8 });
        // Also after the flip: the act step flips back (`flip_back`).
        let flipped = Watch {
            flipped: true,
            ..watch(&d, &g)
        };
        assert_eq!(decide(&flipped), Step::Reverted { to: 8 });
    }

    #[test]
    fn an_identical_registration_makes_no_deployment_and_is_done_only_if_it_ran_already() {
        let g = names(&["shard-0"]);
        let older = dep(6, "successful", &[("shard-0", 0, 2, 2, false)]);
        let w = Watch {
            already_running: true,
            ..watch(&older, &g)
        };
        assert_eq!(decide(&w), Step::Done);
        assert_eq!(
            decide(&watch(&older, &g)),
            Step::Wait,
            "ours is not placed yet"
        );
        let none = Watch {
            latest: None,
            ..watch(&older, &g)
        };
        assert_eq!(decide(&none), Step::Wait);
    }

    #[test]
    fn a_growing_shard_count_waits_for_every_instance_of_the_new_groups() {
        // shard-0 and shard-1 change (canaries), shard-2 is new (no canaries: all of its
        // instances must be healthy).
        let g = names(&["shard-0", "shard-1", "shard-2"]);
        let d = dep(
            7,
            "running",
            &[
                ("shard-0", 2, 2, 2, false),
                ("shard-1", 2, 2, 2, false),
                ("shard-2", 0, 2, 1, false),
            ],
        );
        assert_eq!(decide(&watch(&d, &g)), Step::Wait);
        let d = dep(
            7,
            "running",
            &[
                ("shard-0", 2, 2, 2, false),
                ("shard-1", 2, 2, 2, false),
                ("shard-2", 0, 2, 2, false),
            ],
        );
        assert!(matches!(decide(&watch(&d, &g)), Step::Flip { .. }));
    }

    #[test]
    fn a_shrinking_shard_count_does_not_wait_for_the_old_extra_groups() {
        // The new dg has one shard; the old dg's shard-1 is registered again unchanged and
        // is none of the new groups, however its instances are doing.
        let g = names(&["shard-0"]);
        let d = dep(
            7,
            "running",
            &[("shard-0", 2, 2, 2, false), ("shard-1", 0, 2, 0, false)],
        );
        assert!(matches!(decide(&watch(&d, &g)), Step::Flip { .. }));
    }

    #[test]
    fn by_groups_a_successful_deployment_flips_and_the_flip_ends_the_wait() {
        let g = names(&["shard-0-dg-b"]);
        let by_groups = |d| Watch {
            apart: true,
            ..watch(d, &g)
        };
        let d = dep(
            7,
            "successful",
            &[
                ("shard-0-dg-b", 0, 2, 2, false),
                ("shard-0-dg-a", 0, 2, 2, false),
            ],
        );
        assert_eq!(
            decide(&by_groups(&d)),
            Step::Flip {
                promote: Promote::Nothing
            }
        );
        // After the flip the wait ends although a group may still be placing (a node down).
        let d = dep(
            7,
            "running",
            &[
                ("shard-0-dg-b", 0, 2, 2, false),
                ("shard-0-dg-a", 0, 2, 1, false),
            ],
        );
        let flipped = Watch {
            flipped: true,
            ..by_groups(&d)
        };
        assert_eq!(decide(&flipped), Step::Done);
    }

    #[test]
    fn the_first_dg_flips_only_after_its_deployment_succeeds() {
        // Nothing serves: no blue/green, the flip comes after the loop.
        let g = names(&["shard-0"]);
        let d = dep(7, "running", &[("shard-0", 0, 2, 2, false)]);
        let first = Watch {
            blue_green: false,
            ..watch(&d, &g)
        };
        assert_eq!(decide(&first), Step::Wait);
        let d = dep(7, "successful", &[("shard-0", 0, 2, 2, false)]);
        assert_eq!(
            decide(&Watch {
                latest: Some(&d),
                ..first
            }),
            Step::Done
        );
    }

    #[test]
    fn deployment_statuses_read_by_name() {
        assert!(DeploymentStatus::from("running").is_live());
        assert!(DeploymentStatus::from("paused").is_live());
        assert!(DeploymentStatus::from("cancelled").is_failed());
        let other = DeploymentStatus::from("blocked");
        assert!(!other.is_live() && !other.is_failed());
        assert_eq!(other.to_string(), "blocked");
    }
}
