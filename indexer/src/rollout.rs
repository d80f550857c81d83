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

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use simq_consul::{ConsulClient, KvLayout, Manifest};
use simq_nomad::{hcl_variables, NomadClient};

use crate::flip::{flip, FlipError, Flipped};

/// The job id of the shards job.
pub const SHARDS_JOB_ID: &str = "simq-shards";

/// Knobs of a rollout.
#[derive(Debug, Clone)]
pub struct RolloutOptions {
    pub replicas: usize,
    pub blob_url: String,
    pub shard_bin: String,
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

/// The first shard group of the running shards job (None when no such job runs).
async fn running_first_group(nomad: &NomadClient) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(job) = nomad.job(SHARDS_JOB_ID).await? else {
        return Ok(None);
    };
    if job["Stop"].as_bool() == Some(true) || job["Status"] == "dead" {
        return Ok(None);
    }
    Ok(job["TaskGroups"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["Name"] == group_name(0).as_str())
        .cloned())
}

/// The dg the running shards job serves, if any.
pub async fn running_dg(nomad: &NomadClient) -> anyhow::Result<Option<String>> {
    Ok(running_first_group(nomad)
        .await?
        .and_then(|g| g["Meta"]["dg"].as_str().map(String::from)))
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
    let m: Manifest =
        serde_json::from_slice(&kv.value).with_context(|| format!("{key} is not a manifest"))?;
    m.validate().map_err(|e| anyhow!("{key}: {e}"))?;
    Ok(m)
}

fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The Nomad group that runs shard `shard`.
pub fn group_name(shard: u32) -> String {
    format!("shard-{shard}")
}

/// Register the shards job for `manifest` with `canary` canaries per group, plus `keep`:
/// task groups of the running job registered again unchanged; returns the job version
/// Nomad assigned.
pub async fn register_shards(
    nomad: &NomadClient,
    manifest: &Manifest,
    canary: usize,
    attempt: &str,
    opts: &RolloutOptions,
    keep: &[serde_json::Value],
) -> anyhow::Result<u64> {
    let shards: Vec<serde_json::Value> = manifest
        .shards
        .iter()
        .map(|s| serde_json::json!({"shard": s.shard, "sha256": s.sha256}))
        .collect();
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
        ("healthy_deadline", healthy.as_str()),
        ("progress_deadline", progress.as_str()),
        ("attempt", attempt),
    ]);
    // Numbers are HCL numbers, not strings.
    let vars = format!("{vars}dims = {dims}\nreplicas = {replicas}\ncanary = {canary}\n");
    let mut job = nomad
        .parse_job(simq_nomad::jobs::SHARDS, &vars)
        .await
        .context("parsing nomad/shards.nomad.hcl")?;
    if let Some(groups) = job["TaskGroups"].as_array_mut() {
        groups.extend(keep.iter().cloned());
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

/// After the flip: register the job again without the old dg's extra groups, so Nomad
/// stops them (no balancer routes with the old dg any more).
async fn drop_groups(
    nomad: &NomadClient,
    keep: &[serde_json::Value],
    progress: &impl Fn(&str),
) -> anyhow::Result<()> {
    let names: Vec<&str> = keep.iter().filter_map(|g| g["Name"].as_str()).collect();
    let mut job = nomad
        .job(SHARDS_JOB_ID)
        .await?
        .ok_or_else(|| anyhow!("job {SHARDS_JOB_ID} vanished"))?;
    if let Some(groups) = job["TaskGroups"].as_array_mut() {
        groups.retain(|g| g["Name"].as_str().is_none_or(|n| !names.contains(&n)));
    }
    nomad
        .register_job(&job)
        .await
        .context("removing the previous dg's extra shard groups")?;
    // Wait (bounded) until their instances ended, so the next rollout starts clean.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let allocs = nomad.job_allocations(SHARDS_JOB_ID).await?;
        if !allocs.iter().any(|a| {
            names.contains(&a.task_group.as_str())
                && matches!(a.client_status.as_str(), "running" | "pending")
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    progress(&format!(
        "removed {} of the previous dg (the new dg has fewer shards)",
        names.join(", ")
    ));
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

/// Wait until every passing `simq-balancer` reports `dg` as its active dg in
/// `/v1/status` (or `limit` passes); says what it saw.
pub async fn wait_for_balancers(consul: &ConsulClient, dg: &str, limit: Duration) -> String {
    let http = status_client();
    let deadline = Instant::now() + limit;
    loop {
        let balancers = consul
            .health_service("simq-balancer", true, None)
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
        if behind.is_empty() {
            return format!("all {} switched", balancers.len());
        }
        if Instant::now() > deadline {
            return format!(
                "{} still behind after {limit:?}: {}",
                behind.len(),
                behind.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Why the deployment of `version` failed, per shard, from the allocations' task events.
pub async fn failure_causes(nomad: &NomadClient, version: u64) -> anyhow::Result<Vec<String>> {
    // Groups Nomad could not place at all (no allocation to read events from), e.g. the
    // node's CPU or memory reservations are used up.
    let mut causes = nomad.placement_failures(SHARDS_JOB_ID).await?;
    for stub in nomad.job_allocations(SHARDS_JOB_ID).await? {
        if stub.job_version != version {
            continue;
        }
        let healthy = stub.deployment_status.as_ref().and_then(|d| d.healthy);
        if healthy == Some(true) {
            continue;
        }
        let alloc = nomad.allocation(&stub.id).await?;
        let noise = [
            ": Received:",
            ": Task Setup:",
            ": Downloading Artifacts:",
            ": Restarting:",
            ": Not Restarting:",
        ];
        let mut interesting: Vec<String> = Vec::new();
        for l in alloc.event_lines() {
            if !noise.iter().any(|n| l.contains(n)) && !interesting.contains(&l) {
                interesting.push(l);
            }
        }
        if interesting.is_empty() {
            continue;
        }
        // The shard binary says why it refused its file on stderr, last line "error: ...".
        let said = nomad
            .task_log_tail(&alloc.id, "shard", true, 4096)
            .await
            .ok()
            .and_then(|log| {
                log.lines()
                    .rev()
                    .find(|l| l.starts_with("error: "))
                    .map(String::from)
            });
        let mut cause = format!(
            "{} ({}): {}",
            alloc.task_group,
            alloc.client_status,
            interesting.join(" | ")
        );
        if let Some(said) = said {
            cause.push_str(&format!(" | shard said: {said}"));
        }
        causes.push(cause);
    }
    Ok(causes)
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
    // What the job spec names and what the balancers route with can differ after an
    // interrupted rollout: the spec may already name `dg` while the pointer still names
    // the dg whose shards serve. Canaries are needed whenever another dg serves.
    let current = running_dg(nomad).await?;
    let active = crate::flip::observe(consul, layout)
        .await?
        .active
        .map(|a| a.dg);
    let another_serves =
        active.as_deref().is_some_and(|a| a != dg) || current.as_deref().is_some_and(|c| c != dg);
    let canary = if another_serves { opts.replicas } else { 0 };
    // An interrupted rollout of `dg` whose deployment still runs is picked up where it is,
    // not registered again (which would cancel it and start its canaries over).
    let resumed = match nomad.latest_deployment(SHARDS_JOB_ID).await? {
        Some(d)
            if current.as_deref() == Some(dg)
                && matches!(d.status.as_str(), "running" | "paused" | "pending")
                && d.task_groups.values().any(|g| g.desired_canaries > 0) =>
        {
            Some(d.job_version)
        }
        _ => None,
    };
    progress(&format!(
        "rolling out {dg} ({} shards x {} replicas){}",
        manifest.shards.len(),
        opts.replicas,
        match (&active, &current) {
            (Some(a), _) if a != dg => format!(", canaries beside {a}, which serves"),
            (_, Some(c)) if c != dg => format!(", canaries beside running {c}"),
            (_, Some(_)) => ", same dg already running".into(),
            _ => String::new(),
        }
    ));
    // Retrying a dg whose last deployment failed needs a new job version, else Nomad sees
    // no change and nothing is placed again.
    // So does a spec that names `dg` while another dg serves (an interrupted rollout whose
    // deployment ended): its canaries must be placed again.
    let last_failed = current.as_deref() == Some(dg)
        && nomad
            .latest_deployment(SHARDS_JOB_ID)
            .await?
            .is_some_and(|d| d.status == "failed" || d.status == "cancelled");
    let stale_spec = current.as_deref() == Some(dg) && another_serves;
    let attempt = if last_failed || stale_spec {
        crate::flip::now_rfc3339()
    } else {
        String::new()
    };
    let new_groups: Vec<String> = manifest
        .shards
        .iter()
        .map(|s| group_name(s.shard))
        .collect();
    // Groups of the running dg beyond the new dg's shard count: kept until after the flip.
    let keep = match &current {
        Some(cur) if cur != dg => groups_beyond(nomad, &new_groups).await?,
        _ => Vec::new(),
    };
    let version = match resumed {
        Some(version) => {
            progress(&format!(
                "resuming the running deployment of {dg} (job version {version})"
            ));
            version
        }
        None => register_shards(nomad, &manifest, canary, &attempt, opts, &keep).await?,
    };
    let deadline = started + opts.timeout;
    let mut last_line = String::new();
    let mut last_at = Instant::now();
    let mut flipped = None;
    loop {
        if Instant::now() > deadline {
            bail!(
                "rollout of {dg} timed out after {:?}; Nomad keeps following its own deadlines",
                opts.timeout
            );
        }
        let dep = nomad.latest_deployment(SHARDS_JOB_ID).await?;
        let Some(dep) = dep.filter(|d| d.job_version >= version) else {
            // Re-registering an identical job makes no deployment: it is running already.
            if nomad
                .latest_deployment(SHARDS_JOB_ID)
                .await?
                .is_some_and(|d| d.status == "successful")
                && current.as_deref() == Some(dg)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        if dep.job_version > version {
            // Nomad registered a newer version: the auto-revert of ours.
            let causes = failure_causes(nomad, version).await?;
            if let Some(back) = flip_back(consul, layout, &flipped).await {
                bail!(
                    "rollout of {dg} failed after the flip and Nomad reverted the job (version {version} -> {}): {}. {back}",
                    dep.job_version,
                    causes.join("; ")
                );
            }
            bail!(
                "rollout of {dg} failed and Nomad reverted the job (version {version} -> {}): {}",
                dep.job_version,
                causes.join("; ")
            );
        }
        // A changed group is ready when its canaries are healthy, a new one (no canaries)
        // when all its instances are.
        let target = |g: &simq_nomad::DeploymentGroup| {
            if g.desired_canaries > 0 {
                g.desired_canaries
            } else {
                g.desired_total
            }
        };
        let groups: Vec<String> = dep
            .task_groups
            .iter()
            .filter(|(g, _)| new_groups.contains(g))
            .map(|(g, s)| format!("{g} {}/{}", s.healthy_allocs, target(s)))
            .collect();
        let line = format!(
            "deployment {} {}: {}",
            &dep.id[..8],
            dep.status,
            groups.join(", ")
        );
        // A line on each change, and at least every LOG_EVERY while nothing changes.
        if line != last_line || last_at.elapsed() >= crate::progress::LOG_EVERY {
            progress(&format!(
                "{line} ({} elapsed)",
                crate::progress::human(started.elapsed())
            ));
            last_line = line;
            last_at = Instant::now();
        }
        match dep.status.as_str() {
            "successful" => break,
            "failed" | "cancelled" => {
                let causes = failure_causes(nomad, version).await?;
                if let Some(back) = flip_back(consul, layout, &flipped).await {
                    bail!(
                        "rollout of {dg} failed after the flip: {}; {}. {back}",
                        dep.status_description,
                        causes.join("; ")
                    );
                }
                bail!(
                    "rollout of {dg} failed: {}; {}. The active dg was not changed{}",
                    dep.status_description,
                    causes.join("; "),
                    if dep.status_description.contains("rolling back") {
                        "; Nomad reverts the job"
                    } else {
                        ""
                    }
                );
            }
            _ => {}
        }
        // A resumed deployment has canaries even when `dg` is already active (a run killed
        // between the flip and the promotion): they still wait for the promotion.
        let all_canaries_healthy = (canary > 0 || resumed.is_some())
            && new_groups.iter().all(|name| {
                dep.task_groups
                    .get(name)
                    .is_some_and(|g| target(g) > 0 && g.healthy_allocs >= target(g))
            });
        if all_canaries_healthy && opts.candidate_only {
            progress(&format!(
                "candidate {dg} ready: every shard's canaries are healthy beside the active dg ({:.1} s); not flipped",
                started.elapsed().as_secs_f64()
            ));
            return Ok(RolloutOutcome::CandidateReady {
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        if all_canaries_healthy && flipped.is_none() {
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
            let waited = wait_for_balancers(consul, dg, Duration::from_secs(15)).await;
            progress(&format!("balancers route with {dg}: {waited}"));
            // (A resumed run finds it promoted when its last run was killed after that.)
            let mut canaried = dep.task_groups.values().filter(|g| g.desired_canaries > 0);
            if canaried.all(|g| g.promoted) {
                progress("deployment already promoted: old shards stop");
            } else {
                nomad
                    .promote_deployment(&dep.id)
                    .await
                    .context("promoting the deployment")?;
                progress("deployment promoted: old shards stop");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if !keep.is_empty() {
        drop_groups(nomad, &keep, &progress).await?;
    }
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
    if let Some(dep) = nomad.latest_deployment(SHARDS_JOB_ID).await? {
        if matches!(dep.status.as_str(), "running" | "paused" | "pending") {
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
                && matches!(a.client_status.as_str(), "running" | "pending")
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
