//! `simq-indexer rollout DG --progressive`: the candidate's shards start as canaries beside
//! the active dg (nothing flipped), a traffic split shadows the active dg's queries to it,
//! then steps its share of users up; after each step the comparison from Prometheus
//! ([`crate::compare`]) must pass. When every step passes, the rollout resumes: one CAS
//! flip, promotion, the split cleared. When one fails: the split is cleared (every user
//! back on the active dg), the candidate's deployment is failed so Nomad stops its
//! canaries, and the error names the step and the failed checks.

use std::time::Duration;

use anyhow::bail;
use simq_consul::ConsulClient;
use simq_contract::KvLayout;
use simq_nomad::NomadClient;

use crate::compare::{self, Thresholds};
use crate::rollout::{self, RolloutOptions, RolloutOutcome};
use crate::traffic;

/// How the candidate is stepped up.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Shares of users, in order (e.g. 0.05, 0.25, 0.5); a shadow-only step comes first.
    pub weights: Vec<f64>,
    /// Share of the active dg's queries shadowed to the candidate during every step.
    pub shadow: f64,
    /// How long each step runs before it is judged.
    pub step: Duration,
    /// Prometheus base URL (it scrapes the balancers).
    pub prometheus: String,
    pub thresholds: Thresholds,
}

/// Prometheus scrapes every 5 s (consul/prometheus/prometheus.yml): wait that long and a
/// little more after a step so its last seconds are in the data.
pub const SCRAPE_MARGIN: Duration = Duration::from_secs(6);

/// Run the progressive rollout of `dg`. Returns the final outcome of the rollout.
pub async fn run(
    nomad: &NomadClient,
    consul: &ConsulClient,
    layout: &KvLayout,
    dg: &str,
    opts: &RolloutOptions,
    plan: &Plan,
    progress: impl Fn(&str),
) -> anyhow::Result<RolloutOutcome> {
    let first = RolloutOptions {
        candidate_only: true,
        ..opts.clone()
    };
    match rollout::rollout(nomad, consul, layout, dg, &first, &progress).await? {
        RolloutOutcome::CandidateReady { .. } => {}
        // Nothing served before (the first dg): there is nothing to compare with.
        done @ RolloutOutcome::Done { .. } => return Ok(done),
    }
    // Any failure from here on (a failed check, Prometheus or Consul unreachable) stops
    // the candidate: no share of users stays on a dg nobody is judging.
    if let Err(why) = judge_steps(consul, layout, dg, plan, &progress).await {
        progress(&format!("{why:#}; stopping the candidate"));
        stop_candidate(nomad, consul, layout, &progress).await?;
        bail!("progressive rollout of {dg} stopped, the active dg was not changed: {why:#}");
    }
    // Every step passed: resume the rollout (flip, promote), then remove the split, whose
    // candidate is now the active dg (balancers already send it no "candidate" traffic).
    let outcome = rollout::rollout(nomad, consul, layout, dg, opts, &progress).await?;
    let observed = traffic::observe(consul, layout).await?;
    traffic::clear(consul, layout, &observed).await?;
    progress("traffic split cleared");
    Ok(outcome)
}

/// Set each step's split, wait, judge it; the first failed step is the error.
async fn judge_steps(
    consul: &ConsulClient,
    layout: &KvLayout,
    dg: &str,
    plan: &Plan,
    progress: &impl Fn(&str),
) -> anyhow::Result<()> {
    let steps: Vec<f64> = std::iter::once(0.0)
        .chain(plan.weights.iter().copied())
        .collect();
    for (i, &weight) in steps.iter().enumerate() {
        let observed = traffic::observe(consul, layout).await?;
        let split = traffic::set(
            consul,
            layout,
            &observed,
            &traffic::SetSplit {
                candidate: dg.to_string(),
                weight,
                shadow: plan.shadow,
                salt: None,
            },
        )
        .await?;
        progress(&format!(
            "step {}/{}: {}; judging in {} s",
            i + 1,
            steps.len(),
            traffic::describe(&split),
            plan.step.as_secs()
        ));
        tokio::time::sleep(plan.step + SCRAPE_MARGIN).await;
        let comparison = compare::fetch(&plan.prometheus, plan.step).await?;
        progress(&format!(
            "step {} comparison:\n{}",
            i + 1,
            compare::table(&comparison)
        ));
        let failed: Vec<String> = compare::verdict(&comparison, &plan.thresholds)
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        if !failed.is_empty() {
            bail!(
                "step {}/{} (weight {weight}) failed: {}",
                i + 1,
                steps.len(),
                failed.join("; ")
            );
        }
        progress(&format!("step {} passed", i + 1));
    }
    Ok(())
}

/// Clear the split, then stop the candidate's canaries; the dg stopped, if one ran.
pub async fn stop_candidate(
    nomad: &NomadClient,
    consul: &ConsulClient,
    layout: &KvLayout,
    progress: &impl Fn(&str),
) -> anyhow::Result<Option<String>> {
    let observed = traffic::observe(consul, layout).await?;
    if traffic::clear(consul, layout, &observed).await?.is_some() {
        progress("traffic split cleared: every query goes to the active dg");
    }
    rollout::abort(nomad, consul, layout, progress).await
}
