//! Register one of simq's compiled-in job specs (`nomad/*.nomad.hcl`, `simq_nomad::jobs`)
//! with its variables and wait until Nomad's deployment of it ends: the one way simq's
//! jobs are registered. `scripts/deploy.sh` and the whole-system tests run it as
//! `simq-indexer run-job`; `rollout` registers the shards job from the same spec.

use std::time::{Duration, Instant};

use simq_nomad::{hcl_variables, NomadClient};

/// The spec named `name` (`shards`, `embedder`, `balancer` or `blobs`, a `.nomad.hcl`
/// suffix allowed).
pub fn spec(name: &str) -> anyhow::Result<&'static str> {
    let name = name.strip_suffix(".nomad.hcl").unwrap_or(name);
    Ok(match name {
        "shards" => simq_nomad::jobs::SHARDS,
        "embedder" => simq_nomad::jobs::EMBEDDER,
        "balancer" => simq_nomad::jobs::BALANCER,
        "blobs" => simq_nomad::jobs::BLOBS,
        _ => anyhow::bail!("no job spec named {name:?}: shards, embedder, balancer or blobs"),
    })
}

/// `NAME=VALUE` arguments as variables; an argument without `=` or with an empty name is
/// an error naming it.
pub fn parse_vars(args: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
            _ => anyhow::bail!("{a:?} is not NAME=VALUE"),
        })
        .collect()
}

/// `vars` as an HCL variable file: a value that opens with `{` or `[` is an HCL map or
/// list and goes as written; every other value is a quoted string (Nomad converts it to
/// the variable's declared type: "2" to a number, "true" to a bool).
pub fn variables(vars: &[(String, String)]) -> String {
    let mut out = String::new();
    for (name, value) in vars {
        if value.starts_with('{') || value.starts_with('[') {
            out.push_str(&format!("{name} = {value}\n"));
        } else {
            out.push_str(&hcl_variables([(name.as_str(), value.as_str())]));
        }
    }
    out
}

/// What registering did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ran {
    /// Nomad already ran this very job: nothing was deployed.
    Unchanged { job: String, version: u64 },
    /// The job's new version was deployed and its deployment succeeded.
    Deployed { job: String, version: u64 },
}

/// Register spec `name` with `vars` and wait (at most `limit`) until the deployment of
/// the new version succeeds; an error when it fails (with why, per task group), when it
/// does not end in time, or when Nomad refuses the job.
pub async fn run_job(
    nomad: &NomadClient,
    name: &str,
    vars: &[(String, String)],
    limit: Duration,
) -> anyhow::Result<Ran> {
    let job = nomad.parse_job(spec(name)?, &variables(vars)).await?;
    let id = job["ID"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the {name} spec has no job ID"))?
        .to_string();
    let version_of = |job: Option<serde_json::Value>| job.and_then(|j| j["Version"].as_u64());
    let before = version_of(nomad.job(&id).await?);
    nomad.register_job(&job).await?;
    let version = version_of(nomad.job(&id).await?)
        .ok_or_else(|| anyhow::anyhow!("{id} is not registered after registering it"))?;
    if before == Some(version) {
        return Ok(Ran::Unchanged { job: id, version });
    }
    let task = job["TaskGroups"][0]["Tasks"][0]["Name"]
        .as_str()
        .unwrap_or(name)
        .to_string();
    let deadline = Instant::now() + limit;
    let mut said = String::new();
    loop {
        if let Some(d) = nomad.latest_deployment(&id).await? {
            if d.job_version == version {
                let now = format!("deployment {} of {id} v{version}: {}", d.id, d.status);
                if now != said {
                    tracing::info!(job = %id, version, deployment = %d.id, status = %d.status, "deployment");
                    said = now;
                }
                if d.status.is_failed() {
                    let causes = failure_causes(nomad, &id, &task, version).await?;
                    anyhow::bail!(
                        "the deployment of {id} version {version} {}: {}; {}",
                        d.status,
                        d.status_description,
                        in_words(&causes)
                    );
                }
                if !d.status.is_live() {
                    return Ok(Ran::Deployed { job: id, version });
                }
            }
        }
        if Instant::now() > deadline {
            let causes = failure_causes(nomad, &id, &task, version)
                .await
                .unwrap_or_default();
            anyhow::bail!(
                "the deployment of {id} version {version} did not end within {limit:?} ({}); {}",
                if said.is_empty() {
                    "no deployment seen"
                } else {
                    said.as_str()
                },
                in_words(&causes)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `causes` for an error message.
fn in_words(causes: &[String]) -> String {
    if causes.is_empty() {
        "no cause recorded".into()
    } else {
        causes.join("; ")
    }
}

/// Why the deployment of `version` of `job` failed, per task group, from the
/// allocations' task events and the last "error: " line `task` wrote to stderr.
pub async fn failure_causes(
    nomad: &NomadClient,
    job: &str,
    task: &str,
    version: u64,
) -> anyhow::Result<Vec<String>> {
    // Groups Nomad could not place at all (no allocation to read events from), e.g. the
    // node's CPU or memory reservations are used up.
    let mut causes = nomad.placement_failures(job).await?;
    for stub in nomad.job_allocations(job).await? {
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
        // simq's binaries say why they stopped on stderr, last line "error: ...".
        let said = nomad
            .task_log_tail(&alloc.id, task, true, 4096)
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
            cause.push_str(&format!(" | {task} said: {said}"));
        }
        causes.push(cause);
    }
    Ok(causes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_named_with_or_without_the_file_suffix() {
        assert_eq!(spec("embedder").unwrap(), simq_nomad::jobs::EMBEDDER);
        assert_eq!(
            spec("balancer.nomad.hcl").unwrap(),
            simq_nomad::jobs::BALANCER
        );
        let e = spec("cache").unwrap_err().to_string();
        assert!(
            e.contains("\"cache\"") && e.contains("shards, embedder"),
            "{e}"
        );
    }

    #[test]
    fn variables_are_name_equals_value_and_a_bad_one_is_named() {
        let args = ["count=2".to_string(), "model_files={a = \"b\"}".to_string()];
        assert_eq!(
            parse_vars(&args).unwrap(),
            vec![
                ("count".to_string(), "2".to_string()),
                ("model_files".to_string(), "{a = \"b\"}".to_string())
            ]
        );
        assert_eq!(
            variables(&parse_vars(&args).unwrap()),
            "count = \"2\"\nmodel_files = {a = \"b\"}\n"
        );
        for bad in ["count", "=2"] {
            let e = parse_vars(&[bad.to_string()]).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
